#!/usr/bin/env bash
# Every speed figure of RESULTS.md "Speed" in one run of bench.py (train and evaluation images/s, the
# augmentation beside the reference's PIL path, the image-file paths; on CUDA also MFU, waits per step, timm
# and training from JPEGs). A minute on a 2-core CPU, under 10 minutes on an H100/H200.
source "$(dirname "$0")/lib.sh"
python bench.py --json "$OUT/bench.json"
