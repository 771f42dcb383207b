"""
Benchmark: DeiT's training augmentation, batched on a device (augment.py) against the same ops image by
image in PIL (what the reference pipeline does in its DataLoader workers).

    python bench_augment.py                  # CPU, and the GPU too when there is one
    python bench_augment.py --batch 256 --size 224 --steps 5

Both start from decoded 256x256 RGB images and do RandomResizedCrop to 224 + flip + RandAugment
(rand-m9-mstd0.5-inc1) + normalise + random erasing (p 0.25); the batched recipe also does Mixup/CutMix.
"after the crop" rows start from 224-px images, as train.py does for image files, which its DataLoader
workers decode and crop one by one in PIL (the one per-image step; the PIL row pays it too).
Reported: images/s (wall clock) and CPU seconds per image (process time over all threads).
Results: README.md ("Augmentation benchmark").
"""

import argparse
import random
import time

import numpy as np
import torch

import augment as A

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FILL = (124, 116, 104)


def pil_op(name, im, arg, fill=FILL):
    """One RandAugment op as the reference pipeline does it, in PIL (the tests compare augment.py with it)."""
    from PIL import Image, ImageEnhance, ImageOps
    if name == "AutoContrast":
        return ImageOps.autocontrast(im)
    if name == "Equalize":
        return ImageOps.equalize(im)
    if name == "Invert":
        return ImageOps.invert(im)
    if name == "PosterizeIncreasing":
        return ImageOps.posterize(im, int(arg)) if int(arg) > 0 else Image.new("RGB", im.size)
    if name == "SolarizeIncreasing":
        return ImageOps.solarize(im, arg)
    if name == "SolarizeAdd":
        return im.point([min(255, i + int(arg)) if i < 128 else i for i in range(256)] * 3)
    enhance = {"ColorIncreasing": ImageEnhance.Color, "ContrastIncreasing": ImageEnhance.Contrast,
               "BrightnessIncreasing": ImageEnhance.Brightness, "SharpnessIncreasing": ImageEnhance.Sharpness}
    if name in enhance:
        return enhance[name](im).enhance(arg)
    if name == "Rotate":
        return im.rotate(arg, resample=Image.BICUBIC, fillcolor=fill)
    matrix = {"ShearX": (1, arg, 0, 0, 1, 0), "ShearY": (1, 0, 0, arg, 1, 0),
              "TranslateXRel": (1, 0, arg, 0, 1, 0), "TranslateYRel": (1, 0, 0, 0, 1, arg)}[name]
    return im.transform(im.size, Image.AFFINE, matrix, resample=Image.BICUBIC, fillcolor=fill)


def pil_pipeline(images, size):
    """The reference's per-image path: PIL crop/flip/RandAugment, to tensor, normalise, erase."""
    from PIL import Image
    gen = torch.Generator().manual_seed(0)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    out = []
    for im in images:
        t, l, h, w = (int(v) for v in A.sample_boxes(gen, 1, im.height, im.width, (0.08, 1), (3 / 4, 4 / 3)))
        im = im.resize((size, size), Image.BICUBIC, box=(l, t, l + w, t + h))
        if random.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        for _ in range(2):
            if random.random() < 0.5:
                name = random.choice(A.OP_NAMES)
                level = min(max(random.gauss(9, 0.5), 0), 10) / 10
                im = pil_op(name, im, A.op_argument(name, level, random.choice((-1, 1)), size, size).item())
        x = (torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255 - mean) / std
        out.append(A.random_erasing(x[None], gen, 0.25)[0])
    return torch.stack(out)


def batched_pipeline(x, size, gen, num_classes=1000):
    y = torch.randint(0, num_classes, (x.shape[0],), device=x.device)
    # tensors held on the device (small datasets): the crop too; image files: cropped in PIL, flipped here
    x = A.random_resized_crop(x, gen, size) if x.shape[-1] != size else A.pad_crop_flip(x, gen, 0)
    x = A.rand_augment(x, gen, fill=FILL)
    x = A.normalize(x, MEAN, STD)
    x = A.random_erasing(x, gen, 0.25)
    return A.mixup_cutmix(x, y, num_classes, gen)


def timed(fn, n_images, steps, sync=lambda: None):
    fn()  # warm-up
    sync()
    t, c = time.perf_counter(), time.process_time()
    for _ in range(steps):
        fn()
    sync()
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    return n_images * steps / wall, cpu / (n_images * steps)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--pil-images", type=int, default=64)
    args = p.parse_args()
    from PIL import Image
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (args.batch, 3, 256, 256), dtype=np.uint8)
    rows = []
    pil_images = [Image.fromarray(a.transpose(1, 2, 0)) for a in src[:args.pil_images]]
    rate, cpu = timed(lambda: pil_pipeline(pil_images, args.size), len(pil_images), args.steps)
    rows.append(("PIL, per image (reference path)", "cpu, 1 process", rate, cpu))
    x = torch.from_numpy(src)
    x_cropped = x[:, :, :args.size, :args.size].contiguous()  # as if PIL had cropped the files
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    for n in sorted({threads, 1}, reverse=True):  # 1 thread: the CPU time without splitting ops across threads
        torch.set_num_threads(n)
        rate, cpu = timed(lambda: batched_pipeline(x, args.size, gen), args.batch, args.steps)
        rows.append(("augment.py, batched, crop included", f"cpu, {n} thread(s)", rate, cpu))
        rate, cpu = timed(lambda: batched_pipeline(x_cropped, args.size, gen), args.batch, args.steps)
        rows.append(("augment.py, batched, after the crop", f"cpu, {n} thread(s)", rate, cpu))
    torch.set_num_threads(threads)
    if torch.cuda.is_available():
        xg, gg = x.cuda(), torch.Generator("cuda").manual_seed(0)
        for name, inp in (("crop included", xg), ("after the crop", xg[:, :, :args.size, :args.size].contiguous())):
            rate, cpu = timed(lambda: batched_pipeline(inp, args.size, gg), args.batch, max(args.steps, 20), torch.cuda.synchronize)
            rows.append((f"augment.py, batched, {name}", torch.cuda.get_device_name(), rate, cpu))
    print(f"\n{args.size}px, batch {args.batch}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"{'pipeline':40s} {'device':24s} {'images/s':>10s} {'CPU ms/image':>13s}")
    for name, dev, rate, cpu in rows:
        print(f"{name:40s} {dev:24s} {rate:10.0f} {1000 * cpu:13.2f}")


if __name__ == "__main__":
    main()
