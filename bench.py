"""
Benchmark: how fast train.py trains and evaluates DeiT on whatever device exists, every figure in one run.

    python bench.py                        # CUDA: DeiT-Ti/S/B at 224 (< 8 min on an H100/H200); CPU: a minute
    python bench.py --models deit_small_patch16_224 --steps 50 --compare all

Per model, train images/s of train.py's own step (train.train_step: forward, backward, fused AdamW, EMA),
with the device's defaults (CUDA: bf16 autocast and torch.compile; CPU: fp32 eager):
  (a) the model alone, on a uint8 batch already on the device (normalised, nothing else);
  (b) + DeiT's full augmentation (crop, flip, RandAugment, erasing, Mixup/CutMix; augment.deit_augment);
  (c) + hard distillation from a teacher (regnet_y_16gf, DeiT's, with random weights: no download; --compare);
  (d) evaluation (train.evaluate);
on CUDA the model FLOP utilisation of (a) and how often one step (b) waits for the GPU; with timm importable
(never required), timm's DeiT in (a)'s setting, as a ratio. Then the augmentation alone at 224, batch 256, beside
the reference's per-image PIL pipeline (CPU time per image, one thread); detect.py's training step (DETECT). Then
image files (prepare_data.py --jpegs): the CPU time per training image in one DataLoader worker for the
reference's pipeline and each --decode path; on CUDA also DeiT-S trained with the full recipe from 5,120 files per
path, and the reference's data loading alone on the same workers. Results: RESULTS.md ("Speed"; studies/speed.sh).
"""

import argparse
import json
import os
import random
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

import augment as A
import data as DT
import distill as D
import train as T
from data import IMAGENET_MEAN as MEAN, IMAGENET_STD as STD
from launch import setup_distributed

FILL = (124, 116, 104)
# bf16 dense peak of the chip, for MFU (spec sheets); an unknown chip gets no MFU
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
# (model, image size, batch) per device: DeiT's sizes on CUDA; on a CPU the default job and a small DeiT-Ti
CONFIGS = {"cuda": [("deit_tiny_patch16_224", 224, 256), ("deit_small_patch16_224", 224, 256),
                    ("deit_base_patch16_224", 224, 256)],
           "cpu": [("deit_nano_patch7_28", 28, 128), ("deit_tiny_patch16_224", 224, 16)]}
# detect.py's step (model, image size, pyramid width, batch): the ViT backbone and the ResNet-FPN it replaces
DETECT = {"cuda": [("deit_small_patch16_224", 224, 256, 16), ("resnet50", 224, 256, 16)],
          "cpu": [("deit_nano_patch4_28", 64, 64, 8), ("resnet18", 64, 64, 8)]}


def pil_op(name, im, arg, fill=FILL):
    """One RandAugment op as the reference pipeline does it, in PIL (the tests compare augment.py with it)."""
    affine = lambda *matrix: im.transform(im.size, Image.AFFINE, matrix, resample=Image.BICUBIC, fillcolor=fill)
    ops = {"AutoContrast": lambda: ImageOps.autocontrast(im), "Equalize": lambda: ImageOps.equalize(im),
           "Invert": lambda: ImageOps.invert(im), "SolarizeIncreasing": lambda: ImageOps.solarize(im, arg),
           "PosterizeIncreasing": lambda: (ImageOps.posterize(im, int(arg)) if int(arg) > 0
                                           else Image.new("RGB", im.size)),
           "SolarizeAdd": lambda: im.point([min(255, i + int(arg)) if i < 128 else i for i in range(256)] * 3),
           "ColorIncreasing": lambda: ImageEnhance.Color(im).enhance(arg),
           "ContrastIncreasing": lambda: ImageEnhance.Contrast(im).enhance(arg),
           "BrightnessIncreasing": lambda: ImageEnhance.Brightness(im).enhance(arg),
           "SharpnessIncreasing": lambda: ImageEnhance.Sharpness(im).enhance(arg),
           "Rotate": lambda: im.rotate(arg, resample=Image.BICUBIC, fillcolor=fill),
           "ShearX": lambda: affine(1, arg, 0, 0, 1, 0), "ShearY": lambda: affine(1, 0, 0, arg, 1, 0),
           "TranslateXRel": lambda: affine(1, 0, arg, 0, 1, 0), "TranslateYRel": lambda: affine(1, 0, 0, 0, 1, arg)}
    return ops[name]()


