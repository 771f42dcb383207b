#!/usr/bin/env bash
# What pretraining buys a new task (RESULTS.md "Fine-tuning: supervised and MAE backbones"; paper §5.3, MAE §4):
# two deit_nano_patch7_28 backbones pretrained on the same 30,000 training images of Fashion-MNIST classes 0-4,
# for the same 20 epochs with the same warm-up (DeiT's share, 5 of 300), one with their labels (train.py, DeiT's
# recipe), one without (mae.py, MAE's defaults); then classes 5-9, which neither saw, learnt from 1% or 10% of
# their labels (the seed picks them; seeds 0-2), every run 30 epochs with 1 of warm-up (finetune.py's transfer
# recipe), so the rows differ only in their labels and the columns only in where the weights start:
#   scratch    train.py from random weights
#   sup-probe, mae-probe   the backbone frozen, a new linear head on the class token (no augmentation, no wd)
#   sup-ft, mae-ft         the whole network, DeiT's recipe at finetune.py's transfer lr, the same flags for both
#                          (an MAE checkpoint would default to MAE's own recipe, which lost 8 points to it at
#                          1,000 images in data_efficiency.sh)
# and each backbone's reconstruction probe (mae.py --probe: the backbone frozen, a fresh decoder learns to give
# back the pixels of classes 5-9 from every patch), with an untrained encoder beside them. About 6 hours of one
# CPU core beside other work (2026-12-07: the backbones 40-50 minutes each, a 1% cell 2-5, a 10% cell 4-11).
source "$(dirname "$0")/lib.sh"
keep_logs
needs_fashion_mnist
D=(--data fashion-mnist)
uses() {  # uses KIND: the cells that start from backbone KIND's weights
  local f s; for f in 0.01 0.1; do for s in 0 1 2; do printf "$1-probe-$f-$s $1-ft-$f-$s "; done; done
  printf "$1-pixels"
}
PRE=("${D[@]}" --classes 0-4 --epochs 20 --warmup-epochs 0.33)
cell sup --feeds "$(uses sup)" python train.py "${PRE[@]}"
cell mae --feeds "$(uses mae)" python mae.py "${PRE[@]}"
FT=(--recipe transfer --no-global-pool)
PROBE=(--recipe transfer --no-global-pool --freeze --lr 8e-3 --weight-decay 0 --aa none --reprob 0 --mixup 0 --cutmix 0)
for frac in 0.01 0.1; do
  for seed in 0 1 2; do
    C=("${D[@]}" --classes 5-9 --train-subset $frac --epochs 30 --warmup-epochs 1 --seed $seed)
    cell scratch-$frac-$seed python train.py "${C[@]}"
    for b in sup mae; do
      cell $b-probe-$frac-$seed python finetune.py --weights "$(weights $b)" "${C[@]}" "${PROBE[@]}"
      cell $b-ft-$frac-$seed python finetune.py --weights "$(weights $b)" "${C[@]}" "${FT[@]}"
    done
  done
done
[ -f "$RUNS/untrained.pt" ] || python -c "import torch, model; torch.manual_seed(0); torch.save(model.create_model(
  'deit_nano_patch7_28', in_chans=1, num_classes=10).state_dict(), '$RUNS/untrained.pt')"
PIXELS=("${D[@]}" --classes 5-9 --epochs 3 --warmup-epochs 0.05)
for b in sup mae; do cell $b-pixels python mae.py "${PIXELS[@]}" --probe "$(weights $b)"; done
cell untrained-pixels python mae.py "${PIXELS[@]}" --probe "$RUNS/untrained.pt"
# the MAE backbone's last picture (8 held-out garments of classes 0-4, the same masked 75%, the reconstruction),
# kept with its log so that a clean clone redraws the README's picture
R=$LOGS/mae/reconstruction.png
[ -f "$R" ] || [ ! -d "$RUNS/mae/reconstructions" ] || cp "$(ls "$RUNS"/mae/reconstructions/*.png | tail -1)" "$R"
[ "${QUICK:-0}" = 1 ] || [ ! -f "$R" ] || cp "$R" assets/mae-fashion-mnist.png
report <<'PY'
print(f"backbones (classes 0-4): supervised {last('sup'):.2f}% top-1 on their 5,000 test images; "
      f"MAE held-out reconstruction loss {last('mae', 'val_loss'):.3f}\n" if kept("sup") and kept("mae") else "")
s = lambda arm, fr: seeds([f"{arm}-{fr}-{k}" for k in range(3)])
table(["labels of classes 5–9 (30 epochs), top-1, seeds 0/1/2", "from scratch", "linear probe: supervised",
       "linear probe: MAE", "fine-tune: supervised", "fine-tune: MAE"],
      [[label] + [s(arm, fr) for arm in ("scratch", "sup-probe", "mae-probe", "sup-ft", "mae-ft")]
       for fr, label in (("0.01", "1% (300 images)"), ("0.1", "10% (3,000)"))])
print()
px = lambda name: f"{last(name, 'val_loss'):.4f}" if kept(name) else "running"
table(["pixel error of the reconstruction of classes 5–9, held-out (MSE on normalised pixels)", "untrained encoder",
       "supervised backbone", "MAE backbone"],
      [["a fresh decoder, 3 epochs, every patch shown", px("untrained-pixels"), px("sup-pixels"), px("mae-pixels")]])
median = lambda v: sorted(v)[len(v) // 2]
print("\nseconds per pretraining epoch, the median (one thread, beside other work): " + ", ".join(
    f"{b} {median(list(c.values())):.0f}" for b, c in (("supervised", curve("sup", "epoch_time")), ("MAE", curve("mae", "epoch_time"))))
      if kept("sup") and kept("mae") else "")
import glob
provenance(sorted(os.path.basename(os.path.dirname(p)) for p in glob.glob(f"{OUT}/*/log.jsonl")))
PY
