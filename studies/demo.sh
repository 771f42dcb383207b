#!/usr/bin/env bash
# The default job, `python train.py` (bundled Fashion-MNIST subset, 36 epochs, DeiT's full recipe), and two of
# its demo defaults undone: augmentation reduced to flips, and then DeiT's 4-px padded crop put back.
# RESULTS.md "The default job". About 15 minutes on 2 CPU cores.
source "$(dirname "$0")/lib.sh"
keep_logs
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
provenance(["default", "flips-only", "flips-only-crop-pad-4"])
PY
# the README's picture: 16 bundled training images, and the same after one step of DeiT's recipe
python - <<'PY'
import numpy as np, torch, torch.nn.functional as F, torchvision.utils
import augment as A, data as D
(x, y), _ = D.load_idx_folder(D.BUNDLED)
mean, std = (0.2860,), (0.3530,)
aug, _ = A.deit_augment(x[:16], y[:16], np.random.default_rng(1), torch.Generator().manual_seed(0), num_classes=10,
                        mean=mean, std=std, crop_pad=0)
grid = torch.cat([x[:16].float() / 255, (aug * std[0] + mean[0]).clamp(0, 1)])
torchvision.utils.save_image(F.interpolate(grid, scale_factor=3, mode="nearest"), "assets/recipe.png", nrow=16,
                             padding=3, pad_value=1)
PY