def pil_pipeline(images, size):
    """The reference's per-image path: PIL crop/flip/RandAugment, to tensor, normalise, erase."""
    rng = np.random.default_rng(0)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    out = []
    for im in images:
        t, l, h, w = (int(v[0]) for v in A.sample_boxes(rng, 1, im.height, im.width, (0.08, 1), (3 / 4, 4 / 3)))
        im = im.resize((size, size), Image.BICUBIC, box=(l, t, l + w, t + h))
        if random.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        for _ in range(2):
            if random.random() < 0.5:
                name = random.choice(A.OP_NAMES)
                level = min(max(random.gauss(9, 0.5), 0), 10) / 10
                im = pil_op(name, im, A.op_argument(name, level, random.choice((-1, 1)), size, size).item())
        x = (torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255 - mean) / std
        out.append(A.random_erasing(x[None], rng, 0.25)[0])
    return torch.stack(out)


def timed(fn, n_images, steps, device, warmup=2):
    """images/s of fn over steps calls after warm-up calls (compilation), and CPU seconds per image."""
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t, c = time.perf_counter(), time.process_time()
    for _ in range(steps):
        fn()
    sync()
    return n_images * steps / (time.perf_counter() - t), (time.process_time() - c) / (n_images * steps)


def waits(fn):  # how often fn makes the host wait for the GPU (CUDA's sync debug mode)
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def synthetic(n, size, chans, device, crop_pad=4):
    """A uint8 image batch and labels on the device, as train.py's data namespace (1000 classes)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, chans, size, size), dtype=torch.uint8, generator=g).to(device)
    y = torch.randint(0, 1000, (n,), generator=g).to(device)
    return argparse.Namespace(train=(x, y), val=(x, y), num_classes=1000, in_chans=chans, mean=MEAN[:chans],
                              std=STD[:chans], tensors=True, crop_pad=crop_pad, skipped=[])


def model_row(name, size, batch, ctx, args, out_dir):
    """(a)-(d), and on CUDA MFU and waits, and the timm ratio for one model: a dict."""
    chans = 1 if size <= 32 else 3  # the default job trains on greyscale Fashion-MNIST
    data = synthetic(batch, size, chans, ctx.device, crop_pad=0 if chans == 1 else 4)
    x, y = data.train
    off = ["--aa", "none", "--reprob", "0", "--mixup", "0", "--cutmix", "0", "--hflip", "0"]

    def parse(model_name, *extra):  # train.py's flags (DeiT's recipe by default) for this model and batch
        return T.get_parser().parse_args(["--model", model_name, "--img-size", str(size), "--batch-size", str(batch),
                                          "--out-dir", tempfile.mkdtemp(dir=out_dir), *extra])

    def run_for(model_name, extra, teacher=None, model=None):
        targs = parse(model_name, *extra)
        model = model if model is not None else T.build_model(targs, data, ctx, size)
        return targs, T.start_run(targs, ctx, model, data, teacher, log=lambda *a: None)

    def step_rate(targs, run, d=data):  # the step with targs' augmentation of d's kind
        run.augment = T.augmentation(targs, d)
        return timed(lambda: T.train_step(targs, ctx, run, x, y, 0), batch, args.steps, ctx.device)[0]

    # (a): data already cropped (tensors=False: as if decoded and cropped by workers), every augmentation off
    plain = argparse.Namespace(**{**vars(data), "tensors": False})
    targs, run = run_for(name, off)
    a = step_rate(targs, run, plain)
    row = {"model": name, "img": size, "batch": batch, "(a) model alone": a}
    if ctx.device.type == "cuda":
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as fc, ctx.autocast:  # forward + backward of one batch
            F.cross_entropy(run.model(A.normalize(x, data.mean, data.std)), y).backward()
        peak = next((v for k, v in PEAK_FLOPS.items() if k in torch.cuda.get_device_name()), None)
        row["MFU (a)"] = fc.get_total_flops() * a / batch / peak if peak else None
    full_args = parse(name)
    row["(b) + augmentation"] = step_rate(full_args, run)
    if ctx.device.type == "cuda":
        row["waits per step (b)"] = waits(lambda: T.train_step(full_args, ctx, run, x, y, 1))
    row["(d) evaluation"] = timed(lambda: T.evaluate(run.net, data, ctx, batch), batch, args.steps, ctx.device)[0]
    del run
    if args.compare in ("all", name):  # (c): the distilled variant of the model, taught by DeiT's teacher
        import torchvision
        row["teacher"] = "convnet" if chans == 1 else "regnet_y_16gf"
        teacher = (D.create_convnet("convnet", 1000, 1) if chans == 1 else
                   torchvision.models.regnet_y_16gf(weights=None, num_classes=1000))
        size_name = name.split("_")[1]
        targs, run = run_for(name.replace(f"_{size_name}_", f"_{size_name}_distilled_"), ["--distill", "hard"], teacher)
        row["(c) + hard distillation"] = step_rate(targs, run)
        del run
    try:
        import timm
    except ImportError:
        timm = None
    if timm is not None and chans == 3 and args.compare in ("all", name):  # timm's DeiT: train.py's step, its model
        tm = timm.create_model(name, num_classes=1000).to(ctx.device)
        targs, run = run_for(name, off, model=tm)
        row["timm (a)"] = step_rate(targs, run, plain)
        row["ours / timm (a)"] = a / row["timm (a)"]
        del run
    return row


def detect_rows(ctx, steps):
    """detect.py's training step (train.train_step with its task) on composed scenes, device defaults: images/s."""
    import detect as DET
    rows = []
    for model, size, width, batch in DETECT[ctx.device.type]:
        args = DET.get_parser().parse_args(["--model", model, "--img-size", str(size), "--fpn-channels", str(width),
                                            "--scenes", str(4 * batch), "--val-scenes", "4", "--batch-size", str(batch),
                                            "--out-dir", tempfile.mkdtemp()])
        data = DET.load_data(args, ctx.device)
        det = DET.Detector(DET.build_backbone(args, data.in_chans, print), data.num_classes, size, data.mean, data.std,
                           model=model).to(ctx.device)
        run = T.start_run(args, ctx, det, data, None, lambda *a: None, DET.detection_task(args, data))
        x, index = data.train[0][:batch], data.train[1][:batch]
        step = lambda i: T.train_step(args, ctx, run, x, index, i)  # noqa: E731
        rows.append({"detector": f"Faster R-CNN, {model}, {size} px, pyramid {width}", "batch": batch,
                     "images/s": timed(lambda: step(0), batch, steps, ctx.device)[0],
                     "waits": waits(lambda: step(1)) if ctx.device.type == "cuda" else "-"})
    return rows


