#!/usr/bin/env bash
# MAE against supervised pretraining (RESULTS.md "MAE"): two deit_nano_patch7_28 backbones, 10 epochs over the
# 60,000 Fashion-MNIST training images each, MAE (no labels) and supervised; then (a) fine-tunes on 1/10/100%
# of the labels, (b) a linear probe, (c) the reconstruction probe (with an untrained encoder for reference);
# and the fairer low-label test: a supervised backbone that never saw classes 5-9, both fine-tuned on them.
# About 4 hours on 2 CPU cores.
source "$(dirname "$0")/lib.sh"
keep_logs
needs_fashion_mnist
D=(--data fashion-mnist)
# the fine-tune, the same for both backbones: MAE's (its schedule and head init, layer decay, global pool), written
# out in full, since only an MAE checkpoint gets them by default
FT=(--lr 4e-3 --min-lr 1e-5 --warmup-epochs 1 --sched mae --head-init-std 2e-5 --weight-decay 0.05 --layer-decay 0.75
    --global-pool)
uses() {  # uses KIND: the cells that start from backbone KIND's weights
  local f s; for f in 0.01 0.1 1.0; do for s in 0 1 2; do printf "$1-ft-$f-$s "; done; done
  for f in 0.01 0.1; do for s in 0 1 2; do printf "c59-$1-$f-$s "; done; done; printf "$1-linear $1-probe"
}
cell mae --feeds "$(uses mae)" python mae.py "${D[@]}" --epochs 10 --warmup-epochs 1
cell sup --feeds "$(uses sup)" python train.py "${D[@]}" --epochs 10 --warmup-epochs 1
cell sup04 --feeds "$(uses sup04)" python train.py "${D[@]}" --classes 0-4 --epochs 10 --warmup-epochs 1
for labels in "0.01 25" "0.1 8" "1.0 2"; do  # (a)
  set -- $labels
  for seed in 0 1 2; do
    A=("${D[@]}" $(subset $1) --epochs $2 --seed $seed)
    cell scratch-$1-$seed python train.py "${A[@]}" --warmup-epochs 1
    cell mae-ft-$1-$seed python finetune.py --weights "$(weights mae)" "${A[@]}" "${FT[@]}"
    if [ $1 != 1.0 ] || [ $seed = 0 ]; then
      cell sup-ft-$1-$seed python finetune.py --weights "$(weights sup)" "${A[@]}" "${FT[@]}"
    fi
  done
done
LIN=(--freeze --epochs 3 --lr 8e-3 --min-lr 1e-5 --warmup-epochs 1 --warmup-lr 1e-6 --weight-decay 0 --no-global-pool
     --layer-decay 1 --aa none --reprob 0 --mixup 0 --cutmix 0)
for b in mae sup; do  # (b), (c)
  cell $b-linear python finetune.py --weights "$(weights $b)" "${D[@]}" "${LIN[@]}"
  cell $b-probe python mae.py "${D[@]}" --probe "$(weights $b)" --epochs 3 --warmup-epochs 1
done
[ -f "$OUT/untrained.pt" ] || python -c "import torch, model; torch.manual_seed(0); torch.save(model.create_model(
  'deit_nano_patch7_28', in_chans=1, num_classes=10).state_dict(), '$OUT/untrained.pt')"
cell untrained-probe python mae.py "${D[@]}" --probe "$OUT/untrained.pt" --epochs 3 --warmup-epochs 1
for labels in "0.01 40" "0.1 10"; do  # the fairer test, on classes 5-9
  set -- $labels
  for seed in 0 1 2; do
    C=("${D[@]}" --classes 5-9 $(subset $1) --epochs $2 --seed $seed)
    cell c59-scratch-$1-$seed python train.py "${C[@]}" --warmup-epochs 1
    cell c59-mae-$1-$seed python finetune.py --weights "$(weights mae)" "${C[@]}" "${FT[@]}"
    cell c59-sup04-$1-$seed python finetune.py --weights "$(weights sup04)" "${C[@]}" "${FT[@]}"
  done
done
report <<'PY'
print(f"backbones: MAE held-out reconstruction loss {last('mae', 'val_loss'):.3f}; supervised {last('sup'):.2f}% "
      f"top-1; supervised on classes 0-4 {last('sup04'):.2f}%\n")
s = lambda fmt, fr, seeds_=range(3): seeds([fmt.format(fr, k) for k in seeds_])
px = lambda name: f"{last(name, 'val_loss'):.4f}"
table(["", "from scratch", "MAE backbone", "supervised backbone"],
      [["(a) fine-tune, 1% of the labels (600), top-1, seeds 0/1/2", s("scratch-{}-{}", "0.01"), s("mae-ft-{}-{}", "0.01"), s("sup-ft-{}-{}", "0.01")],
       ["(a) fine-tune, 10% (6,000), top-1, seeds 0/1/2", s("scratch-{}-{}", "0.1"), s("mae-ft-{}-{}", "0.1"), s("sup-ft-{}-{}", "0.1")],
       ["(a) fine-tune, 100%, 2 epochs, top-1, seeds 0/1/2 (supervised: seed 0)", s("scratch-{}-{}", "1.0"), s("mae-ft-{}-{}", "1.0"), s("sup-ft-{}-{}", "1.0", [0])],
       ["(b) linear probe, top-1", "—", f"{last('mae-linear'):.2f}", f"{last('sup-linear'):.2f}"],
       ["(c) pixel error of the reconstruction, held-out (MSE on normalised pixels)", px("untrained-probe") + ", an untrained encoder", px("mae-probe"), px("sup-probe")]])
print()
table(["labels of classes 5–9, top-1, seeds 0/1/2", "from scratch", "MAE backbone", "supervised on classes 0–4"],
      [[label, s("c59-scratch-{}-{}", fr), s("c59-mae-{}-{}", fr), s("c59-sup04-{}-{}", fr)]
       for fr, label in (("0.01", "1% (300 images)"), ("0.1", "10% (3,000)"))])
import glob
provenance(sorted(os.path.basename(os.path.dirname(p)) for p in glob.glob(f"{OUT}/*/log.jsonl")))
PY
