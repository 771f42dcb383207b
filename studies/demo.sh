#!/usr/bin/env bash
# The default job, `python train.py` (bundled Fashion-MNIST subset, 36 epochs, DeiT's full recipe), and two of
# its demo defaults undone: augmentation reduced to flips, and then DeiT's 4-px padded crop put back.
# RESULTS.md "The default job". About 15 minutes on 2 CPU cores.
source "$(dirname "$0")/lib.sh"
cell default python train.py
cell flips-only python train.py --aa none --reprob 0 --mixup 0 --cutmix 0
cell flips-only-crop-pad-4 python train.py --aa none --reprob 0 --mixup 0 --cutmix 0 --crop-pad 4
report <<'PY'
import json
def row(name, command):
    log = [json.loads(l) for l in open(f"{OUT}/{name}/log.jsonl")]
    t = sum(r["epoch_time"] for r in log)
    return [f"`{command}`", f"{log[-1]['top1']:.2f}", f"{log[-1]['top5']:.2f}",
            f"{int(t // 60)} min {int(t % 60)} s", f"{sum(r['img_per_s'] for r in log) / len(log):,.0f}"]
table(["command", "top-1", "top-5", "time in training steps", "images/s"],
      [row("default", "python train.py"),
       row("flips-only", "python train.py --aa none --reprob 0 --mixup 0 --cutmix 0"),
       row("flips-only-crop-pad-4", "... --crop-pad 4")])
machine()
PY
