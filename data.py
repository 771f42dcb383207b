"""
Data for train.py: datasets as uint8 tensors on the device, or image folders decoded by DataLoader workers,
and the order in which each process sees them.

Small datasets (Fashion-MNIST idx files, CIFAR, synthetic) live on the device as uint8 (N, C, H, W) tensors
and are batched there, as in airbench: no DataLoader, no workers. ImageFolder (ImageNet layout) decodes
files in DataLoader workers, the one per-image step. Augmentation happens later, on the batch (augment.py).
The reference: facebookresearch/deit datasets.py (transforms) and samplers.py (repeated augmentation).
"""

import argparse
import math
import os
import pickle

import numpy as np
import torch
import torch.nn.functional as F

import augment as A
from prepare_data import FILES, find_idx, read_idx

HERE = os.path.dirname(os.path.abspath(__file__))
BUNDLED = os.path.join(HERE, "data", "fashion-mnist-subset")
DEBIAN_FMNIST = "/usr/share/datasets/fashion-mnist"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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
    """Indices of a class-balanced part of the labels y: a fraction (<= 1) or a count of images."""
    classes = y.unique()
    per_class = round(amount * len(y) / len(classes)) if amount <= 1 else int(amount) // len(classes)
    if per_class < 1:
        raise ValueError(f"--train-subset {amount} leaves no image per class")
    g = torch.Generator().manual_seed(seed)
    return torch.cat([(y == c).nonzero()[:, 0][torch.randperm(int((y == c).sum()), generator=g)[:per_class]]
                      for c in classes]).sort().values


def load_data(args, device, img_size):
    """Returns a namespace: train/val as (x, y) uint8 tensors on the device or as Datasets, num_classes,
    in_chans and the normalisation mean/std."""
    name = args.data
    if name in ("cifar10", "cifar100"):
        train, val = load_cifar(name, args.data_dir)
        C, stats = (10 if name == "cifar10" else 100), ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
        pad = 4  # DeiT's RandomCrop(32, padding=4) for inputs of 32 px or less
    elif name == "synthetic":  # random images, for benchmarks: 1000 classes like ImageNet
        g = torch.Generator().manual_seed(0)
        img_size = img_size or 32
        train, val = [(torch.randint(0, 256, (n, 3, img_size, img_size), dtype=torch.uint8, generator=g),
                       torch.randint(0, 1000, (n,), generator=g)) for n in (2560, 512)]
        C, stats, pad = 1000, (IMAGENET_MEAN, IMAGENET_STD), 4
    else:
        folder = {"bundled": BUNDLED, "fashion-mnist": DEBIAN_FMNIST}.get(name, name)
        if not os.path.isdir(folder):
            hint = " (apt-get install -y dataset-fashion-mnist)" if name == "fashion-mnist" else ""
            raise ValueError(f"dataset path {folder} does not exist{hint}")
        if os.path.isdir(os.path.join(folder, "train")) or os.path.isdir(os.path.join(folder, "val")):
            if args.classes is not None:
                raise ValueError("--classes works with idx and CIFAR data; for an image folder, make one with those classes")
            return load_image_folder(folder, args, img_size)
        train, val = load_idx_folder(folder)
        C, stats = 10, ((0.2860,), (0.3530,))  # Fashion-MNIST's mean/std
        # Deliberate difference: no padded crop by default. Fashion-MNIST's items are centred and fill the
        # frame; a 4-px shift of a 28-px image cuts them off (6.5 points of top-1 on the bundled data, README
        # "Results"). The reference would apply it (input <= 32 px).
        pad = 0
    if args.classes is not None:  # e.g. pretrain on classes 0-4, fine-tune on 5-9 (finetune.py)
        keep = parse_classes(args.classes, C)
        train, val = select_classes(*train, keep), select_classes(*val, keep)
        C = len(keep)
    if args.train_subset is not None:
        keep = stratified_subset(train[1], args.train_subset, args.seed)
        train = (train[0][keep], train[1][keep])

    def to_device(x, y):  # resize once if the model wants another size (e.g. 28 -> 32 px)
        if img_size is not None and x.shape[-1] != img_size:
            x = F.interpolate(x.float(), size=(img_size, img_size), mode="bicubic", antialias=True)
            x = x.round().clamp(0, 255).to(torch.uint8)
        return x.to(device), y.to(device)
    return argparse.Namespace(train=to_device(*train), val=to_device(*val), num_classes=C, in_chans=train[0].shape[1],
                              mean=stats[0], std=stats[1], tensors=True, skipped=[],
                              crop_pad=pad if args.crop_pad is None else args.crop_pad)


class SafeImageFolder:
    """torchvision's ImageFolder, except that a file that cannot be decoded is skipped with a warning
    instead of killing the run."""

    def __init__(self, root, transform):
        import torchvision
        try:
            self.inner = torchvision.datasets.ImageFolder(root, transform=transform)
        except (FileNotFoundError, OSError) as e:
            raise ValueError(f"cannot read image folder {root}: {e}")

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        path, target = self.inner.samples[i]
        try:
            return self.inner.transform(self.inner.loader(path)), target, None
        except Exception as e:  # PIL raises several kinds for corrupt or truncated files
            return None, target, f"{path} ({type(e).__name__}: {e})"


def collate_skipping(batch):
    good = [b for b in batch if b[2] is None]
    x = torch.stack([b[0] for b in good]) if good else None
    return x, torch.tensor([b[1] for b in good], dtype=torch.long), [b[2] for b in batch if b[2] is not None]


