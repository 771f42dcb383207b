#!/usr/bin/env bash
# What pretraining buys (RESULTS.md "Fine-tuning"): pretrain on Fashion-MNIST classes 0-4, then learn classes
# 5-9 from 1%, 10% or 100% of their labels from scratch, by a linear probe, or by a full fine-tune; seeds 0-2.
# About 2 hours on 2 CPU cores.
source "$(dirname "$0")/lib.sh"
keep_logs
needs_fashion_mnist
cell pre --feeds "$(for f in 0.01 0.1 1.0; do for s in 0 1 2; do printf 'probe-%s-%s ft-%s-%s ' $f $s $f $s; done; done)" python train.py --data fashion-mnist --classes 0-4 --epochs 8
for labels in "0.01 50" "0.1 15" "1.0 5"; do
  set -- $labels
  for seed in 0 1 2; do
    C=(--data fashion-mnist --classes 5-9 $(subset $1) --epochs $2 --seed $seed)
    cell scratch-$1-$seed python train.py "${C[@]}"
    cell probe-$1-$seed python finetune.py --weights "$(weights pre)" "${C[@]}" --freeze --lr 8e-3
    cell ft-$1-$seed python finetune.py --weights "$(weights pre)" "${C[@]}" --lr 2e-3 --weight-decay 0.05 --min-lr 1e-5
  done
done
report <<'PY'
rows = []
for frac, label in (("0.01", "1% (300 images, 50 epochs)"), ("0.1", "10% (3,000, 15 epochs)"), ("1.0", "100% (30,000, 5 epochs)")):
    rows.append([label] + [seeds([f"{arm}-{frac}-{s}" for s in range(3)]) for arm in ("scratch", "probe", "ft")])
print(f"pretrained on classes 0-4: {last('pre'):.2f}\n")
table(["labels of classes 5–9", "(a) from scratch", "(b) linear probe", "(c) full fine-tune"], rows)
provenance(["pre"] + [f"{a}-{f}-{s}" for a in ("scratch", "probe", "ft") for f in ("0.01", "0.1", "1.0") for s in range(3)])
PY
