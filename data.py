"""
Data for train.py: datasets as uint8 tensors on the device, or image folders decoded by DataLoader workers,
and the order in which each process sees them.

Small datasets (Fashion-MNIST idx files, CIFAR, synthetic) live on the device as uint8 (N, C, H, W) tensors
and are batched there, as in airbench: no DataLoader, no workers. ImageFolder (ImageNet layout) decodes
files in DataLoader workers, the one per-image step. Augmentation happens later, on the batch (augment.py).
"""

import argparse
import math
import os
import pickle

import torch
import torch.nn.functional as F

import augment as A
from prepare_data import FILES, find_idx, read_idx

HERE = os.path.dirname(os.path.abspath(__file__))
BUNDLED = os.path.join(HERE, "data", "fashion-mnist-subset")
DEBIAN_FMNIST = "/usr/share/datasets/fashion-mnist"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class UserError(Exception):
    """A problem with the user's input: reported as one line, without a traceback."""


def die(msg):
    raise UserError(msg)


def load_idx_folder(folder):
    def split(name):
        paths = [find_idx(folder, f) for f in FILES[name]]
        if None in paths:
            die(f"{folder} lacks the idx files {FILES[name]} (.gz or not)")
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
            die(f"could not download {name} to {root} ({type(e).__name__}: {e}); offline? "
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
        die(f"--classes {spec!r}: expected a range such as 0-4 or a list such as 5,7,9")
    if not keep or keep[0] < 0 or keep[-1] >= num_classes:
        die(f"--classes {spec!r}: the dataset has classes 0..{num_classes - 1}")
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
        die(f"--train-subset {amount} leaves no image per class")
    g = torch.Generator().manual_seed(seed)
    return torch.cat([(y == c).nonzero()[:, 0][torch.randperm(int((y == c).sum()), generator=g)[:per_class]]
                      for c in classes]).sort().values


def load_data(args, ctx, img_size):
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
            die(f"dataset path {folder} does not exist{hint}")
        if os.path.isdir(os.path.join(folder, "train")) or os.path.isdir(os.path.join(folder, "val")):
            if args.classes is not None:
                die("--classes works with idx and CIFAR data; for an image folder, make one with those classes")
            return load_image_folder(folder, args, ctx, img_size)
        train, val = load_idx_folder(folder)
        C, stats = 10, ((0.2860,), (0.3530,))  # Fashion-MNIST's mean/std
        # Deliberate difference: no padded crop by default. Fashion-MNIST's items are centred and fill the
        # frame; a 4-px shift of a 28-px image cuts them off (30 epochs on the bundled data with no other
        # augmentation: 79.2% top-1 with --crop-pad 4, 85.7% with flips only; README). The reference would
        # apply it (input <= 32 px).
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
        return x.to(ctx.device), y.to(ctx.device)
    return argparse.Namespace(train=to_device(*train), val=to_device(*val), num_classes=C, in_chans=train[0].shape[1],
                              mean=stats[0], std=stats[1], tensors=True,
                              crop_pad=pad if args.crop_pad is None else args.crop_pad)


class SafeImageFolder:
    """torchvision's ImageFolder, except that a file that cannot be decoded is skipped with a warning
    instead of killing the run."""

    def __init__(self, root, transform):
        import torchvision
        try:
            self.inner = torchvision.datasets.ImageFolder(root, transform=transform)
        except (FileNotFoundError, OSError) as e:
            die(f"cannot read image folder {root}: {e}")

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
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, (1,))))  # the worker's seeded stream
        top, left, h, w = (int(v) for v in A.sample_boxes(gen, 1, img.height, img.width, (0.08, 1.0), (3 / 4, 4 / 3)))
        return img.convert("RGB").resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + w, top + h))