def augmentation_rows(ctx, steps):
    """DeiT's augmentation alone: ours on the device, crop included (tensor data) or not (image files), and PIL's."""
    args = T.get_parser().parse_args([])
    src = synthetic(256, 256, 3, ctx.device)
    x256, y = src.train
    rows = []
    for label, x, tensors in (("crop included", x256, True), ("after the crop", x256[..., :224, :224].contiguous(), False)):
        data = argparse.Namespace(**{**vars(src), "tensors": tensors})
        rng, gen = np.random.default_rng(0), torch.Generator(ctx.device).manual_seed(0)
        rate, cpu = timed(lambda: T.augmentation(args, data)(x, y, rng, gen), 256, steps, ctx.device)
        rows.append({"augmentation": f"augment.py, batch 256, {label}", "device": ctx.device.type,
                     "images/s": rate, "CPU ms/image": 1000 * cpu})
    pil = [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in x256[:64]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one DataLoader worker's share
    rate, cpu = timed(lambda: pil_pipeline(pil, 224), len(pil), 2, torch.device("cpu"), warmup=1)
    torch.set_num_threads(threads)
    rows.append({"augmentation": "PIL, per image (the reference's path)", "device": "cpu, 1 thread",
                 "images/s": rate, "CPU ms/image": 1000 * cpu})
    return rows


def jpeg_folder(n_train, photos=None):
    """An ImageNet-like JPEG folder in out/ (prepare_data.py --jpegs), made once; mate's photos are larger, sharper."""
    from prepare_data import PHOTOS, make_jpeg_folder
    mate = "/usr/share/backgrounds/mate/nature"
    photos = photos or (mate if os.path.isdir(mate) else PHOTOS)
    root = os.path.join("out", f"jpegs-{n_train}-{os.path.basename(os.path.normpath(photos))}")
    if not os.path.isdir(os.path.join(root, "val")):
        print(f"  making {n_train} JPEGs from {photos} in {root}", flush=True)
        make_jpeg_folder(root + ".tmp", photos, n_train, 64)
        os.replace(root + ".tmp", root)
    return root


def jpeg_worker_rows(root):
    """CPU time per training image in one DataLoader worker (one thread), per pipeline, on the same files."""
    train = os.path.join(root, "train")
    pipelines = {"reference: PIL decode + per-image augmentation": ReferenceFiles(root),
                 "workers path: decode + crop (data.py)": DT.ImageFiles(train, 224, True, "workers"),
                 "workers path, PIL decoding only": DT.ImageFiles(train, 224, True, "workers")}
    pipelines["workers path, PIL decoding only"].tensor_decode = False
    if DT.device_decoder()[0]:
        pipelines["device path, worker side: bytes + box"] = DT.ImageFiles(train, 224, True, "device")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    for name, files in pipelines.items():
        files[0]  # warm-up
        c = time.process_time()
        for i in range(len(files)):
            files[i]
        rows.append({"path": name, "CPU ms/image": 1000 * (time.process_time() - c) / len(files)})
    torch.set_num_threads(threads)
    return [{**r, "vs reference": rows[0]["CPU ms/image"] / r["CPU ms/image"]} for r in rows]


class ReferenceFiles(DT.ImageFiles):
    """The reference's data loading, per image in the workers: PIL decode and pil_pipeline."""

    def __init__(self, root):
        super().__init__(os.path.join(root, "train"), 224, True, "workers")

    def __getitem__(self, i):
        path, y = self.samples[i]
        return pil_pipeline([Image.open(path).convert("RGB")], 224)[0], y


def jpeg_train_rows(ctx, root, model, steps, workers, batch=256):
    """On CUDA: train images/s of the full recipe (train.py's step) fed from the JPEG folder, per --decode path;
    then of the reference's pipeline alone in a DataLoader on the same workers (its ceiling)."""
    sync = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)
    rows, prefetch = [], DT.prefetch
    for decode, ahead in (("device", True), ("device", False), ("workers", True)):
        # ahead False: the device decode between steps, on the training stream: what prefetch's stream buys
        DT.prefetch = prefetch if ahead else (lambda batches, device: batches)
        targs = T.get_parser().parse_args(["--model", model, "--data", root, "--decode", decode, "--workers", str(workers),
                                           "--batch-size", str(batch), "--out-dir", tempfile.mkdtemp()])
        data = T.load(targs, ctx.device, 224)
        run = T.start_run(targs, ctx, T.build_model(targs, data, ctx, 224), data, None, log=lambda *a: None)
        batches = (b for epoch in range(10 ** 9) for b in DT.train_batches(data, run.sampler, epoch, ctx.device))
        n, t = 0, time.perf_counter()
        for step, (x, y) in enumerate(batches):
            if step == 3:  # after compilation and the first workers' start
                sync()
                n, t = 0, time.perf_counter()
            if step == steps + 3:
                break
            T.train_step(targs, ctx, run, x, y, step)
            n += len(y)
        sync()
        rows.append({"decode": data.decode + ("" if ahead else ", no prefetch: on the training stream"),
                     "workers": workers, "images/s": n / (time.perf_counter() - t)})
        del run
    DT.prefetch = prefetch
    loader = torch.utils.data.DataLoader(ReferenceFiles(root), batch, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=True)
    n, t = 0, None
    for step, (x, _) in enumerate((b for epoch in range(10 ** 9) for b in loader), 1):
        if step == 2:  # after the workers' start
            n, t = 0, time.perf_counter()
        n += len(x)
        if step == steps + 2:
            break
    rows.append({"decode": "the reference's pipeline, data loading alone", "workers": workers,
                 "images/s": n / (time.perf_counter() - t)})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=None, help="model names (default: per device, see CONFIGS)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per figure (default: 20 on CUDA, 3 on CPU)")
    p.add_argument("--compare", default=None, help="the model that also gets (c) and timm's row, or 'all' (default: "
                   "deit_small_patch16_224 on CUDA, where each compiles once more; all on CPU)")
    p.add_argument("--json", default=os.path.join("out", "bench.json"))
    p.add_argument("--photos", default=None, help="photographs for the JPEG folder (default: mate-backgrounds' if "
                   "installed, else data/photos)")
    p.add_argument("--no-jpeg-train", action="store_true", help="on CUDA, skip training DeiT-S from JPEGs")
    args = p.parse_args()
    ctx = setup_distributed()
    kind = ctx.device.type
    args.steps = args.steps or (20 if kind == "cuda" else 3)
    args.compare = args.compare or ("deit_small_patch16_224" if kind == "cuda" else "all")
    configs = [c for c in CONFIGS[kind] if not args.models or c[0] in args.models]
    configs += [(m, 224, CONFIGS[kind][-1][2]) for m in args.models or [] if m not in [c[0] for c in configs]]
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    device_name = torch.cuda.get_device_name() if kind == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{device_name} | torch {torch.__version__} | compile {kind == 'cuda'} | bf16 autocast {kind == 'cuda'}")
    out_dir = tempfile.mkdtemp()
    rows = []
    for name, size, batch in configs:
        t = time.time()
        rows.append(model_row(name, size, batch, ctx, args, out_dir))
        print(f"  {name} at {size} px: {time.time() - t:.0f} s", flush=True)
    aug = augmentation_rows(ctx, args.steps)
    detect = detect_rows(ctx, args.steps)
    root = jpeg_folder(160, args.photos)
    files = jpeg_worker_rows(root)
    e2e = []
    if kind == "cuda" and not args.no_jpeg_train:
        e2e = jpeg_train_rows(ctx, jpeg_folder(5120, args.photos), "deit_small_patch16_224", args.steps * 2,
                              min(12, os.cpu_count()))
    keys = [k for k in ("(a) model alone", "(b) + augmentation", "(c) + hard distillation", "(d) evaluation",
                        "timm (a)", "ours / timm (a)", "MFU (a)", "waits per step (b)") if any(k in r for r in rows)]
    print(f"\ntrain images/s (one process), batch per row; {device_name}")
    print(f"{'model':26s} {'img':>4s} {'batch':>5s} " + " ".join(f"{k:>24s}" for k in keys) + f" {'(b)/(a)':>8s}")
    for r in rows:
        cells = [("-" if r.get(k) is None else f"{r[k]:.2f}" if k in ("ours / timm (a)", "MFU (a)") else f"{r[k]:.0f}")
                 for k in keys]
        print(f"{r['model']:26s} {r['img']:4d} {r['batch']:5d} " + " ".join(f"{c:>24s}" for c in cells)
              + f" {r['(b) + augmentation'] / r['(a) model alone']:8.2f}")
    print(f"\n{'augmentation':45s} {'device':16s} {'images/s':>10s} {'CPU ms/image':>13s}")
    for r in aug:
        print(f"{r['augmentation']:45s} {r['device']:16s} {r['images/s']:10.0f} {r['CPU ms/image']:13.2f}")
    print(f"\n{'detect.py, training (waits: per step, torchvision included)':60s} {'batch':>5s} {'images/s':>9s} waits")
    for r in detect:
        print(f"{r['detector']:60s} {r['batch']:5d} {r['images/s']:9.1f} {r['waits']}")
    print(f"\nimage files ({root}), per training image in one DataLoader worker, one thread")
    print(f"{'path':50s} {'CPU ms/image':>13s} {'vs reference':>13s}")
    for r in files:
        print(f"{r['path']:50s} {r['CPU ms/image']:13.2f} {r['vs reference']:12.1f}x")
    small = next((r for r in rows if r["model"] == "deit_small_patch16_224"), None)
    for r in e2e:
        alone = f", {r['images/s'] / small['(a) model alone']:.0%} of the model alone" if small else ""
        ref = f", {r['images/s'] / e2e[-1]['images/s']:.1f}x the reference's loading" if r is not e2e[-1] else ""
        print(f"DeiT-S full recipe from JPEGs: {r['decode']}, {r['workers']} workers: {r['images/s']:.0f} images/s{alone}{ref}")
    with open(args.json, "w") as f:
        json.dump({"device": device_name, "torch": torch.__version__, "jpeg decoder": DT.device_decoder()[0],
                   "pillow": Image.__version__, "train": rows, "augmentation": aug,
                   "detect": detect, "image files": files, "train from JPEGs": e2e}, f, indent=1)
    print(f"\nwritten: {args.json}")


if __name__ == "__main__":
    main()
