#!/usr/bin/env bash
# Paper Table 3 and §4 "Distillation token" at CPU size (RESULTS.md "Distillation" and "The distillation token"):
# a convnet teacher (8 epochs, flips only), then the distilled nano student (5 epochs of DeiT's recipe) without
# distillation, with soft (the paper's tau 3, alpha 0.1), with hard distillation, and with a second class token
# (--distill labels: the dist token learns the labels; the paper's control), seeds 0-2, on the full
# Fashion-MNIST; the shipped teacher's accuracy; then studies/tokens.py on seed 0's hard and labels students:
# the cosine of the two tokens through the network and where they look. About 4 hours on one CPU core.
source "$(dirname "$0")/lib.sh"
keep_logs
needs_fashion_mnist
[ -f "$LOGS/shipped-teacher.txt" ] || { ran; python train.py --eval-only --ckpt data/teachers/convnet-bundled.pt; } \
  > "$LOGS/shipped-teacher.txt"
cell teacher --feeds "$(printf 'soft-%s hard-%s ' 0 0 1 1 2 2) tokens" python train.py --data fashion-mnist \
  --model convnet --epochs 8 --aa none --reprob 0 --mixup 0 --cutmix 0
for seed in 0 1 2; do
  S=(--data fashion-mnist --model deit_nano_distilled_patch7_28 --epochs 5 --seed $seed)
  feeds=; [ $seed = 0 ] && feeds=tokens  # seed 0's students feed the token measurements
  cell none-$seed python train.py "${S[@]}"
  cell soft-$seed python train.py "${S[@]}" --distill soft --distill-tau 3 --distill-alpha 0.1 --teacher "$(weights teacher)"
  cell hard-$seed --feeds "$feeds" python train.py "${S[@]}" --distill hard --teacher "$(weights teacher)"
  cell labels-$seed --feeds "$feeds" python train.py "${S[@]}" --distill labels
done
[ -f "$LOGS/tokens/log.jsonl" ] || [ ! -f "$(weights labels-0)" ] || python studies/tokens.py "$LOGS"
report <<'PY'
print(f"shipped teacher (data/teachers/convnet-bundled.pt) on the 2,000 bundled test images: {evaluated('shipped-teacher'):.2f}\n")
arm = lambda kind, key: seeds([f"{kind}-{s}" for s in range(3)], key)
table(["student", "class + dist heads (what it predicts)", "class head alone", "dist head alone"],
      [["teacher: `convnet`", f"{last('teacher'):.2f}" if kept("teacher") else "running", "", ""],
       ["no distillation", arm("none", "top1"), arm("none", "top1_cls"), "—"],
       ["soft distillation", arm("soft", "top1"), arm("soft", "top1_cls"), arm("soft", "top1_dist")],
       ["hard distillation", arm("hard", "top1"), arm("hard", "top1_cls"), arm("hard", "top1_dist")],
       ["a second class token (`--distill labels`)", arm("labels", "top1"), arm("labels", "top1_cls"), arm("labels", "top1_dist")]])
runs = lambda k: [curve(f"{k}-{s}", "epoch_time") for s in range(3) if kept(f"{k}-{s}")]
print("\nseconds per epoch, the mean over the seeds run: " + ", ".join(
    f"{k} {sum(sum(c.values()) / len(c) for c in runs(k)) / len(runs(k)):.0f}" for k in ("none", "soft", "hard", "labels") if runs(k)))
print()
provenance(["teacher"] + [f"{k}-{s}" for k in ("none", "soft", "hard", "labels") for s in range(3)])
PY
[ ! -f "$LOGS/tokens/log.jsonl" ] || python studies/tokens.py --report "$LOGS" "$RUNS"
[ "${QUICK:-0}" = 1 ] || [ ! -f "$RUNS/token-cosine.png" ] || cp "$RUNS/token-cosine.png" "$LOGS/token-attention.png" assets/
