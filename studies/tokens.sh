#!/usr/bin/env bash
# What the distillation token learns (RESULTS.md "The distillation token"; paper §5): a convnet teacher, a
# hard-distilled nano student, and the same student whose dist token learns the labels (--distill labels:
# the paper's second class token), 10 epochs each on the full Fashion-MNIST; then studies/tokens.py: the
# cosine of the two tokens through the network, and where they look. About 30 minutes on 2 CPU cores.
source "$(dirname "$0")/lib.sh"
needs_fashion_mnist
S=(--data fashion-mnist --model deit_nano_distilled_patch7_28 --epochs 10)
cell teacher python train.py --data fashion-mnist --model convnet --epochs 8 --aa none --reprob 0 --mixup 0 --cutmix 0
cell hard python train.py "${S[@]}" --distill hard --teacher "$OUT/teacher/ckpt.pt"
cell labels python train.py "${S[@]}" --distill labels
python studies/tokens.py "$OUT"
[ "${QUICK:-0}" = 1 ] || cp "$OUT/token-cosine.png" "$OUT/token-attention.png" assets/
report <<'PY'
machine()
PY