def load_image_folder(root, args, ctx, img_size):
    import torchvision.transforms as T
    if img_size is None:
        die(f"{args.model} has no input size of its own: give --img-size for an image folder")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            die(f"image folder {root} has no {split}/ subfolder (expected DeiT's ImageNet layout: train/ and val/)")
    bicubic = T.InterpolationMode.BICUBIC
    train_tf = T.Compose([PILRandomResizedCrop(img_size), T.PILToTensor()])
    # eval: resize to size/0.875 (256 for 224), centre crop (REFERENCE §2)
    val_tf = T.Compose([T.Resize(int(img_size / 0.875), interpolation=bicubic), T.CenterCrop(img_size), T.PILToTensor()])
    train, val = SafeImageFolder(os.path.join(root, "train"), train_tf), SafeImageFolder(os.path.join(root, "val"), val_tf)
    if train.inner.classes != val.inner.classes:
        die(f"train/ and val/ of {root} have different class folders")
    if args.train_subset is not None:
        keep = stratified_subset(torch.tensor(train.inner.targets), args.train_subset, args.seed)
        train.inner.samples = [train.inner.samples[i] for i in keep.tolist()]
    return argparse.Namespace(train=train, val=val, num_classes=len(train.inner.classes), in_chans=3,
                              mean=IMAGENET_MEAN, std=IMAGENET_STD, tensors=False)


def epoch_indices(n, args, ctx, epoch):
    """This process's sample indices for one epoch, in order; consecutive chunks of batch_size // world are
    its batches. Without repeated augmentation, process r takes the r-th slice of each global batch of one
    permutation of (seed, epoch), so N processes train on exactly the images one process would.
    With repeated augmentation (distributed runs only, as DeiT's RASampler; paper §6, Table 8: 76.5% without
    it for DeiT-B) each image is repeated 3 times, the copies going to different processes, and each process
    keeps len // 256 * 256 / world samples: an epoch sees about a third of the images, each 3 times."""
    g = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
    local = args.batch_size // ctx.world
    if args.repeated_aug and ctx.world > 1:
        idx = torch.randperm(n, generator=g).repeat_interleave(3)
        total = math.ceil(len(idx) / ctx.world) * ctx.world
        idx = torch.cat([idx, idx[:total - len(idx)]])[ctx.rank::ctx.world]
        return idx[:n // 256 * 256 // ctx.world]
    steps = n // args.batch_size
    perm = torch.randperm(n, generator=g)[:steps * args.batch_size].view(steps, ctx.world, local)
    return perm[:, ctx.rank].reshape(-1)


class EpochSampler(torch.utils.data.Sampler):
    """epoch_indices for a DataLoader: the role of DistributedSampler (and of DeiT's RASampler)."""

    def __init__(self, n, args, ctx):
        self.n, self.args, self.ctx, self.epoch = n, args, ctx, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        return iter(epoch_indices(self.n, self.args, self.ctx, self.epoch).tolist())

    def __len__(self):
        return len(epoch_indices(self.n, self.args, self.ctx, self.epoch))


def train_batches(data, args, ctx, epoch):
    """Yields (uint8 images, labels, skipped files) of this process's batches."""
    if data.tensors:
        x, y = data.train
        idx = epoch_indices(len(y), args, ctx, epoch).to(ctx.device)
        local = args.batch_size // ctx.world
        for i in range(len(idx) // local):
            b = idx[i * local:(i + 1) * local]
            yield x[b], y[b], []
    else:
        data.sampler.set_epoch(epoch)
        yield from data.train_loader


def val_batches(data, ctx, batch_size):
    if data.tensors:
        x, y = data.val
        idx = torch.arange(ctx.rank, len(y), ctx.world, device=ctx.device)  # disjoint shards, no padding
        for i in range(0, len(idx), batch_size):
            yield x[idx[i:i + batch_size]], y[idx[i:i + batch_size]], []
    else:
        yield from data.val_loader


def steps_per_epoch(data, args, ctx):
    n = len(data.train[1]) if data.tensors else len(data.train)
    steps = len(epoch_indices(n, args, ctx, 0)) // (args.batch_size // ctx.world)
    if steps == 0:
        die(f"--batch-size {args.batch_size} is larger than an epoch of the training set ({n} images)")
    return steps


def make_loaders(data, args, ctx):
    from torch.utils.data import DataLoader, Subset
    kw = dict(num_workers=args.workers, collate_fn=collate_skipping, pin_memory=ctx.device.type == "cuda",
              persistent_workers=args.workers > 0)
    data.sampler = EpochSampler(len(data.train), args, ctx)
    data.train_loader = DataLoader(data.train, args.batch_size // ctx.world, sampler=data.sampler, drop_last=True, **kw)
    data.val_loader = DataLoader(Subset(data.val, range(ctx.rank, len(data.val), ctx.world)), args.batch_size // ctx.world, **kw)