class PILRandomResizedCrop:
    """RandomResizedCrop(size, scale 0.08-1, ratio 3/4-4/3, bicubic) of one decoded file, in a DataLoader
    worker: the box from augment.py's sampler, the crop and resize by PIL (files differ in size, so this is
    the one per-image step; the flip and the rest run batched on the device)."""

    def __init__(self, size):
        self.size = size

    def __call__(self, img):
        from PIL import Image
        rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,))))  # from the worker's seeded stream
        top, left, h, w = (int(v[0]) for v in A.sample_boxes(rng, 1, img.height, img.width, (0.08, 1.0), (3 / 4, 4 / 3)))
        return img.convert("RGB").resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + w, top + h))


def load_image_folder(root, args, img_size):
    import torchvision.transforms as T
    if img_size is None:
        raise ValueError(f"{args.model} has no input size of its own: give --img-size for an image folder")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise ValueError(f"image folder {root} has no {split}/ subfolder (expected DeiT's ImageNet layout: train/ and val/)")
    bicubic = T.InterpolationMode.BICUBIC
    train_tf = T.Compose([PILRandomResizedCrop(img_size), T.PILToTensor()])
    # eval: resize to size/0.875 (256 for 224), centre crop (facebookresearch/deit datasets.py)
    val_tf = T.Compose([T.Resize(int(img_size / 0.875), interpolation=bicubic), T.CenterCrop(img_size), T.PILToTensor()])
    train, val = SafeImageFolder(os.path.join(root, "train"), train_tf), SafeImageFolder(os.path.join(root, "val"), val_tf)
    if train.inner.classes != val.inner.classes:
        raise ValueError(f"train/ and val/ of {root} have different class folders")
    if args.train_subset is not None:
        keep = stratified_subset(torch.tensor(train.inner.targets), args.train_subset, args.seed)
        train.inner.samples = [train.inner.samples[i] for i in keep.tolist()]
    return argparse.Namespace(train=train, val=val, num_classes=len(train.inner.classes), in_chans=3,
                              mean=IMAGENET_MEAN, std=IMAGENET_STD, tensors=False, workers=args.workers,
                              skipped=[])  # this epoch's undecodable files, for the log line


def epoch_indices(n, batch_size, seed, epoch, rank=0, world=1, repeats=1):
    """Process rank's sample indices for one epoch, in order; consecutive chunks of batch_size // world are
    its batches. Without repeated augmentation, process r takes the r-th slice of each global batch of one
    permutation of (seed, epoch), so N processes train on exactly the images one process would.
    With repeats > 1 in a distributed run (DeiT's RASampler, facebookresearch/deit samplers.py; paper §6,
    Table 8: 76.5% without it for DeiT-B) each image is repeated, the copies going to different processes,
    and each process keeps n // 256 * 256 / world samples: with 3 repeats an epoch sees about a third of the
    images, each 3 times."""
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
    """epoch_indices as a Sampler: the role of DistributedSampler, and of DeiT's RASampler with repeats=3.
    local: the batch of one process; steps: its batches per epoch (whole ones only)."""

    def __init__(self, n, batch_size, seed, rank=0, world=1, repeats=1):
        self.n, self.batch_size, self.seed, self.rank, self.world, self.repeats = n, batch_size, seed, rank, world, repeats
        self.epoch, self.local = 0, batch_size // world
        self.steps = len(self) // self.local
        if self.steps == 0:
            raise ValueError(f"--batch-size {batch_size} is larger than an epoch of the training set ({n} images)")

    def set_epoch(self, epoch):
        self.epoch = epoch

    def indices(self):
        return epoch_indices(self.n, self.batch_size, self.seed, self.epoch, self.rank, self.world, self.repeats)

    def __iter__(self):
        return iter(self.indices().tolist())

    def __len__(self):
        return len(self.indices())


def train_batches(data, sampler, epoch, device):
    """This process's batches of one epoch: (uint8 images, labels) on the device. From an image folder, a
    file that cannot be decoded is left out, named in a warning and counted in data.skipped."""
    sampler.set_epoch(epoch)
    if data.tensors:
        x, y = data.train
        for b in sampler.indices().to(device).split(sampler.local)[:sampler.steps]:
            yield x[b], y[b]
    else:
        data.skipped.clear()
        yield from _folder_batches(data.train, sampler.local, device, data.workers, data.skipped, sampler=sampler,
                                   drop_last=True)


def val_batches(data, batch_size, device, rank=0, world=1):
    """This process's share of the held-out split (disjoint shards, no padding): (uint8 images, labels)."""
    if data.tensors:
        x, y = data.val
        for b in torch.arange(rank, len(y), world, device=device).split(batch_size):
            yield x[b], y[b]
    else:
        shard = torch.utils.data.Subset(data.val, range(rank, len(data.val), world))
        yield from _folder_batches(shard, batch_size, device, data.workers, [])


def _folder_batches(dataset, batch_size, device, workers, skipped, **kw):
    # A DataLoader per epoch, as the reference's: workers decode and crop; the rest runs batched on the device.
    for x, y, bad in torch.utils.data.DataLoader(dataset, batch_size, num_workers=workers, collate_fn=collate_skipping,
                                                 pin_memory=device.type == "cuda", **kw):
        for b in bad:
            print(f"warning: skipped an image that cannot be decoded: {b}", flush=True)
        skipped += bad
        if x is not None:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
