#!/usr/bin/env bash
# Paper Table 3 at CPU size (RESULTS.md "Distillation"): a convnet teacher, then the distilled nano student
# without distillation, with soft (the paper's tau 3, alpha 0.1) and with hard distillation, seeds 0-2, on
# the full Fashion-MNIST; and the shipped teacher's accuracy. About 1 hour on 2 CPU cores.
source "$(dirname "$0")/lib.sh"
keep_logs
needs_fashion_mnist
[ -f "$LOGS/shipped-teacher.txt" ] || python train.py --eval-only --ckpt data/teachers/convnet-bundled.pt > "$LOGS/shipped-teacher.txt"
cell teacher --feeds "$(printf 'soft-%s hard-%s ' 0 0 1 1 2 2)" python train.py --data fashion-mnist --model convnet --epochs 8 --aa none --reprob 0 --mixup 0 --cutmix 0
for seed in 0 1 2; do
  S=(--data fashion-mnist --model deit_nano_distilled_patch7_28 --epochs 5 --seed $seed)
  cell none-$seed python train.py "${S[@]}"
  cell soft-$seed python train.py "${S[@]}" --distill soft --distill-tau 3 --distill-alpha 0.1 --teacher "$(weights teacher)"
  cell hard-$seed python train.py "${S[@]}" --distill hard --teacher "$(weights teacher)"
done
report <<'PY'
print(f"shipped teacher (data/teachers/convnet-bundled.pt) on the 2,000 bundled test images: {evaluated('shipped-teacher'):.2f}\n")
arm = lambda kind, key: seeds([f"{kind}-{s}" for s in range(3)], key)
table(["student", "class + dist heads (what it predicts)", "class head alone", "dist head alone"],
      [["teacher: `convnet`", f"{last('teacher'):.2f}", "", ""],
       ["no distillation", arm("none", "top1"), arm("none", "top1_cls"), "—"],
       ["soft distillation", arm("soft", "top1"), arm("soft", "top1_cls"), arm("soft", "top1_dist")],
       ["hard distillation", arm("hard", "top1"), arm("hard", "top1_cls"), arm("hard", "top1_dist")]])
provenance(["teacher"] + [f"{k}-{s}" for k in ("none", "soft", "hard") for s in range(3)])
PY
