"""
Data, and the order in which each process sees it. Small datasets (Fashion-MNIST idx files, CIFAR, synthetic) live
on the device as uint8 (N, C, H, W) tensors, batched there as in airbench. Image folders (ImageNet's layout) are
read by DataLoader workers, each file one crop, decoded on the device or in the workers (below); augmentation comes
later, on the batch (augment.py). The reference: facebookresearch/deit datasets.py and samplers.py.
"""

import argparse
import functools
import gzip
import io
import math
import os
import pickle
import queue
import struct
import threading
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import augment as A

HERE = os.path.dirname(os.path.abspath(__file__))
BUNDLED = os.path.join(HERE, "data", "fashion-mnist-subset")
DEBIAN_FMNIST = "/usr/share/datasets/fashion-mnist"  # apt-get install -y dataset-fashion-mnist
# the teacher `train.py --distill hard` uses on the bundled data (made by python prepare_data.py --teacher)
BUNDLED_TEACHER = os.path.join(HERE, "data", "teachers", "convnet-bundled.pt")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)  # Fashion-MNIST's training images


FILES = {  # split -> (images, labels), the names Fashion-MNIST and MNIST ship with
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def find_idx(folder, name):
    """Path of an idx file, gzipped or not, or None."""
    paths = (os.path.join(folder, name + ".gz"), os.path.join(folder, name))
    return next((p for p in paths if os.path.isfile(p)), None)


def read_idx(path):
    """An idx file (LeCun's MNIST format: big-endian magic, dims, then uint8 data) as a numpy array."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not a uint8 idx file")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {arr.size}")
    return arr.reshape(shape)


def load_idx_folder(folder):
    def split(name):
        paths = [find_idx(folder, f) for f in FILES[name]]
        if None in paths:
            raise ValueError(f"{folder} lacks the idx files {FILES[name]} (.gz or not)")
        x, y = (torch.from_numpy(read_idx(p).copy()) for p in paths)
        return x.unsqueeze(1), y.long()  # (N, 1, 28, 28)
    return split("train"), split("test")


def load_cifar(name, root):
    """CIFAR-10/100 from the python-format batches under root, downloaded by torchvision when absent."""
    folder, files = {"cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]),
                     "cifar100": ("cifar-100-python", ["train", "test"])}[name]
    path = os.path.join(root, folder)
    if not os.path.isdir(path):
        import torchvision
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        try:
            cls(root, train=True, download=True)
        except Exception as e:
            raise ValueError(f"could not download {name} to {root} ({type(e).__name__}: {e}); offline? "
                             f"put the extracted {folder}/ folder in --data-dir {root}")
    key = "labels" if name == "cifar10" else "fine_labels"

    def read(batch_files):
        xs, ys = [], []
        for f in batch_files:
            with open(os.path.join(path, f), "rb") as fh:
                d = pickle.load(fh, encoding="latin1")  # the dataset's own format: dicts of numpy arrays
            xs.append(torch.from_numpy(d["data"]).view(-1, 3, 32, 32))
            ys.append(torch.tensor(d[key]))
        return torch.cat(xs), torch.cat(ys).long()
    return read(files[:-1]), read(files[-1:])


def parse_classes(spec, num_classes):
    try:
        keep = sorted({c for part in spec.split(",") for c in (range(int(part.split("-")[0]), int(part.split("-")[1]) + 1)
                                                               if "-" in part else [int(part)])})
    except ValueError:
        raise ValueError(f"--classes {spec!r}: expected a range such as 0-4 or a list such as 5,7,9")
    if not keep or keep[0] < 0 or keep[-1] >= num_classes:
        raise ValueError(f"--classes {spec!r}: the dataset has classes 0..{num_classes - 1}")
    return keep


def select_classes(x, y, keep):
    """The images of the classes in keep, their labels renumbered 0..len(keep)-1 in that order."""
    new = torch.full((int(y.max()) + 1,), -1, dtype=torch.long)
    new[keep] = torch.arange(len(keep))
    mask = new[y] >= 0
    return x[mask], new[y[mask]]


def stratified_subset(y, amount, seed):
    """Indices of a class-balanced part of the labels y: a fraction (in (0, 1)) or a count of images (1: one image,
    fewer than the classes, refused; never "all", which is leaving the flag out)."""
    classes = y.unique()
    if amount >= 1 and amount != int(amount):
        raise ValueError(f"--train-subset {amount:g}: a fraction below 1 (0.1) or a whole count of images (600)")
    per_class = round(amount * len(y) / len(classes)) if amount < 1 else int(amount) // len(classes)
    if per_class < 1:
        raise ValueError(f"--train-subset {amount} leaves no image per class")
    g = torch.Generator().manual_seed(seed)
    return torch.cat([(y == c).nonzero()[:, 0][torch.randperm(int((y == c).sum()), generator=g)[:per_class]]
                      for c in classes]).sort().values


def object_sides(size):
    """The sides an object takes on a size-px canvas (here and in detect.py's scenes): size/6 (8 px or more) to size/2."""
    return max(8, size // 6), size // 2


def make_canvases(x, size, seed, sides=None):
    """Each image of x (uint8 (N, C, h, w)) resized to a random side in sides (object_sides(size)) and pasted at a
    random place on a black size x size canvas: classification with a detector's geometry, objects at many scales
    and places (as ImageNet's and COCO's are), where Fashion-MNIST's fill a centred frame. Made once, from seed.
    Returns (canvases (N, C, size, size) uint8, boxes (N, 4): x0, y0, x1, y1 of each pasted image)."""
    lo, hi = sides or object_sides(size)
    g = torch.Generator().manual_seed(seed)
    side = torch.randint(lo, hi + 1, (len(x),), generator=g)
    x0, y0 = ((torch.rand(2, len(x), generator=g) * (size - side + 1)).long())
    out = torch.zeros(len(x), x.shape[1], size, size, dtype=torch.uint8)
    for s in side.unique().tolist():  # data preparation, once: one batched resize per side
        idx = (side == s).nonzero()[:, 0]
        small = F.interpolate(x[idx].float(), size=(s, s), mode="bilinear", antialias=True).round().clamp(0, 255)
        for i, im in zip(idx.tolist(), small.to(torch.uint8)):
            out[i, :, y0[i]:y0[i] + s, x0[i]:x0[i] + s] = im
    return out, torch.stack([x0, y0, x0 + side, y0 + side], 1)


def find_folder(name):
    """The folder of --data bundled, fashion-mnist (Debian's package) or a path, checked to exist."""
    folder = {"bundled": BUNDLED, "fashion-mnist": DEBIAN_FMNIST}.get(name, name)
    if not os.path.isdir(folder):
        hint = " (apt-get install -y dataset-fashion-mnist)" if name == "fashion-mnist" else ""
        raise ValueError(f"dataset path {folder} does not exist{hint}")
    return folder


def free_memory(device):
    """Bytes free for new tensors on device: the GPU's, or the OS's MemAvailable within a cgroup's limit, or None."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            free = next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit = f.read().strip()
            free = min(free, int(limit) - int(g.read())) if limit != "max" else free
    except (OSError, ValueError):
        pass
    return free


def load_data(name="bundled", device="cpu", img_size=None, data_dir=os.path.join(HERE, "data"), train_subset=None,
              classes=None, canvas=None, seed=0, crop_pad=None, decode="auto", workers=0, rrc_scale=None):
    """A dataset by name (bundled | fashion-mnist | cifar10 | cifar100 | synthetic) or path, with train.py's
    flags of the same names, as a namespace: train/val as (x, y) uint8 tensors on device, or as Datasets of an
    image folder; num_classes, in_chans and the normalisation mean/std. img_size: resized to it (None: as is)."""
    device = torch.device(device)
    if name in ("cifar10", "cifar100"):
        train, val = load_cifar(name, data_dir)
        C, stats = (10 if name == "cifar10" else 100), ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
        pad = 4  # DeiT's RandomCrop(32, padding=4) for inputs of 32 px or less
    elif name == "synthetic":  # random images, for benchmarks: 1000 classes like ImageNet
        g = torch.Generator().manual_seed(0)
        img_size = img_size or 32
        train, val = [(torch.randint(0, 256, (n, 3, img_size, img_size), dtype=torch.uint8, generator=g),
                       torch.randint(0, 1000, (n,), generator=g)) for n in (2560, 512)]
        C, stats, pad = 1000, (IMAGENET_MEAN, IMAGENET_STD), 4
    else:
        folder = find_folder(name)
        if os.path.isdir(os.path.join(folder, "train")) or os.path.isdir(os.path.join(folder, "val")):
            if classes is not None or canvas:
                raise ValueError(f"--{'classes' if classes is not None else 'canvas'} works with idx and CIFAR "
                                 "data, not an image folder")
            return load_image_folder(folder, img_size, device, decode, workers, rrc_scale, train_subset, seed)
        train, val = load_idx_folder(folder)
        C, stats = 10, (FMNIST_MEAN, FMNIST_STD)
        # Deliberate difference: no padded crop by default. Fashion-MNIST's items are centred and fill the
        # frame; a 4-px shift of a 28-px image cuts them off (RESULTS.md, "The default job", measures the cost).
        # The reference would apply it (input <= 32 px).
        pad = 0
    if classes is not None:  # e.g. pretrain on classes 0-4, fine-tune on 5-9 (finetune.py)
        keep = parse_classes(classes, C)
        train, val = select_classes(*train, keep), select_classes(*val, keep)
        C = len(keep)
    if train_subset is not None:
        keep = stratified_subset(train[1], train_subset, seed)
        train = (train[0][keep], train[1][keep])
    if canvas:  # the held-out canvases by a fixed seed: the same whatever the seed
        train, val = (make_canvases(train[0], canvas, seed)[0], train[1]), (make_canvases(val[0], canvas, 1_000_003)[0], val[1])

    def to_device(x, y):  # resize once if the model wants another size (e.g. 28 -> 32 px, CIFAR's 32 -> 224)
        if img_size is not None and x.shape[-1] != img_size:
            need, free = len(x) * x.shape[1] * img_size ** 2, free_memory(torch.device("cpu"))  # the uint8 result
            if free is not None and need > free:
                raise ValueError(f"resizing the {len(x)} images of --data {name} to --img-size {img_size} needs "
                                 f"{need / 2**30:.1f} GiB, and {free / 2**30:.1f} GiB is free: lower --img-size")
            out = torch.empty((len(x), x.shape[1], img_size, img_size), dtype=torch.uint8)
            for i in range(0, len(x), 1024):  # in chunks: the float copy of a whole set at 224 px would be 5x as big
                z = F.interpolate(x[i:i + 1024].float(), size=(img_size, img_size), mode="bicubic", antialias=True)
                out[i:i + 1024] = z.round().clamp(0, 255).to(torch.uint8)
            x = out
        return x.to(device), y.to(device)
    return argparse.Namespace(train=to_device(*train), val=to_device(*val), num_classes=C, in_chans=train[0].shape[1],
                              mean=stats[0], std=stats[1], tensors=True, skipped=[], source_size=train[0].shape[-1],
                              crop_pad=pad if crop_pad is None else crop_pad)


# ---------------------------------------------------------------------------------------------------------
# Image folders (ImageNet's layout). Each file becomes one box of its pixels resized to img_size: in training
# RandomResizedCrop's, in evaluation the reference's Resize(int(size / 0.875)) + CenterCrop(size)
# (facebookresearch/deit datasets.py), one box as well. --decode workers: the DataLoader workers decode and
# resize with PIL; device: they only read the bytes and pick the box, and the batch is decoded and resized on the
# device (nvJPEG through TorchCodec on CUDA; augment.resized_crops). Both resize as PIL's antialiased bicubic,
# within 1 level (test_all.py). As the reference's loader (torchvision's pil_loader), EXIF rotation is not applied.

@functools.lru_cache(None)
def device_decoder():
    """(name, decode(list of byte tensors, device) -> list of (3, H, W) uint8) of the batched JPEG decoder,
    or (None, None): TorchCodec's (optional; CUDA through nvJPEG), else torchvision.io's (deprecated since
    torchvision 0.29, used while it exists)."""
    try:
        from torchcodec.decoders import decode_jpeg as codec_decode
        return "torchcodec", lambda data, device: codec_decode(data, mode="RGB", device=device)
    except Exception:  # not installed, or its native libraries do not load
        pass
    try:
        import warnings
        from torchvision.io import ImageReadMode, decode_jpeg as vision_decode
        # its deprecation notice, once per batch otherwise; set here (the main thread, cached): the batches are
        # decoded in prefetch's thread, where warnings.catch_warnings is not thread-safe
        warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision are deprecated")
        return "torchvision.io", lambda data, device: vision_decode(data, mode=ImageReadMode.RGB, device=device)
    except Exception:
        return None, None


def eval_resize(W, H, size, crop_ratio=0.875):
    """The reference's evaluation transform, Resize(int(size / crop_ratio)) of the shorter side then
    CenterCrop(size), with torchvision's rounding: the resized (width, height) and the crop's (left, top)."""
    short = int(size / crop_ratio)
    nw, nh = (short, int(short * H / W)) if W <= H else (int(short * W / H), short)
    return nw, nh, int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))


def eval_box(W, H, size):
    """eval_resize as one box (x0, y0, x1, y1) in the file's pixels: resizing that box to size x size gives
    PIL's pixels of the two steps (the same sampling positions; the margins are never resized)."""
    nw, nh, left, top = eval_resize(W, H, size)
    sx, sy = W / nw, H / nh
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def dct_scale(W, H, request):
    """The reduction PIL's draft picks for a JPEG of W x H asked for at least request (w, h): 8, 4, 2 or 1."""
    most = min(W // request[0], H // request[1])
    return next((s for s in (8, 4, 2) if most >= s), 1)


def plain_jpeg(im, modes):
    """Whether a tensor decoder gives the reference's pixels for this file: a JPEG in one of modes, without an
    EXIF rotation (TorchCodec applies it; torchvision's pil_loader, the reference's, does not)."""
    return (im.format == "JPEG" and im.mode in modes
            and ("exif" not in im.info or im.getexif().get(0x0112, 1) == 1))


def decode_crop(im, size, box=None, raw=None, decoder=None):
    """A PIL image, opened but not decoded -> (3, size, size) uint8 tensor: the box (x0, y0, x1, y1) resized to
    size x size, or with box None the reference's evaluation crop (eval_box). Two ways, by what saves most:
    - A JPEG that needs every pixel (the common case at ImageNet's sizes) is decoded whole, by decoder if given
      (libjpeg-turbo, as PIL), then resized by torch's antialiased bicubic on uint8 (PIL's kernel, ~2.5x faster).
      It crops first, as torchvision's tensor RandomResizedCrop, so the 2 outer output pixels differ from PIL's
      resize(box=), which reads beyond the box. In evaluation: the whole image resized, then the centre cropped.
    - Otherwise PIL, as the reference, but a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8: PIL's draft)
      that keeps at least size pixels across the box: libjpeg's scaled IDCT averages each s x s block before the
      bicubic filter instead of inside it (test_all.py bounds it against a full decode)."""
    W, H = im.size
    pil_box = box or eval_box(W, H, size)
    request = (math.ceil(W * size / max(pil_box[2] - pil_box[0], 1)), math.ceil(H * size / max(pil_box[3] - pil_box[1], 1)))
    if not (plain_jpeg(im, ("RGB", "L")) and dct_scale(W, H, request) == 1):
        if im.format == "JPEG":
            im.draft("RGB", request)
        s = round(W / im.width)  # 1, 2, 4 or 8: pixel i now covers the file's pixels [i s, (i + 1) s)
        if im.mode not in ("RGB", "L"):  # CMYK, palette, alpha...: to RGB first, as the reference's loader
            im = im.convert("RGB")
        im = im.resize((size, size), Image.BICUBIC, box=tuple(v / s for v in pil_box)).convert("RGB")
        return torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()
    if decoder is not None:
        x = decoder([torch.frombuffer(raw, dtype=torch.uint8)], "cpu")[0]  # (3, H, W), channels last
    else:
        x = torch.from_numpy(np.array(im))  # (H, W, 3) or (H, W)
        x = x.permute(2, 0, 1) if x.ndim == 3 else x[None]
    if box:
        x0, y0, x1, y1 = (round(v) for v in box)
        x = F.interpolate(x[None, :, y0:y1, x0:x1], size=(size, size), mode="bicubic", antialias=True)
    else:  # the reference's two steps
        nw, nh, left, top = eval_resize(W, H, size)
        x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", antialias=True)[..., top:top + size, left:left + size]
    return x[0].expand(3, -1, -1).contiguous()  # greyscale -> RGB, as convert("RGB")


class ImageFiles(torch.utils.data.Dataset):
    """An ImageFolder's files, each read in a DataLoader worker into one of:
      ("pixels", (3, size, size) uint8)  decode="workers", or a file the device decoder does not take;
      ("jpeg", bytes, box, (H, W), path) decode="device": a colour JPEG that ends with its end-of-image marker;
      ("bad", message)                   a file that cannot be read: skipped, named and counted, not fatal.
    train: RandomResizedCrop's box (augment.sample_boxes, scale min_scale-1, ratio 3/4-4/3), else eval_box."""

    def __init__(self, root, size, train, decode, min_scale=0.08):
        self.samples, self.classes = list_images(root)
        self.size, self.train, self.decode, self.seed, self.min_scale = size, train, decode, None, min_scale
        self.tensor_decode = True  # full-scale JPEGs through device_decoder()'s decoder on the CPU (False: PIL)

    def __len__(self):
        return len(self.samples)

    def box(self, W, H):
        if not self.train:
            return eval_box(W, H, self.size)
        if self.seed != torch.initial_seed():  # a new worker (DataLoader seeds each: base seed + worker id)
            self.seed, self.rng = torch.initial_seed(), np.random.default_rng(torch.initial_seed())
        top, left, h, w = (float(v[0]) for v in A.sample_boxes(self.rng, 1, H, W, (self.min_scale, 1.0), (3 / 4, 4 / 3)))
        return left, top, left + w, top + h

    def __getitem__(self, i):
        path, target = self.samples[i]
        try:
            with open(path, "rb") as f:
                raw = f.read()
            raw = bytearray(raw)
            im = Image.open(io.BytesIO(raw))  # reads the header only
            box = self.box(*im.size)
            if self.decode == "device" and plain_jpeg(im, ("RGB",)) and raw.rstrip(b"\0\r\n ").endswith(b"\xff\xd9"):
                # a JPEG without its end marker is truncated: PIL's path names it
                return ("jpeg", torch.frombuffer(raw, dtype=torch.uint8), box, (im.height, im.width), path), target
            return ("pixels", decode_crop(im, self.size, box if self.train else None, raw,
                                            device_decoder()[1] if self.tensor_decode else None)), target
        except Exception as e:  # PIL raises several kinds for corrupt or truncated files
            return ("bad", f"{path} ({type(e).__name__}: {e})"), target


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


def list_images(root):
    """torchvision's ImageFolder listing (class = subfolder, sorted; the image files below it, symlinks followed,
    sorted by folder then name) -> (samples [(path, class index)], classes), except that a folder or file reached
    twice, through a symlink loop or a second link, is an error naming both paths (ImageFolder lists it again)."""
    try:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    except OSError as e:
        raise ValueError(f"cannot read image folder {root}: {e.strerror or e}") from None
    seen, samples = {}, []  # real path -> the path it was first reached by

    def once(path, real):
        if real in seen:
            raise ValueError(f"image folder {root}: {os.path.relpath(path, root)} is {os.path.relpath(seen[real], root)} "
                             "again, through a symlink (a loop or a second link): each image must be reached once")
        seen[real] = path

    def walk(folder, c):
        real_folder = os.path.realpath(folder)
        once(folder, real_folder)
        for e in sorted(os.scandir(folder), key=lambda e: e.name):
            if e.is_dir():
                walk(e.path, c)
            elif e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file():
                once(e.path, os.path.realpath(e.path) if e.is_symlink() else os.path.join(real_folder, e.name))
                samples.append((e.path, c))
    for c, name in enumerate(classes):
        walk(os.path.join(root, name), c)
    samples.sort(key=lambda s: (os.path.dirname(s[0]), os.path.basename(s[0])))  # ImageFolder's order
    empty = [name for c, name in enumerate(classes) if not any(s[1] == c for s in samples)]
    if empty or not classes:
        raise ValueError(f"image folder {root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in "
                         + (f"the class folder(s) {', '.join(empty[:5])}" if classes else "class folders"))
    return samples, classes


def collate_files(batch):
    """ImageFiles items -> a dict: the files already cropped (pixels (K, 3, S, S) or None, pixel_labels), those left
    to the device decoder (jpegs: bytes, lengths, paths, boxes, sizes, jpeg_labels), the messages of the bad ones."""
    px = [(item[1], y) for item, y in batch if item[0] == "pixels"]
    jp = [(item, y) for item, y in batch if item[0] == "jpeg"]
    return {"pixels": torch.stack([p for p, _ in px]) if px else None,
            "pixel_labels": torch.tensor([y for _, y in px], dtype=torch.long),
            # the files' bytes in one buffer (one pinned copy on CUDA, not one per file), split again on arrival
            "jpegs": torch.cat([it[1] for it, _ in jp]) if jp else None, "lengths": [len(it[1]) for it, _ in jp],
            "paths": [it[4] for it, _ in jp], "jpeg_labels": torch.tensor([y for _, y in jp], dtype=torch.long),
            "boxes": np.array([it[2] for it, _ in jp], dtype=np.float64).reshape(-1, 4),
            "sizes": np.array([it[3] for it, _ in jp], dtype=np.int64).reshape(-1, 2),
            "bad": [item[1] for item, _ in batch if item[0] == "bad"]}


def load_image_folder(root, img_size, device, decode="auto", workers=0, rrc_scale=None, train_subset=None, seed=0):
    if img_size is None:
        raise ValueError("this model has no input size of its own: give --img-size for an image folder")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise ValueError(f"image folder {root} has no {split}/ subfolder (expected DeiT's ImageNet layout: train/ and val/)")
    name, decoder = device_decoder()
    if decode == "device" and decoder is None:
        raise ValueError("--decode device needs TorchCodec (pip install torchcodec) or torchvision.io.decode_jpeg")
    if decode == "auto":  # on a CPU the workers decode in parallel, the main process would decode alone
        decode = "device" if device.type == "cuda" and decoder is not None else "workers"
    train = ImageFiles(os.path.join(root, "train"), img_size, True, decode, rrc_scale or 0.08)
    val = ImageFiles(os.path.join(root, "val"), img_size, False, decode)
    if train.classes != val.classes:
        raise ValueError(f"train/ and val/ of {root} have different class folders")
    if len(train.classes) < 2:  # it trains (loss 0, top-1 100) and learns nothing
        print(f"warning: image folder {root} has one class ({train.classes[0]}): nothing to tell apart", flush=True)
    if train_subset is not None:
        keep = stratified_subset(torch.tensor([y for _, y in train.samples]), train_subset, seed)
        train.samples = [train.samples[i] for i in keep.tolist()]
    where = (f"device ({name} on {device.type})" if decode == "device" else
             f"workers ({name + ', ' if name else ''}PIL with DCT scaling)")
    return argparse.Namespace(train=train, val=val, num_classes=len(train.classes), in_chans=3,
                              mean=IMAGENET_MEAN, std=IMAGENET_STD, tensors=False, workers=workers,
                              decoder=decoder if decode == "device" else None, decode=where,
                              skipped=[], rescued=[])  # this epoch's undecodable files, and files PIL decoded instead


def epoch_indices(n, batch_size, seed, epoch, rank=0, world=1, repeats=1):
    """Process rank's sample indices for one epoch, in order, in batches of batch_size // world. Without repeats,
    process r takes the r-th slice of each global batch of one permutation of (seed, epoch): N processes train on
    exactly the images one would. With repeats > 1 in a distributed run (DeiT's RASampler, samplers.py; paper §6,
    Table 8: 76.5% without it for DeiT-B) each image is repeated on different processes, each keeping
    n // 256 * 256 / world samples: with 3 repeats an epoch sees about a third of the images, each 3 times."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if repeats > 1 and world > 1:
        idx = torch.randperm(n, generator=g).repeat_interleave(repeats)
        total = math.ceil(len(idx) / world) * world
        idx = torch.cat([idx, idx[:total - len(idx)]])[rank::world]
        return idx[:n // 256 * 256 // world]
    steps = n // batch_size
    perm = torch.randperm(n, generator=g)[:steps * batch_size].view(steps, world, batch_size // world)
    return perm[:, rank].reshape(-1)


class EpochSampler(torch.utils.data.Sampler):
    """epoch_indices as a Sampler (DistributedSampler's role, and DeiT's RASampler's with repeats=3). local: the
    batch of one process; steps: its batches per epoch (whole ones only)."""

    def __init__(self, n, batch_size, seed, rank=0, world=1, repeats=1):
        self.n, self.batch_size, self.seed, self.rank, self.world, self.repeats = n, batch_size, seed, rank, world, repeats
        self.epoch, self.start, self.local = 0, 0, batch_size // world
        self.steps = len(self) // self.local
        if self.steps == 0:
            raise ValueError(f"--batch-size {batch_size} is larger than an epoch of the training set ({n} images)")

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def indices(self):
        """This epoch's indices from batch self.start on (0 unless resumed mid-epoch)."""
        idx = epoch_indices(self.n, self.batch_size, self.seed, self.epoch, self.rank, self.world, self.repeats)
        return idx[self.start * self.local:]

    def __iter__(self):
        return iter(self.indices().tolist())

    def __len__(self):
        return len(self.indices())


def train_batches(data, sampler, epoch, device, start=0):
    """This process's batches of one epoch from batch start on (resumed mid-epoch): (uint8 images, labels). From an
    image folder a file that cannot be decoded is left out, named and counted; a batch of none, the previous one."""
    sampler.set_epoch(epoch, start)
    if data.tensors:
        (x, y), idx = data.train, sampler.indices()
        for b, h in list(zip(idx.to(device).split(sampler.local), idx.split(sampler.local)))[:sampler.steps - start]:
            yield x[b], y[b if y.device == b.device else h]  # labels kept on the host are picked there: no wait
    else:
        data.skipped.clear(), data.rescued.clear()  # (each epoch's: its log line counts them)
        last = None
        for x, y in _folder_batches(data, data.train, sampler.local, device, data.skipped, sampler=sampler,
                                    drop_last=True, keep_empty=True):
            if len(y) == 0:  # every file of the batch was bad: every process must still take its step
                if last is None:
                    raise ValueError("no file of the first training batch could be decoded: check --data")
                x, y = last  # (under DDP a missing step would leave the other processes waiting forever)
            last = x, y
            yield x, y


def val_batches(data, batch_size, device, rank=0, world=1, skipped=None):
    """This process's share of the held-out split (disjoint shards, no padding): (uint8 images, labels).
    From an image folder, a file that cannot be decoded is left out, named, and appended to skipped."""
    if data.tensors:
        x, y = data.val
        for b in torch.arange(rank, len(y), world, device=device).split(batch_size):
            yield x[b], y[b]
    else:
        shard = torch.utils.data.Subset(data.val, range(rank, len(data.val), world))
        yield from _folder_batches(data, shard, batch_size, device, [] if skipped is None else skipped)


def _folder_batches(data, dataset, batch_size, device, skipped, keep_empty=False, **kw):
    # A DataLoader per epoch, as the reference's: workers read (on the workers path also decode and crop) the files;
    # the device's JPEGs are decoded a batch at a time, one ahead, on a stream of their own (prefetch). Made here, in
    # the caller's thread, the iterator draws its workers' seeds from the global generator at the same point of a run.
    files = iter(torch.utils.data.DataLoader(dataset, batch_size, num_workers=data.workers, collate_fn=collate_files,
                                             pin_memory=device.type == "cuda", **kw))
    batches = _decoded_batches(data, files, device, skipped, keep_empty, training=dataset is data.train)
    return prefetch(batches, device) if data.decoder is not None else batches


def _decoded_batches(data, files, device, skipped, keep_empty, training):
    size = data.train.size
    for b in files:
        # the labels go to the device from the DataLoader's pinned buffers (an asynchronous copy), and are
        # selected there, never rebuilt on the host (fresh pageable memory: a copy that waits)
        xs, ys, bad = [], [], b["bad"]
        if b["lengths"]:
            jpegs = list(b["jpegs"].split(b["lengths"]))
            decoded, ok, failed = _decode(data.decoder, jpegs, device)
            labels = b["jpeg_labels"].to(device, non_blocking=True)
            if decoded:
                xs.append(A.resized_crops(decoded, b["boxes"][ok], b["sizes"][ok], size))
                ys.append(labels if len(ok) == len(jpegs) else labels[torch.as_tensor(ok, device=device)])
            rescued = []  # a file the device decoder rejects goes to the CPU's (PIL), as the workers path would
            for i, why in failed:
                try:
                    raw = bytearray(jpegs[i].numpy().tobytes())
                    box = tuple(b["boxes"][i]) if training else None  # None: the reference's resize and centre crop
                    rescued.append((i, decode_crop(Image.open(io.BytesIO(raw)), size, box, raw)))
                    data.rescued.append(b["paths"][i])
                    print(f"warning: the device decoder rejected {b['paths'][i]} ({why}): decoded by PIL instead "
                          f"({len(data.rescued)} this epoch)", flush=True)
                except Exception as e:
                    bad.append(f"{b['paths'][i]} ({why}; PIL: {type(e).__name__}: {e})")
            if rescued:
                xs.append(torch.stack([x for _, x in rescued]).to(device, non_blocking=True))
                ys.append(labels[torch.as_tensor([i for i, _ in rescued], device=device)])
        if b["pixels"] is not None:
            xs.append(b["pixels"].to(device, non_blocking=True))
            ys.append(b["pixel_labels"].to(device, non_blocking=True))
        for msg in bad:
            print(f"warning: skipped an image that cannot be decoded: {msg}", flush=True)
        skipped += bad
        if xs:
            yield torch.cat(xs), torch.cat(ys)
        elif keep_empty:
            yield None, torch.zeros(0, dtype=torch.long)


@functools.lru_cache(None)
def decode_stream(device):
    """prefetch's CUDA stream, one per device: the allocator reuses a block only on the stream that allocated it."""
    return torch.cuda.Stream(device)


def prefetch(batches, device, ahead=1):
    """The generator batches runs in a thread and on a CUDA stream of its own, up to `ahead` batches before the step
    that takes them. TorchCodec's CUDA decoder synchronises its stream twice per batch: on the training stream,
    batch i+1 could not start decoding before step i had finished, and the GPU would idle while the host prepares
    the decode. Each batch carries an event recorded after its work; the taking stream waits for that event only,
    and marks the batch's tensors as used there (record_stream: not reused while the step reads them). Order,
    content and errors are those of batches; on the CPU there are no streams, only the thread."""
    cuda = device.type == "cuda"
    stream = decode_stream(device) if cuda else None
    handover, stop, end = queue.Queue(maxsize=ahead), threading.Event(), object()

    def put(item):
        while not stop.is_set():
            try:
                return handover.put(item, timeout=0.1)
            except queue.Full:
                pass

    def produce():
        try:
            with torch.cuda.device(device) if cuda else nullcontext(), torch.cuda.stream(stream) if cuda else nullcontext():
                for item in batches:
                    event = torch.cuda.Event() if cuda else None
                    if cuda:
                        event.record(stream)
                    put((item, event))
                    if stop.is_set():
                        break
            put(end)
        except BaseException as e:  # handed over, raised where the batch was expected
            put(e)
        finally:
            batches.close()  # the DataLoader's workers end with it

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while (got := handover.get()) is not end:
            if isinstance(got, BaseException):
                raise got
            item, event = got
            if cuda:
                current = torch.cuda.current_stream(device)
                current.wait_event(event)
                for t in item:
                    if isinstance(t, torch.Tensor) and t.is_cuda:
                        t.record_stream(current)
            yield item
    finally:
        stop.set()
        thread.join()


def _decode(decoder, jpegs, device):
    """The batch in one call, or if that fails file by file: (decoded images, indices kept, [(index, reason)]); the
    caller gives the rejected files to PIL. When every file of a failed batch of several fails alone too, the decoder
    or the device is at fault: one line, not a silent fall back to PIL on one thread. Told by behaviour: TorchCodec
    reports nvJPEG's and CUDA's errors as bare numbers ("Failed to decode batch: 5"). Out of memory is raised."""
    try:
        return decoder(jpegs, device), np.arange(len(jpegs)), []
    except Exception as e:
        batch_error = e
        if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
            raise
    out, ok, bad = [], [], []
    for i, j in enumerate(jpegs):  # the error path only
        try:
            out.append(decoder([j], device)[0])
            ok.append(i)
        except (torch.OutOfMemoryError, MemoryError):
            raise
        except Exception as e:
            bad.append((i, f"{type(e).__name__}: {e}"))
    if not ok and len(jpegs) > 1:
        raise ValueError(f"the device JPEG decoder failed on a batch of {len(jpegs)} files and on each alone "
                         f"({type(batch_error).__name__}: {batch_error}): the decoder or the device is at fault, "
                         "not the files; try --decode workers")
    return out, np.array(ok, dtype=np.int64), bad
