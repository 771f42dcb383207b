#!/usr/bin/env bash
# Does the backbone's pretraining carry downstream? (RESULTS.md "Detection".) The same detector (torchvision's
# Faster R-CNN, detect.py's small-image heads) and the same budget on composed garment scenes (64 px, 2-5
# garments of 10-32 px each), with these backbones:
#   resnet-scratch   torchvision's ResNet-18-FPN from scratch (the ResNet-50 being replaced, at CPU scale)
#   resnet-sup       the same, pretrained on labels by train.py (the convnet's recipe: flips, smoothing, AdamW)
#   vit-scratch      deit_nano_patch4_28 built at 64 px (patch 4: the pyramid needs a power of 2), from scratch
#   vit-sup          ... pretrained on labels by train.py, with the ResNet's recipe
#   vit-dist         ... pretrained as deit_nano_distilled_patch4_28, the same, hard-distilled from a convnet teacher
#   vit-mae          ... pretrained by mae.py (no labels)
# and, for each pretrained one, a frozen-trunk row (-frozen: only the pyramid and the heads train), which tells
# whether the features carry as they are or whether the detector's lr rewrites them.
# Held fixed between the rows, so that only the starting weights differ:
# - the geometry: every pretraining sees 64-px canvases, each one training garment at a random scale (10-32 px)
#   and place (train.py/mae.py --canvas 64), as the scenes hold them; not centred 28-px garments;
# - the network: every ViT backbone is built at 64 px (a 16x16 grid of position embeddings; weights of another
#   size would be resized once, at load) and without a distillation token (detect.py drops it), so the scratch
#   and the pretrained ViT backbones have the same parameters (test_all.py);
# - the pretraining budget: 2 epochs of the 60,000 canvases each (120,000 images seen; a CPU's budget: a DeiT at 64
#   px trains at ~70 images/s on 2 cores), with DeiT's warm-up share, 1 of every 60 epochs (5 of 300);
# - the supervised recipe: the convnet's (flips, label smoothing, AdamW), for the ResNet and the DeiTs alike. DeiT's
#   augmentation (RandAugment, Mixup, CutMix, erasing) is made for 300 epochs (paper Table 9); in these 936 steps it
#   left the DeiT at chance (studies/logs/detection/deit-recipe-probe/: the loss near ln 10 through 344 steps, 10.52%
#   top-1 at step 300), where with the ResNet's recipe its loss fell to 2.19 by step 110. What the recipe buys a ViT
#   is data_efficiency.sh's question; here it would only make the DeiT rows start from nothing;
# - the detector's training: DET_EPOCHS epochs of 1,000 scenes, the lr of the probes in studies/logs/detection/
#   lr-probe/ (60x ViTDet's per-image lr: --lr 4.8e-2, a peak of 1.5e-3 at batch 16, cosine to 1e-6; ViTDet's
#   own left every detector near zero in a few hundred steps), no layer decay, evaluated on 500 held-out scenes
#   every 2 epochs. DET_EPOCHS (20) is where the scratch ResNet's mAP curve has flattened: the `schedule` cell
#   trained it for 30 epochs, and from epoch 20 on it moved within 0.7 points (36.03, 36.36, 35.90, 36.41,
#   36.63 at 20-28); RESULTS.md draws the curve.
# Seed 0 for every detector; then seeds 1 and 2 for each of the six rows whose seed-0 mAP lies within CLOSE (4)
# points of another row's (at this budget the seed moved a detector's mAP by 1-4 points), where the order needs
# the seeds' spread; the frozen-trunk rows seed 0 only (FROZEN_SEEDS="0 1 2": all three). Cuts for the budget:
# a detector takes about an hour of one core. Detection on a CPU is
# bound by torchvision's per-image Python: two detectors side by side, one thread each, run as fast each as one
# alone on both cores, so the detectors run in two lanes. Each finished cell's log is kept in
# studies/logs/detection/ (committed), the pretrained weights too (weights.pt), so a rerun resumes, here or in
# a fresh clone.
source "$(dirname "$0")/lib.sh"
keep_logs
needs_fashion_mnist
DET_EPOCHS=${DET_EPOCHS:-20}
C=(--data fashion-mnist --canvas 64 --epochs 2 --warmup-epochs 0.033)  # pretraining: 2 epochs, 2/60 of warm-up
CNN=(--aa none --reprob 0 --mixup 0 --cutmix 0)  # the convnet's recipe
PRE=(resnet-sup vit-sup vit-dist vit-mae)
ALL=(resnet-scratch vit-scratch "${PRE[@]}")
FROZEN=($(printf '%s-frozen ' "${PRE[@]}"))
feeds() { printf "det-$1-%s det-$1-frozen-%s " 0 0 1 1 2 2; }
X=(--data fashion-mnist --img-size 64 --scenes 1000 --val-scenes 500 --lr 4.8e-2 --min-lr 1e-6 --layer-decay 1)

