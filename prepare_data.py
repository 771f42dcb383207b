"""
Make the bundled data (a Fashion-MNIST subset and its teacher) or a JPEG folder for the image-file benchmark and tests.

Fashion-MNIST (Xiao, Rasul, Vollgraf 2017; MIT licence): apt-get install -y dataset-fashion-mnist puts its four idx
files in /usr/share/datasets/fashion-mnist/. The stratified subset is written in the same gzipped idx format, so
train.py reads it and the full set with one reader; gzip's timestamp is zeroed, so a rerun writes identical bytes.

    python prepare_data.py                      # 1000 train + 200 test images per class (~4 MB)
    python prepare_data.py --jpegs out/jpegs    # 160 train + 40 val JPEGs from data/photos/ (or --photos DIR)
    python prepare_data.py --teacher            # data/teachers/convnet-bundled.pt: the bundled data's teacher

The JPEG folder: each photograph is a class; each file is a random crop of it (30-100% of the area, aspect 4:3, 3:4, 3:2
or 1:1) rescaled to a shorter side of 300-500 px and saved at quality 75-95, as ImageNet's files mostly are. Larger
photographs give sharper files (apt-get install -y mate-backgrounds, then --photos /usr/share/backgrounds/mate/nature).
"""

import argparse
import gzip
import os
import struct

import numpy as np

from data import BUNDLED, BUNDLED_TEACHER, DEBIAN_FMNIST, FILES, HERE, find_idx, read_idx


def write_idx(path, arr):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes())


def stratified(labels, per_class, rng):
    """Indices of per_class images of every class, in a random order."""
    idx = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)])
    return rng.permutation(idx)


PHOTOS = os.path.join(HERE, "data", "photos")
# The bundled data's teacher (`train.py --distill hard`): distill.py's convnet with flips only (no RandAugment, erasing
# or Mixup/CutMix: a convnet needs no help to learn 28-px garments). Same torch, same weights; RESULTS.md: its accuracy.
TEACHER_ARGS = ["--data", "bundled", "--model", "convnet", "--epochs", "8", "--aa", "none", "--reprob", "0",
                "--mixup", "0", "--cutmix", "0", "--seed", "0"]


def make_teacher(path=BUNDLED_TEACHER):
    """Train the teacher with train.py, keeping what a teacher needs (1.2 MB, not 4.7 with the optimizer and EMA)."""
    import tempfile
    import torch
    import train
    with tempfile.TemporaryDirectory() as tmp:
        train.main(TEACHER_ARGS + ["--out-dir", tmp])
        ckpt = torch.load(os.path.join(tmp, "ckpt.pt"), weights_only=True)
        with open(os.path.join(tmp, "log.jsonl")) as f:
            top1 = [line for line in f][-1]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    keep = {k: ckpt[k] for k in ("model", "config", "model_config", "num_classes", "mean", "std", "epoch")}
    torch.save({**keep, "config": {**keep["config"], "out_dir": None}}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path, top1


def make_jpeg_folder(out, photos=PHOTOS, n_train=160, n_val=40, seed=0, short=(300, 500)):
    """JPEG crops of photos as an ImageFolder (train/, val/), the same files for the same seed; returns their paths."""
    from PIL import Image
    names = sorted(f for f in os.listdir(photos) if f.lower().endswith((".jpg", ".jpeg", ".png")))
    if not names:
        raise SystemExit(f"error: no .jpg or .png photographs in {photos}")
    rng, written = np.random.default_rng(seed), []
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            name = names[i % len(names)]
            with Image.open(os.path.join(photos, name)) as src:
                im = src.convert("RGB")
            aspect = rng.choice([4 / 3, 3 / 4, 3 / 2, 1.0])
            area = rng.uniform(0.3, 1.0) * im.width * im.height
            w = min(im.width, round((area * aspect) ** 0.5))
            h = min(im.height, round(w / aspect))
            left, top = rng.integers(0, im.width - w + 1), rng.integers(0, im.height - h + 1)
            s = rng.integers(short[0], short[1] + 1)
            size = (s, round(s * h / w)) if w <= h else (round(s * w / h), s)
            im = im.resize(size, Image.BICUBIC, box=(left, top, left + w, top + h))
            folder = os.path.join(out, split, os.path.splitext(name)[0])
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"{i:05d}.jpg")
            im.save(path, quality=int(rng.integers(75, 96)))
            written.append(path)
    return written


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jpegs", default=None, metavar="OUT", help="make an ImageNet-like JPEG folder in OUT instead")
    p.add_argument("--teacher", action="store_true", help=f"train the bundled data's teacher into {BUNDLED_TEACHER} instead")
    p.add_argument("--photos", default=PHOTOS, help="the photographs for --jpegs (.jpg/.png, one class each)")
    p.add_argument("--n-train", type=int, default=160, help="--jpegs: training files")
    p.add_argument("--n-val", type=int, default=40, help="--jpegs: held-out files")
    p.add_argument("--src", default=DEBIAN_FMNIST, help="folder with the four Fashion-MNIST idx files")
    p.add_argument("--out", default=BUNDLED)
    p.add_argument("--train-per-class", type=int, default=1000)
    p.add_argument("--test-per-class", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.teacher:
        path, last = make_teacher()
        print(f"teacher -> {path}; its last epoch: {last.strip()}")
    elif args.jpegs:
        paths = make_jpeg_folder(args.jpegs, args.photos, args.n_train, args.n_val, args.seed)
        print(f"{len(paths)} JPEGs from {args.photos} -> {args.jpegs}")
    else:
        rng = np.random.default_rng(args.seed)
        os.makedirs(args.out, exist_ok=True)
        for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
            paths = [find_idx(args.src, name) for name in FILES[split]]
            if None in paths:
                raise SystemExit(f"error: no Fashion-MNIST idx files in {args.src}; "
                                 "install them with: apt-get install -y dataset-fashion-mnist")
            images, labels = (read_idx(path) for path in paths)
            keep = stratified(labels, per_class, rng)
            for name, arr in zip(FILES[split], (images[keep], labels[keep])):
                write_idx(os.path.join(args.out, name + ".gz"), arr)
            print(f"{split}: {len(keep)} images ({per_class} per class) -> {args.out}")


if __name__ == "__main__":
    main()
