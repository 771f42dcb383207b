#!/usr/bin/env bash
# Every speed figure of RESULTS.md "Speed" in one run of bench.py (train and evaluation images/s, the
# augmentation beside the reference's PIL path, the image-file paths; on CUDA also MFU, waits per step, timm
# and training from JPEGs). Two minutes on a 2-core CPU, under 10 minutes on an H100/H200. Each device's run is kept
# as studies/logs/speed/DEVICE.json (bench.py's figures) and DEVICE.txt (its printed output), and skipped when
# kept (delete the file to measure again); the tables are printed from every kept JSON. On a lent machine whose
# files come back only from $OUT: `bash studies/speed.sh && cp studies/logs/speed/* "$OUT"/`.
source "$(dirname "$0")/lib.sh"
keep_logs
device=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-') if torch.cuda.is_available() else 'cpu')")
if [ ! -f "$LOGS/$device.json" ]; then
  ran > "$RUNS/$device.txt"
  python bench.py --json "$RUNS/$device.json" >> "$RUNS/$device.txt"
  [ "$LOGS" = "$RUNS" ] || cp "$RUNS/$device.json" "$RUNS/$device.txt" "$LOGS/"
fi
report <<'PY'
import glob
n = lambda v, f="{:,.0f}": "—" if v is None else f.format(v)
for path in sorted(glob.glob(f"{OUT}/*.json")):
    b = json.load(open(path))
    print(f"\n### {b['device']}, torch {b['torch']}, JPEG decoder {b.get('jpeg decoder', 'not recorded')}, "
          f"Pillow {b.get('pillow', 'not recorded')}\n")
    table(["model", "img", "batch", "(a) model alone", "(b) + augmentation", "(c) + hard distillation", "(d) evaluation",
           "(b)/(a)", "MFU (a)", "waits per step (b)", "timm (a)"],
          [[f"`{r['model']}`", r["img"], r["batch"], n(r.get("(a) model alone")), n(r.get("(b) + augmentation")),
            n(r.get("(c) + hard distillation")), n(r.get("(d) evaluation")),
            f"{r['(b) + augmentation'] / r['(a) model alone']:.2f}", n(r.get("MFU (a)"), "{:.2f}"),
            n(r.get("waits per step (b)"), "{:.0f}"), n(r.get("timm (a)"))] for r in b["train"]])
    print()
    table(["augmentation", "device", "images/s", "CPU ms / image"],
          [[r["augmentation"], r["device"], n(r["images/s"]), f"{r['CPU ms/image']:.2f}"] for r in b["augmentation"]])
    print()
    table(["per training image, in one worker", "CPU ms", "cheaper than the reference"],
          [[r["path"], f"{r['CPU ms/image']:.2f}", f"{r['vs reference']:.1f}×"] for r in b["image files"]])
    if b.get("detect"):
        print()
        table(["detect.py's training step", "batch", "images/s", "waits per step"],
              [[r["detector"], r["batch"], n(r["images/s"], "{:,.1f}"), r["waits"]] for r in b["detect"]])
    if b["train from JPEGs"]:
        print()
        table(["DeiT-S from JPEGs, full recipe", "workers", "images/s"],
              [[r["decode"], r["workers"], n(r["images/s"])] for r in b["train from JPEGs"]])
    print("\nran " + open(path[:-5] + ".txt").readline()[len("# ran "):].strip())  # lib.sh's head line
PY