# how long the detectors train: the scratch ResNet for 30 epochs, its curve
OMP_NUM_THREADS=1 cell schedule python detect.py "${X[@]}" --model resnet18 --epochs 30 --eval-interval 2 &
probe=$!
if [ "${ONLY:-}" = schedule ]; then wait $probe; exit; fi  # the probe alone (ONLY=schedule), beside another study
cell teacher --feeds vit-dist python train.py "${C[@]}" --model convnet "${CNN[@]}"
cell resnet-sup --feeds "$(feeds resnet-sup)" python train.py "${C[@]}" --model resnet18 "${CNN[@]}"
cell vit-sup --feeds "$(feeds vit-sup)" python train.py "${C[@]}" --model deit_nano_patch4_28 "${CNN[@]}"
cell vit-dist --feeds "$(feeds vit-dist)" python train.py "${C[@]}" --model deit_nano_distilled_patch4_28 "${CNN[@]}" \
  --distill hard --teacher "$(weights teacher)"
cell vit-mae --feeds "$(feeds vit-mae)" python mae.py "${C[@]}" --model deit_nano_patch4_28
wait $probe

detect() {  # detect SEED BACKBONE...
  local seed=$1 b; shift
  local S=("${X[@]}" --epochs $DET_EPOCHS --eval-interval 2 --seed $seed)
  for b in "$@"; do
    case $b in
      resnet-scratch) cell det-$b-$seed python detect.py "${S[@]}" --model resnet18 ;;
      vit-scratch) cell det-$b-$seed python detect.py "${S[@]}" --model deit_nano_patch4_28 ;;
      resnet-sup*) cell det-$b-$seed python detect.py "${S[@]}" --model resnet18 --weights "$(weights resnet-sup)" \
                     $([[ $b = *-frozen ]] && echo --freeze-trunk) ;;
      *) cell det-$b-$seed python detect.py "${S[@]}" --weights "$(weights ${b%-frozen})" \
           $([[ $b = *-frozen ]] && echo --freeze-trunk) ;;
    esac
  done
}
lanes() {  # lanes SEED BACKBONE...: those detectors still to run, dealt to two lanes side by side, one thread each
  local seed=$1 x a=() b=(); shift
  for x in "$@"; do
    [ -f "$LOGS/det-$x-$seed/log.jsonl" ] || { if ((${#a[@]} <= ${#b[@]})); then a+=($x); else b+=($x); fi; }
  done
  local pa pb=
  OMP_NUM_THREADS=1 detect $seed "${a[@]}" & pa=$!
  if ((${#b[@]})); then OMP_NUM_THREADS=1 detect $seed "${b[@]}" & pb=$!; fi
  wait $pa; [ -z "$pb" ] || wait $pb
}
CLOSE=${CLOSE:-4}
for seed in ${SEEDS:-0 1 2}; do  # SEEDS=0: a quicker look
  rows=("${ALL[@]}")
  if [ $seed != 0 ]; then  # the rows within CLOSE of another's seed-0 mAP
    rows=($(report <<PY
top = {b: last(f"det-{b}-0", "map") for b in "${ALL[*]}".split() if kept(f"det-{b}-0")}
print(" ".join(b for b in top if any(c != b and abs(top[b] - top[c]) < $CLOSE for c in top)))
PY
))
  fi
  lanes $seed "${rows[@]}" $([[ " ${FROZEN_SEEDS:-0} " = *" $seed "* ]] && echo "${FROZEN[@]}")
done
[ "${QUICK:-0}" = 1 ] && E=1 || E=$DET_EPOCHS
report <<PY
import json
E = $E
NAME = {"resnet-scratch": "ResNet-18, from scratch", "resnet-sup": "ResNet-18, supervised",
        "vit-scratch": "DeiT, from scratch", "vit-sup": "DeiT, supervised", "vit-dist": "DeiT⚗, hard-distilled",
        "vit-mae": "DeiT, MAE (no labels)"}
PRE = {"resnet-sup": ["resnet-sup"], "vit-sup": ["vit-sup"], "vit-dist": ["teacher", "vit-dist"], "vit-mae": ["vit-mae"]}
minutes = lambda name: sum(json.loads(l)["epoch_time"] for l in open(f"{OUT}/{name}/log.jsonl")) / 60  # training only
cells = lambda b: [f"det-{b}-{s}" for s in range(3) if finished(f"det-{b}-{s}", E)]
rows, used = [], []
for b, label in NAME.items():
    pre, run, frozen = PRE.get(b, []), cells(b), cells(b + "-frozen")
    used += [p for p in pre if finished(p, 2)] + run + frozen
    top = "—" if not pre or not finished(pre[-1], 2) else (f"held-out loss {last(pre[-1], 'val_loss'):.3f}"
                                                             if b == "vit-mae" else f"{last(pre[-1]):.2f}")
    rows.append([f"{b}: {label}", top, seeds(run, "ap50") if run else "—", seeds(run, "map") if run else "—",
                 "" if not pre else seeds(frozen, "map") if frozen else "—",
                 f"{sum(minutes(c) for c in [p for p in pre if finished(p, 2)] + run[:1]):.0f}"])
table(["backbone", "pretraining: top-1 on the 10,000 test canvases", "AP50", "mAP (.50:.95)", "mAP, trunk frozen",
       "training minutes: pretraining (+ teacher) + one detector"], rows)
print(f"\nbox AP (%) on 500 held-out scenes after {E} epochs of 1,000: the mean of the seeds run, each in brackets")
provenance(used + (["schedule"] if finished("schedule", 30) else []))
from plot import lines, panels
groups = {}
if finished("schedule", 30):
    groups["ResNet-18 from scratch, 30 epochs (the schedule)"] = {"mAP": {e: [v] for e, v in curve("schedule", "map").items()}}
groups[f"every backbone, seed 0, {E} epochs"] = {b: {e: [v] for e, v in curve(f"det-{b}-0", "map").items()}
                                                for b in NAME if finished(f"det-{b}-0", E)}
panels(groups, f"{RUNS}/detection-curves.png", "epoch", "box mAP on the held-out scenes (%)",
       "Faster R-CNN on 64-px garment scenes: mAP against epochs")
PY
[ "${QUICK:-0}" = 1 ] || report <<'PY'
# README's picture: the first four held-out scenes as the pretrained ResNet-18 (top) and DeiT (bottom) detect them
import os
from PIL import Image
paths = [f"{OUT}/det-{b}-0/detections.png" for b in ("resnet-sup", "vit-sup")]  # kept with the logs
if all(map(os.path.exists, paths)):
    top, bottom = (Image.open(p).convert("RGB") for p in paths)  # 2 rows of 4 tiles, 2 px apart and around
    row = (top.height - 2) // 2  # a row of tiles and the padding above it
    pic = Image.new("RGB", top.size)
    pic.paste(top.crop((0, 0, top.width, row)), (0, 0))
    pic.paste(bottom.crop((0, 0, top.width, row + 2)), (0, row))
    pic.save("assets/detections.png")
PY
[ "${QUICK:-0}" = 1 ] || [ ! -f "$RUNS/detection-curves.png" ] || cp "$RUNS/detection-curves.png" assets/
