#!/usr/bin/env bash
# What the distillation token learns (RESULTS.md "The distillation token"; paper §5): a convnet teacher, a
# hard-distilled nano student, and the same student whose dist token learns the labels (--distill labels:
# the paper's second class token), 10 epochs each on the full Fashion-MNIST; then studies/tokens.py: the
# cosine of the two tokens through the network, and where they look, measured once from the cells' kept
# weights into studies/logs/tokens/. About 30 minutes on 2 CPU cores.
source "$(dirname "$0")/lib.sh"
keep_logs
needs_fashion_mnist
S=(--data fashion-mnist --model deit_nano_distilled_patch7_28 --epochs 10)
cell teacher --feeds "hard tokens" python train.py --data fashion-mnist --model convnet --epochs 8 --aa none --reprob 0 \
  --mixup 0 --cutmix 0
cell hard --feeds tokens python train.py "${S[@]}" --distill hard --teacher "$(weights teacher)"
cell labels --feeds tokens python train.py "${S[@]}" --distill labels
[ -f "$LOGS/tokens/log.jsonl" ] || python studies/tokens.py "$LOGS"
python studies/tokens.py --report "$LOGS" "$RUNS"
[ "${QUICK:-0}" = 1 ] || cp "$RUNS/token-cosine.png" "$LOGS/token-attention.png" assets/
report <<'PY'
provenance(["teacher", "hard", "labels"])
PY
