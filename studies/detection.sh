#!/usr/bin/env bash
# Does the backbone's pretraining carry downstream? (RESULTS.md "Detection"; issue 21.) The same detector
# (torchvision's Faster R-CNN, detect.py's small-image heads) and the same budget on composed garment scenes,
# with six backbones:
#   resnet-scratch   torchvision's ResNet-18-FPN from scratch (the ResNet-50 being replaced, at CPU scale)
#   resnet-sup       the same, pretrained on Fashion-MNIST's labels by train.py (the convnet's recipe: flips,
#                    smoothing, AdamW; RandAugment, erasing, Mixup and CutMix are a ViT's remedy)
#   vit-scratch      deit_nano_patch4_28 (patch 4: the pyramid needs a power of 2) from scratch
#   vit-sup          ... pretrained by train.py with DeiT's recipe
#   vit-dist         deit_nano_distilled_patch4_28, hard-distilled from the convnet teacher
#   vit-mae          ... pretrained by mae.py (no labels)
# Each pretraining sees the same 300,000 images (5 epochs of the 60,000); each detector 5 epochs of 1,000 scenes
# of 64 px (2-5 garments of 10-32 px each), evaluated on 500 scenes of the test split's garments. The detector's
# lr is not ViTDet's (1e-4 at batch 64, i.e. --lr 8e-4 per 512, over 184k steps): over 620 steps (10 epochs) it
# left the detectors near zero (mAP 0.87 for resnet-scratch, 1.21 for resnet-sup). Over these 310 steps, 20x it
# (--lr 1.6e-2) gave resnet-scratch 5.97, vit-sup 1.34 (1.48 without layer decay); 60x (--lr 4.8e-2, a peak of
# 1.5e-3 at batch 16) gives resnet-scratch 17.18 and vit-scratch 7.78: the study's lr, not tuned further (the
# ResNet's gain says a larger one might help it more). The cosine ends at 1e-6. Every backbone trains the same
# way, without ViTDet's layer decay (a device for fine-tuning over long schedules, which here would give the
# pretrained trunks a smaller lr than the scratch one): only the starting weights differ. The probes' logs:
# studies/logs/detection/lr-probe/.
# Three seeds for every detector: at this budget a detector's mAP moves 1-4 points with its seed (vit-scratch:
# 7.08 to 11.15), as much as most gaps between backbones. Detection on a CPU is bound by torchvision's per-image
# Python, not by arithmetic: two cells side by side, one thread each, run at 10-13 images/s each, as fast as one
# cell alone on both cores, so the detectors run in two lanes (pretraining: 80 minutes, one cell at a time;
# each detector 7-10 minutes; the whole study about 2.5 hours). Each finished cell's log is kept in
# studies/logs/detection/ (committed), so a rerun resumes.
source "$(dirname "$0")/lib.sh"
keep_logs
needs_fashion_mnist
D=(--data fashion-mnist --epochs 5)
CNN=(--aa none --reprob 0 --mixup 0 --cutmix 0)  # the convnet teacher's recipe
ALL=(resnet-scratch resnet-sup vit-scratch vit-sup vit-dist vit-mae)
cell teacher --feeds vit-dist python train.py "${D[@]}" --model convnet "${CNN[@]}"
cell resnet-sup --feeds "$(printf 'det-resnet-sup-%s ' 0 1 2)" python train.py "${D[@]}" --model resnet18 "${CNN[@]}"
cell vit-sup --feeds "$(printf 'det-vit-sup-%s ' 0 1 2)" python train.py "${D[@]}" --model deit_nano_patch4_28
cell vit-dist --feeds "$(printf 'det-vit-dist-%s ' 0 1 2)" python train.py "${D[@]}" \
  --model deit_nano_distilled_patch4_28 --distill hard --teacher "$OUT/teacher/ckpt.pt"
cell vit-mae --feeds "$(printf 'det-vit-mae-%s ' 0 1 2)" python mae.py "${D[@]}" --model deit_nano_patch4_28

detect() {  # detect SEED BACKBONE...
  local seed=$1 b; shift
  local X=(--data fashion-mnist --img-size 64 --scenes 1000 --val-scenes 500 --epochs 5 --eval-interval 5
           --lr 4.8e-2 --min-lr 1e-6 --layer-decay 1 --seed $seed)
  for b in "$@"; do
    case $b in
      resnet-scratch) cell det-$b-$seed python detect.py "${X[@]}" --model resnet18 ;;
      resnet-sup) cell det-$b-$seed python detect.py "${X[@]}" --model resnet18 --weights "$OUT/$b/ckpt.pt" ;;
      vit-scratch) cell det-$b-$seed python detect.py "${X[@]}" --model deit_nano_patch4_28 ;;
      *) cell det-$b-$seed python detect.py "${X[@]}" --weights "$OUT/$b/ckpt.pt" ;;
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
for seed in 0 1 2; do lanes $seed "${ALL[@]}"; done
report <<'PY'
import json
def cpu_minutes(name):  # training time of a cell, from its log (evaluation excluded)
    return sum(json.loads(l)["epoch_time"] for l in open(f"{OUT}/{name}/log.jsonl")) / 60
PRE = {"resnet-sup": "resnet-sup", "vit-sup": "vit-sup", "vit-dist": "vit-dist", "vit-mae": "vit-mae"}
NAME = {"resnet-scratch": "ResNet-18, from scratch", "resnet-sup": "ResNet-18, supervised",
        "vit-scratch": "DeiT, from scratch", "vit-sup": "DeiT, DeiT's recipe", "vit-dist": "DeiT⚗, hard-distilled",
        "vit-mae": "DeiT, MAE (no labels)"}
rows = []
for b in ["resnet-scratch", "resnet-sup", "vit-scratch", "vit-sup", "vit-dist", "vit-mae"]:
    cells = [f"det-{b}-{s}" for s in range(3) if finished(f"det-{b}-{s}", 5)]
    pre = PRE.get(b)
    pretrained = ("—" if pre is None else f"held-out loss {last(pre, 'val_loss'):.3f}" if b == "vit-mae"
                  else f"{last(pre):.2f}")
    rows.append([f"{b}: {NAME[b]}", pretrained, seeds(cells, "ap50") if cells else "—", seeds(cells, "map") if cells else "—",
                 f"{sum(cpu_minutes(c) for c in ([pre] if pre else []) + (['teacher'] if b == 'vit-dist' else []) + cells[:1]):.0f}"])
table(["backbone", "pretraining: top-1 on the test set", "AP50", "mAP (.50:.95)",
       "training minutes: pretraining (+ teacher) + one detector"], rows)
print("\nbox AP (%) on 500 held-out scenes: the mean of seeds 0, 1, 2, each in brackets")
machine()
PY
[ "${QUICK:-0}" = 1 ] || report <<'PY'
# README's picture: the first four held-out scenes as the pretrained ResNet-18 (top) and DeiT (bottom) detect them
import os
from PIL import Image
paths = [f"{RUNS}/det-{b}-0/detections.png" for b in ("resnet-sup", "vit-sup")]
if all(map(os.path.exists, paths)):
    top, bottom = (Image.open(p).convert("RGB") for p in paths)  # 2 rows of 4 tiles, 2 px apart and around
    row = (top.height - 2) // 2  # a row of tiles and the padding above it
    pic = Image.new("RGB", top.size)
    pic.paste(top.crop((0, 0, top.width, row)), (0, 0))
    pic.paste(bottom.crop((0, 0, top.width, row + 2)), (0, row))
    pic.save("assets/detections.png")
PY
