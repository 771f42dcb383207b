"""
Train DeiT (Touvron et al. 2021) with the reference recipe (facebookresearch/deit main.py), on one CPU, one
GPU, or many through torchrun.

    python train.py                       # a small DeiT on the bundled Fashion-MNIST subset: 82.2% in
                                          # about 4 min on 2 CPU cores (RESULTS.md: command, machine, date)
    torchrun --nproc_per_node=8 train.py --data /imagenet --model deit_small_patch16_224 \
        --epochs 300 --batch-size 1024 --lr 5e-4 --warmup-epochs 5      # DeiT-S as in the paper (Table 9)
    python train.py --model deit_nano_distilled_patch7_28 --distill hard --teacher out/teacher/ckpt.pt
                                          # distillation through attention (§4, distill.py)

The optimisation recipe defaults to DeiT's (paper §6 and Table 9; facebookresearch/deit main.py). Six
defaults fit the bundled demo instead (model, epochs, batch size, lr, warm-up, no padded crop on
Fashion-MNIST); the help text gives DeiT's value beside each. --batch-size is global, the batch of all
processes together, so the learning rate (lr = base_lr * global_batch / 512, paper §6), the logs and the
checkpoints mean the same for any number of processes. Every deliberate difference from the reference
is listed in the README ("Differences from the reference").
"""

import argparse
import copy
import errno
import functools
import gc
import json
import math
import os
import shutil
import socket
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import augment as A
from data import BUNDLED_TEACHER, HERE, EpochSampler, free_memory, load_data, parse_classes, train_batches, val_batches
from distill import CONVNETS, DistillationLoss, check_teacher, create_convnet, load_teacher, ours, rebuild
from model import MODELS, SIZES, check_file, create_model, fit_pos_embed, load_checked, param_groups, read_file, state_dict_of, variant

DEFAULT_MODEL = "deit_nano_patch7_28"  # the default job: 0.68M parameters, 16 tokens of 28-px Fashion-MNIST
NEVER = 2 ** 62  # the step at which the loss became nan/inf, while it has not


# ----------------------------------------------------------------------------------------------------------
# Flags

class HelpFormatter(argparse.HelpFormatter):
    """--help gives each flag's default once: in its text where that says it, else appended (not for off
    switches, and never "None": a flag whose default is None says in words what happens without it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def get_parser():
    p = argparse.ArgumentParser(prog="train.py", description="Train DeiT.", formatter_class=HelpFormatter)
    a = p.add_argument
    # what to train on
    a("--data", default="bundled", help="bundled | fashion-mnist | cifar10 | cifar100 | synthetic | PATH "
      "(a folder of Fashion-MNIST idx files, or an ImageFolder root with train/ and val/)")
    a("--data-dir", default=os.path.join(HERE, "data"), help="where cifar10/cifar100 are kept or downloaded")
    a("--train-subset", type=float, default=None, help="train on a stratified part: a fraction (0.1) or a count (600); default: all")
    a("--classes", default=None, help="keep only these classes, relabelled 0..k-1: '0-4' or '5,7,9'; default: all")
    a("--canvas", type=int, default=None, help="paste each image at a random scale and place on a CANVAS-px "
      "black canvas (the geometry of detect.py's scenes; data.make_canvases), once, from --seed; default input size: CANVAS")
    a("--workers", type=int, default=None, help="DataLoader workers per process, image folders only (default: "
      "this machine's CPUs / its processes, at most 8)")
    a("--decode", choices=["auto", "device", "workers"], default="auto", help="ImageFolder JPEGs: decoded and "
      "cropped on the training device in batches (TorchCodec/nvJPEG; the workers only read files), or in the "
      "workers; auto: device on CUDA when a decoder is installed, else workers (data.py)")
    # model (defaults: the bundled-data demo; the paper's models are deit_{tiny,small,base}_patch16_224)
    a("--model", default=None, help="one of: " + ", ".join([*MODELS, *CONVNETS]) + " (convnet: distill.py's small "
      f"teacher for 28-64 px). Default: {DEFAULT_MODEL}, or {DEFAULT_MODEL.replace('nano_', 'nano_distilled_')} with --distill")
    a("--img-size", type=int, default=None, help="input size (default: the model's); images are resized to it, "
      "and a checkpoint of another size gets its pos_embed resized")
    a("--drop-path", type=float, default=0.1, help="stochastic depth rate of the last block (DeiT: 0.1)")
    # augmentation (augment.py; DeiT's defaults, facebookresearch/deit main.py; paper Table 8: what each is worth)
    a("--crop-pad", type=int, default=None, help="padded random crop for <= 32 px inputs (default: DeiT's 4; "
      "0 for Fashion-MNIST, whose centred items a 4-px shift cuts off); larger inputs get RandomResizedCrop")
    a("--hflip", type=float, default=0.5, help="horizontal flip probability")
    a("--rrc-scale", type=float, default=None, help="RandomResizedCrop at every input size, with this smallest "
      "area fraction (MAE: 0.2); default: DeiT's, 0.08 above 32 px and the padded crop below")
    a("--aa", default="rand-m9-mstd0.5-inc1", help="RandAugment (timm's string), or none")
    a("--three-augment", action="store_true", help="DeiT III's 3-Augment instead of RandAugment and erasing")
    a("--reprob", type=float, default=0.25, help="random erasing probability")
    a("--mixup", type=float, default=0.8, help="Mixup alpha (0: off)")
    a("--cutmix", type=float, default=1.0, help="CutMix alpha (0: off)")
    a("--mixup-switch-prob", type=float, default=0.5, help="probability of CutMix rather than Mixup per batch")
    a("--repeated-aug", action=argparse.BooleanOptionalAction, default=True,
      help="3 repeats of each image on different processes (distributed runs only)")
    # distillation (distill.py; paper §4): the student must be a *_distilled_* model
    a("--distill", default="none", choices=["none", "soft", "hard", "labels"], help="distillation through the dist "
      "token; labels: no teacher, the dist token learns the labels too (paper §4's control: two class tokens)")
    a("--teacher", default=None, help="a torchvision model name (DeiT's: regnet_y_16gf, with torchvision's ImageNet "
      "weights), convnet or a DeiT name with --teacher-weights, or a train.py ckpt.pt. Default: on the bundled data "
      "the convnet trained on it (data/teachers/, made by prepare_data.py --teacher), elsewhere regnet_y_16gf")
    a("--teacher-weights", default=None, help="a weights file for --teacher NAME (default: download torchvision's)")
    a("--distill-alpha", type=float, default=0.5, help="weight of the distillation loss")
    a("--distill-tau", type=float, default=1.0, help="soft distillation temperature (paper's soft runs: 3.0)")
    # optimisation (DeiT's defaults, paper Table 9, except epochs, batch size, lr and warm-up)
    a("--epochs", type=int, default=36, help="DeiT: 300")
    a("--batch-size", type=int, default=128, help="global batch over all processes (DeiT: 1024)")
    a("--lr", type=float, default=8e-3, help="base lr per 512 images, scaled by global batch / 512 (DeiT: 5e-4)")
    a("--min-lr", type=float, default=1e-5, help="the cosine's end")
    a("--warmup-lr", type=float, default=1e-6, help="the linear warm-up's start")
    a("--warmup-epochs", type=float, default=2, help="DeiT: 5; a default longer than the run is cut to --epochs")
    a("--sched", choices=["deit", "mae"], default="deit", help="deit: linear warm-up from --warmup-lr, then a cosine "
      "over the whole run (timm's, as DeiT uses it); mae: warm-up from 0, then a half-cosine over the epochs after "
      "it (MAE's util/lr_sched.py; mae.py's default)")
    a("--weight-decay", type=float, default=0.05, help="AdamW's, none on biases, norms and tokens")
    a("--beta2", type=float, default=0.999, help="AdamW's second-moment decay (DeiT: 0.999; MAE: 0.95)")
    a("--smoothing", type=float, default=0.1, help="label smoothing")
    a("--clip-grad", type=float, default=None, help="max gradient norm (default and DeiT: off)")
    a("--model-ema", action=argparse.BooleanOptionalAction, default=True, help="keep an EMA of the weights")
    a("--model-ema-decay", type=float, default=0.99996, help="per step")
    a("--eval-ema", action="store_true", help="also evaluate the EMA weights each epoch (with --eval-only: only them)")
    # running
    a("--seed", type=int, default=0, help="all random draws derive from it (and the process rank)")
    a("--out-dir", default="out", help="ckpt.pt and log.jsonl; one run at a time")
    a("--resume", nargs="?", const="yes", choices=["yes", "auto"], default=None, help="continue the run in --out-dir "
      "from its ckpt.pt, with the flags it was started with unless given again; --resume auto: continue if there "
      "is one, else start (for torchrun --max-restarts); "
      "default: start a new run")
    a("--ckpt-every-minutes", type=float, default=10, help="also write ckpt.pt within an epoch after this long "
      "(at the next --check-interval step), so that a killed run loses minutes, not the epoch")
    a("--eval-only", action="store_true", help="evaluate a checkpoint (--ckpt, default out-dir/ckpt.pt) and exit; "
      "ours brings its model, data and flags")
    a("--ckpt", default=None, help="checkpoint for --eval-only: ours, an official DeiT .pth, or a state dict; "
      "default: out-dir/ckpt.pt")
    a("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (default: on with CUDA)")
    a("--amp", choices=["bf16", "none"], default=None, help="bf16 autocast (default: bf16 with CUDA, none on CPU)")
    a("--eval-interval", type=int, default=1, help="epochs between evaluations on the held-out split (and the "
      "last epoch): for many short epochs, where evaluating each would cost more than training")
    a("--log-seconds", type=float, default=5, help="seconds between progress lines within an epoch")
    a("--check-interval", type=int, default=100, help="steps between checks for a nan/inf loss (the one wait "
      "for the device within an epoch), which is also when a mid-epoch checkpoint may be written")
    p.set_defaults(script=p.prog)  # for the next steps a run prints (finetune.py and mae.py set their own)
    return p


# Every number flag's valid values, in one table checked in one place (check_args), before anything loads:
# a bad value is one line naming the flag, the value and the range. "[a, b)" as in mathematics; a bound may
# name another flag. finetune.py's and mae.py's flags are here too, checked where the script has them.
RANGES = {
    # train.py: data, model, augmentation
    "train_subset": "(0, inf)", "canvas": "[8, inf)", "workers": "[0, inf)", "img_size": "[1, inf)", "drop_path": "[0, 1)",
    "crop_pad": "[0, inf)", "hflip": "[0, 1]", "rrc_scale": "(0, 1]", "reprob": "[0, 1]", "mixup": "[0, inf)",
    "cutmix": "[0, inf)", "mixup_switch_prob": "[0, 1]", "distill_alpha": "[0, 1]", "distill_tau": "(0, inf)",
    # optimisation
    "epochs": "[1, inf)", "batch_size": "[1, inf)", "lr": "(0, inf)", "min_lr": "[0, inf)", "warmup_lr": "[0, inf)",
    "warmup_epochs": "[0, epochs]", "weight_decay": "[0, inf)", "beta2": "[0, 1)", "smoothing": "[0, 1)",
    "clip_grad": "(0, inf)", "model_ema_decay": "[0, 1]",
    # running
    "seed": "[0, 4294967296)", "ckpt_every_minutes": "[0, inf)", "log_seconds": "[0, inf)", "check_interval": "[1, inf)",
    "eval_interval": "[1, inf)",
    # finetune.py
    "layer_decay": "(0, 1]", "head_init_std": "(0, inf)",
    # mae.py
    "mask_ratio": "[0, 1)", "decoder_dim": "[1, inf)", "decoder_depth": "[0, inf)", "decoder_heads": "[1, inf)",
    # detect.py
    "scenes": "[1, inf)", "val_scenes": "[1, inf)", "fpn_channels": "[1, inf)",
}


FILES_READ = ("teacher_weights", "ckpt", "weights", "probe")  # flags naming a file that must exist


def out_of_range(name, spec, args):
    """None if args.<name> lies in spec (a RANGES entry), else the one-line complaint."""
    flags = vars(args)
    lo, hi = (b.strip() for b in spec[1:-1].split(","))
    lo_v, hi_v = (flags[b] if b in flags else float(b) for b in (lo, hi))
    value = flags[name]
    if (lo_v < value if spec[0] == "(" else lo_v <= value) and (value < hi_v if spec[-1] == ")" else value <= hi_v):
        return None
    named = lambda b: f"--{b.replace('_', '-')} {flags[b]:g}" if b in flags else b
    bound = (f"above {lo}" if spec[0] == "(" else f"at least {lo}") if hi == "inf" else \
        f"in {spec[0]}{named(lo)}, {named(hi)}{spec[-1]}"
    return f"--{name.replace('_', '-')} must be {bound}, not {value:g}"


def check_args(args, ctx, given=()):
    """Flags that cannot work, each one line before anything loads (RANGES, the files to read, and what a
    range cannot say); the --workers default. A default warm-up (one not in given, the flags on the command
    line) longer than a short run is cut to the run (`--epochs 1` warms up over its one epoch)."""
    flags = vars(args)
    if "warmup_epochs" not in given and args.warmup_epochs > args.epochs:
        args.warmup_epochs = float(args.epochs)
    for name, spec in RANGES.items():
        problem = out_of_range(name, spec, args) if flags.get(name) is not None else None
        if problem:
            raise ValueError(problem)
    for name in FILES_READ:
        if flags.get(name) is not None:
            check_file(flags[name], f"--{name.replace('_', '-')}")
    if args.batch_size % ctx.world:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the {ctx.world} processes")
    if args.distill in ("soft", "hard"):
        check_teacher(default_teacher(args), args.teacher_weights)
    if args.classes is not None:
        parse_classes(args.classes, math.inf)  # its form; the class numbers are checked against the data's
    if args.aa != "none":
        A.parse_aa(args.aa)  # a malformed string fails now, not at the first step
    if args.workers is None:  # the machine's CPUs shared by the processes on it (torchrun's LOCAL_WORLD_SIZE)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        args.workers = max(1, min(8, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def start(parser, argv=None, defaults=None):
    """What every entry point (train.py, finetune.py, mae.py) does first: the flags, checked; the processes;
    the out-dir's lock (process 0, before anything slow: a run started a moment later must not win the
    out-dir while this one loads); the seed and process 0's printer. Flags the command line leaves out come
    from the checkpoint that --resume continues or --eval-only evaluates (ours: `--resume --epochs 72`
    trains on as the run began), then from defaults(args) if given (finetune.py: from its weights), then
    from the parser. Returns (args, ctx, log); ctx.lock is the held lock file (None: not process 0, or
    --eval-only, which writes nothing)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    unset = object()  # parsed into a namespace that holds it everywhere, a flag the command line gives replaces it
    given = {k for k, v in vars(parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset)))).items()
             if v is not unset}
    ctx = setup_distributed(args.amp)
    check_args(args, ctx, given)
    ctx.lock = lock_out_dir(args.out_dir) if ctx.master and not args.eval_only else None
    inherited = {**(defaults(args) if defaults else {}), **saved_flags(args)}
    if inherited:  # argparse sets a default only where the namespace has no value yet
        args = parser.parse_args(argv, namespace=argparse.Namespace(**inherited))
        check_args(args, ctx, given)
    torch.manual_seed(args.seed + ctx.rank)  # seed + rank, as the reference (drop path differs per process)
    log = print if ctx.master else (lambda *a, **k: None)
    return args, ctx, log


def saved_flags(args):
    """The flags of our checkpoint that --eval-only evaluates or --resume continues, but not those of this
    machine or invocation (NOT_INHERITED)."""
    path = args.ckpt if args.eval_only and args.ckpt else os.path.join(args.out_dir, "ckpt.pt")
    if not (args.eval_only or args.resume) or not os.path.isfile(path):
        return {}
    ckpt = read_file(path, "checkpoint")
    if not ours(ckpt):
        return {}
    return {k: v for k, v in ckpt["config"].items() if k in vars(args) and k not in NOT_INHERITED}


NOT_INHERITED = ("out_dir", "resume", "eval_only", "ckpt", "workers", "script")


# ----------------------------------------------------------------------------------------------------------
# Setup: processes and devices (torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without it, one process), the
# models, the teacher, the recipe.

def setup_distributed(amp=None):
    """Processes, device, and the autocast context: bf16 by default on CUDA, on any device with amp="bf16"
    (so the tests run the CUDA path's autocast on the CPU)."""
    ddp = "RANK" in os.environ
    cuda = torch.cuda.is_available()
    if ddp:
        rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        if cuda:
            torch.cuda.set_device(local_rank)
        # under torchrun --max-restarts, each restart meets in the same store as the processes it replaces:
        # a key prefix of its own keeps the new processes from finding the dead ones' addresses (gloo then
        # fails with "connection refused", or waits out its 30-minute timeout)
        store, _, _ = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group(backend="nccl" if cuda else "gloo", store=store, rank=rank, world_size=world)
        if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun's agent (not by another launcher)
            stop_with_parent(rank)
    else:
        rank, world, local_rank = 0, 1, 0
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:  # TF32 for any fp32 matmul left outside autocast
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    bf16 = cuda if amp is None else amp == "bf16"
    return argparse.Namespace(ddp=ddp, rank=rank, world=world, device=device, master=rank == 0,
                              autocast=torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext())


def stop_with_parent(rank):
    """A worker of torchrun stops when its agent dies. The agent stops its workers when it ends normally, but a
    kill -9 gives it no chance: they would live on as orphans, keep the out-dir's lock and wait for peers that
    are gone, and the same command could not run again. A thread watches for the parent to change (the
    orphan is adopted by init or a subreaper) and ends the process; the lock goes with it."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        print(f"rank {rank}: the torchrun agent (pid {parent}) is gone: stopping", file=sys.stderr, flush=True)
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="stop_with_parent").start()


def all_sum(values, ctx):
    """Sum a list of numbers (or a float64 tensor) over all processes; the result is read back to the host."""
    t = torch.as_tensor(values, dtype=torch.float64, device=ctx.device)
    if ctx.ddp:
        dist.all_reduce(t)
    return t.tolist()


def check_model(args, ctx=None):
    """--model and --distill, checked before anything loads (model.variant names the known models), and with
    ctx whether a training step can fit in memory. Without --model: the default job's model, its distilled
    variant with --distill (so that `torchrun ... train.py --distill hard` runs as typed). Returns the input
    size: --img-size, else the variant's (a convnet: None, the data's own)."""
    if args.model is None:
        args.model = DEFAULT_MODEL.replace("nano_", "nano_distilled_") if args.distill != "none" else DEFAULT_MODEL
    v = None if args.model in CONVNETS else variant(args.model)
    if v and args.img_size and args.img_size % v.patch_size:
        raise ValueError(f"--img-size {args.img_size} is not a multiple of {args.model}'s patch size {v.patch_size}: "
                         f"try {max(1, round(args.img_size / v.patch_size)) * v.patch_size}")
    if args.distill != "none" and not (v and v.distilled):
        raise ValueError(f"--distill {args.distill} needs a student with a distillation token, and {args.model} has "
                         f"none; distilled models: {', '.join(m for m, v in MODELS.items() if v.distilled)}")
    size = args.img_size or getattr(args, "canvas", None) or (v.img_size if v else None)
    if ctx is not None and size:
        check_memory(args, ctx, v, size)
    return size


def check_memory(args, ctx, v, size):
    """Refuse, before anything loads, a step that cannot fit: `--img-size 7000` would otherwise run out of
    memory after a minute with no message (or be killed by the OS). step_bytes is a lower bound, so a run
    it lets through may still not fit, but one it stops cannot."""
    free = free_memory(ctx.device)
    if free is None:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if ctx.device.type == "cpu" else 1  # processes sharing it
    flags = vars(args)  # mae.py's encoder sees the unmasked share; finetune.py --freeze keeps no activations
    kept = 0 if flags.get("freeze") else 1 - (flags.get("mask_ratio") or 0)
    need, tokens = step_bytes(v, size, args.batch_size // ctx.world, not isinstance(ctx.autocast, nullcontext), kept)
    if need * local > free:
        raise ValueError(f"a training step of {args.model} at --img-size {size} ({tokens} tokens an image) with "
                         f"{args.batch_size // ctx.world} images per process needs at least {need / 2**30:.1f} GiB, "
                         f"and {free / 2**30:.1f} GiB of {ctx.device.type} memory is free"
                         + (f" for {local} processes" if local > 1 else "") + ": lower --img-size or --batch-size")


def step_bytes(v, size, batch, bf16, kept=1.0):
    """A lower bound on the memory one training step holds (bytes), and the tokens an image: the batch
    through augmentation (3 channels of float32, 4 copies), and for a ViT the activations its backward keeps
    (about 16 numbers per token and channel in each block: 2 norms, q, k, v, the attention's output and
    projection, the MLP's 4x-wide hidden layer before and after GELU; 2 bytes each under bf16 autocast), the
    weights, their gradients and AdamW's two moments; kept: the share of the activations kept. A convnet
    (v None): the batch only."""
    images = batch * 3 * size * size * 4 * 4
    if v is None:
        return images, None
    width, depth, _ = SIZES[v.size]
    tokens = (size // v.patch_size) ** 2 + 1 + v.distilled
    params = 12 * depth * width * width
    return images + int(kept * 16 * tokens * width * depth * batch * (2 if bf16 else 4)) + 16 * params, tokens


def build_model(args, data, ctx, img_size, global_pool=None):
    if args.model in CONVNETS:
        return create_convnet(args.model, data.num_classes, data.in_chans).to(ctx.device)
    return create_model(args.model, num_classes=data.num_classes, img_size=img_size, in_chans=data.in_chans,
                        drop_path_rate=args.drop_path, global_pool=global_pool).to(ctx.device)


def default_teacher(args):
    """--teacher, or without it DeiT's teacher, except on the bundled data, which ships its own."""
    if args.teacher is not None:
        return args.teacher
    if args.data != "bundled":
        return "regnet_y_16gf"
    if not os.path.isfile(BUNDLED_TEACHER):
        raise ValueError(f"the bundled data's teacher {BUNDLED_TEACHER} is missing: make it with "
                         "python prepare_data.py --teacher (85 s on a 2-core CPU)")
    return BUNDLED_TEACHER


def build_teacher(args, data, img_size, log):
    """The teacher for --distill soft/hard (distill.py), checked against the data before training starts."""
    if args.distill in ("none", "labels"):
        return None
    args.teacher = default_teacher(args)
    size = data.train[0].shape[-1] if data.tensors else img_size
    teacher = load_teacher(args.teacher, args.teacher_weights, data.num_classes, data.in_chans, size)
    log(f"teacher {args.teacher}: {sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M params, {args.distill} "
        f"distillation, alpha {args.distill_alpha}" + (f", tau {args.distill_tau}" if args.distill == "soft" else ""))
    return teacher


def augmentation(args, data):
    """augment.deit_augment with the flags and the data's values filled in: f(x, y, rng, gen)."""
    return functools.partial(A.deit_augment, num_classes=data.num_classes, mean=data.mean, std=data.std,
                             cropped=not data.tensors, crop_pad=data.crop_pad if data.tensors else 0,
                             rrc_scale=args.rrc_scale, hflip=args.hflip, aa=args.aa, three_aug=args.three_augment,
                             reprob=args.reprob, mixup=args.mixup, cutmix=args.cutmix,
                             switch_prob=args.mixup_switch_prob, smoothing=args.smoothing)


def lr_at(epoch_float, args, peak):
    """--sched deit: a linear warm-up from warmup_lr, then a cosine to min_lr over the whole run (timm's
    CosineLRScheduler without warmup_prefix, as DeiT uses it). Deliberate difference: the reference steps it
    once per epoch, calling step(epoch) after the epoch, so it runs one epoch behind (epochs 0 and 1 both at
    1e-6, the peak never reached); we evaluate it at every step, at the fractional epoch, with no lag.
    --sched mae: MAE's adjust_learning_rate (util/lr_sched.py), which is also evaluated at every step: a
    warm-up from 0, then a half-cosine to min_lr over the epochs after the warm-up."""
    e, w = epoch_float, args.warmup_epochs
    if args.sched == "mae":
        if e < w:
            return peak * e / w
        return args.min_lr + 0.5 * (peak - args.min_lr) * (1 + math.cos(math.pi * (e - w) / (args.epochs - w)))
    if e < w:
        return args.warmup_lr + (peak - args.warmup_lr) * e / w
    return args.min_lr + 0.5 * (peak - args.min_lr) * (1 + math.cos(math.pi * e / args.epochs))


def compute_loss(out, targets, smoothing):
    """Cross-entropy with the soft targets of Mixup/CutMix (smoothing already folded in), or with label
    smoothing, (1-s)*nll + s*mean_c(-log p), when nothing is mixed (paper Table 9: smoothing 0.1). A distilled
    model trained without distillation: only its class head is trained, as in the reference."""
    logits = (out[0] if isinstance(out, tuple) else out).float()
    if targets.ndim == 2:
        return -(targets * logits.log_softmax(-1)).sum(-1).mean()
    return F.cross_entropy(logits, targets, label_smoothing=smoothing)


def wrap(args, ctx, model, teacher, compile_):
    """What a training step calls: the model compiled and in DDP as asked, and the loss, whose teacher is on
    the device, frozen, and on CUDA in channels_last and compiled like the student."""
    unused = model.cfg.distilled and args.distill == "none"  # head_dist then gets no gradient
    if compile_:
        model = torch.compile(model)
    if ctx.ddp:
        model = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                    find_unused_parameters=unused)
    if teacher is not None:
        teacher = teacher.to(ctx.device).eval().requires_grad_(False)
        if ctx.device.type == "cuda":
            teacher = teacher.to(memory_format=torch.channels_last)
        teacher = torch.compile(teacher) if compile_ else teacher
    return model, DistillationLoss(functools.partial(compute_loss, smoothing=args.smoothing), teacher, args.distill,
                                   args.distill_alpha, args.distill_tau)


# ----------------------------------------------------------------------------------------------------------
# The loop

def main(argv=None):
    args, ctx, log = start(get_parser(), argv)
    if args.eval_only:
        return eval_only(args, ctx, log)
    img_size = check_model(args, ctx)
    data = load_data(args, ctx.device, img_size)
    model = build_model(args, data, ctx, img_size)
    return train(args, ctx, model, data, log, build_teacher(args, data, img_size, log))


@dataclass
class Run:
    """A run's state besides the model's weights and the data: made by start_run, resumed from disk by
    resume_or_start, advanced by train_step, written by save_checkpoint."""
    model: Any  # the model itself: what checkpoints hold
    net: Any  # what a step calls: the model, compiled and in DDP as asked
    criterion: Any  # distill.DistillationLoss: the labels' loss, and the teacher's when distilling
    augment: Any  # augment.deit_augment with the run's flags: (x, y, rng, gen) -> (images, targets)
    opt: Any
    ema: Any  # an EMA copy of the model, or None
    ema_pairs: Any  # (EMA, model) tensors: (averaged, copied)
    sampler: EpochSampler
    task: Any  # None: classification; mae.py's reconstruction or detect.py's detection (augment, loss,
    # evaluate, after_epoch, next_steps)
    peak: float  # the peak lr
    spe: int  # steps per epoch
    compile: bool
    ckpt_path: str
    log_path: str
    start_epoch: int = 0  # where this session starts (resumed: epochs done, steps done in the next one)
    start_step: int = 0
    partial: Optional[dict] = None  # a mid-epoch checkpoint's loss sums of the epoch so far
    done_steps: int = 0
    t_start: float = 0.0
    t_ckpt: float = 0.0
    nonfinite_at: Any = None  # on the device: the first step whose loss was nan/inf, else NEVER (no wait)


def start_run(args, ctx, model, data, teacher, log, task=None, layer_decay=1.0):
    """Everything a run holds besides the model and the data: the sampler, AdamW, the EMA, the compiled / DDP
    model and the loss, resumed from out_dir with --resume."""
    n_train = len(data.train[1]) if data.tensors else len(data.train)
    sampler = EpochSampler(n_train, args.batch_size, args.seed, ctx.rank, ctx.world, 3 if args.repeated_aug else 1)
    peak = args.lr * args.batch_size / 512  # DeiT's linear scaling rule (paper §6)
    # fused: one kernel for all parameters, and no .item() on the step counts (the for-each AdamW reads them)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay, layer_decay), lr=peak, betas=(0.9, args.beta2),
                            eps=1e-8, fused=True)
    ema, pairs = None, None
    if args.model_ema:  # the weights and the float buffers (BatchNorm's statistics) are averaged, the integer
        ema = copy.deepcopy(model).eval().requires_grad_(False)  # buffers copied (timm's ModelEmaV3)
        both = list(zip(ema.state_dict().values(), model.state_dict().values()))
        pairs = [list(zip(*[p for p in both if p[0].is_floating_point() == avg])) or [[], []] for avg in (True, False)]
    compiled = ctx.device.type == "cuda" if args.compile is None else args.compile
    net, criterion = wrap(args, ctx, model, teacher, compiled)
    augment = task.augment if task is not None and task.augment is not None else augmentation(args, data)
    run = Run(model, net, criterion, augment, opt, ema, pairs, sampler, task, peak, sampler.steps,
              compiled, os.path.join(args.out_dir, "ckpt.pt"), os.path.join(args.out_dir, "log.jsonl"),
              nonfinite_at=torch.tensor(NEVER, device=ctx.device))
    run.start_epoch, run.start_step, run.partial = resume_or_start(args, ctx, run, log)
    if ctx.master:
        log(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params | {run.spe} steps/epoch x "
            f"{args.epochs} epochs | global batch {args.batch_size} on {ctx.world} process(es), {ctx.device.type} | "
            f"peak lr {peak:.2e} | compile {run.compile} | autocast {not isinstance(ctx.autocast, nullcontext)}"
            + ("" if data.tensors else f" | decode: {data.decode}"))
    return run


def train_step(args, ctx, run, x, y, step):
    """One step on this process's uint8 batch: augment, forward, backward, AdamW, EMA. Nothing in it waits for
    the device (test_training_step_never_waits): its random choices are drawn on the host, and the loss and
    the nan check stay on the device. Returns the loss (a device tensor) and the lr."""
    # this step's draws: a function of (seed, step, rank), so a resumed run repeats them
    rng = np.random.default_rng([args.seed, step, ctx.rank])
    gen = torch.Generator(ctx.device).manual_seed((args.seed * 1_000_003 + step) * 1009 + ctx.rank)  # noise only
    x, targets = run.augment(x, y, rng, gen)
    lr = lr_at(step / run.spe, args, run.peak)
    for g in run.opt.param_groups:
        g["lr"] = lr * g["lr_scale"]
    with ctx.autocast:  # the teacher sees x too: the same mixed, augmented batch (reference)
        loss = run.criterion(x, run.net(x), targets) if run.task is None else run.task.loss(run, x, targets, gen)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    if args.clip_grad is not None:
        torch.nn.utils.clip_grad_norm_(run.net.parameters(), args.clip_grad)
    run.opt.step()
    if run.ema is not None:
        (ema, model), (ema_int, model_int) = run.ema_pairs
        torch._foreach_lerp_(ema, model, 1 - args.model_ema_decay)
        if ema_int:
            torch._foreach_copy_(ema_int, model_int)
    loss = loss.detach()
    run.nonfinite_at = torch.where(torch.isfinite(loss) | (run.nonfinite_at < NEVER), run.nonfinite_at, step)
    return loss, lr


def train(args, ctx, model, data, log=print, teacher=None, task=None, layer_decay=1.0):
    """The training loop; finetune.py calls it with a model it prepared (and its layer decay), mae.py with its
    task. With args.distill other than none, teacher (eval mode, no grad) trains the distillation head."""
    run = start_run(args, ctx, model, data, teacher, log, task, layer_decay)
    run.t_start = run.t_ckpt = time.time()
    for epoch in range(run.start_epoch, args.epochs):
        start = run.start_step if epoch == run.start_epoch else 0  # > 0: resumed from a mid-epoch checkpoint
        run.net.train()
        t0 = t_log = time.time()
        seen = seen_log = 0  # images (all processes), at the last progress line
        partial = run.partial if start else None
        loss_n = partial["loss_n"] if partial else 0
        loss_sum = torch.tensor(partial["loss_sum"] if partial else 0.0, device=ctx.device)  # summed on the device
        for i, (x, y) in enumerate(train_batches(data, run.sampler, epoch, ctx.device, start), start):
            loss, lr = train_step(args, ctx, run, x, y, epoch * run.spe + i)
            loss_sum += loss
            loss_n, seen, run.done_steps = loss_n + 1, seen + len(y) * ctx.world, run.done_steps + 1
            if (i + 1) % args.check_interval == 0 and i + 1 < run.spe:  # the one place a step may wait
                if check_finite(run, ctx, ctx.master and time.time() - run.t_ckpt > 60 * args.ckpt_every_minutes):
                    save_checkpoint(args, ctx, run, data, epoch, i + 1, {"loss_sum": loss_sum.item(), "loss_n": loss_n})
            if ctx.master and time.time() - t_log > args.log_seconds and i + 1 < run.spe:  # process 0's clock
                eta = (time.time() - run.t_start) / run.done_steps * ((args.epochs - epoch) * run.spe - i - 1)
                log(f"epoch {epoch + 1} step {i + 1}/{run.spe} | loss {loss.item():.4f} | lr {lr:.2e} | "
                    f"{(seen - seen_log) / (time.time() - t_log):.0f} img/s | eta {fmt_time(eta)}")
                t_log, seen_log = time.time(), seen
        check_finite(run, ctx)
        train_time = time.time() - t0
        end_of_epoch(args, ctx, run, data, epoch, dict(train_loss=loss_sum.item() / max(loss_n, 1), lr=lr,
                     img_per_s=seen / train_time, epoch_time=train_time), log)
    if ctx.master:
        summary(args, run, log)
    return model


def end_of_epoch(args, ctx, run, data, epoch, stats, log):
    """Evaluate, then write the epoch's log line, save the checkpoint and print the line. stats: this
    process's train_loss (mean over its steps), lr, img_per_s, epoch_time."""
    batch = max(256, args.batch_size // ctx.world)
    if not evaluated(args, epoch):
        metrics = {}  # --eval-interval: not this epoch
    elif run.task is not None:
        metrics = run.task.evaluate(run, data, ctx, batch)
    else:
        metrics = evaluate(run.net, data, ctx, batch)
        if run.ema is not None and args.eval_ema:
            metrics["ema_top1"] = evaluate(run.ema, data, ctx, batch)["top1"]
    train_loss, n_skipped = all_sum([stats["train_loss"], len(data.skipped)], ctx)
    record = {"epoch": epoch + 1, "step": (epoch + 1) * run.spe, "train_loss": train_loss / ctx.world, **metrics,
              "lr": stats["lr"], "img_per_s": stats["img_per_s"], "epoch_time": stats["epoch_time"],
              "skipped_images": int(n_skipped), "skipped_val_images": metrics.pop("skipped", 0)}
    if run.compile:  # every recompile or graph break costs time: one graph for training, one for evaluation
        c = torch._dynamo.utils.counters
        record.update(compiled_frames=c["frames"]["total"], graph_breaks=sum(c["graph_break"].values()))
    save_checkpoint(args, ctx, run, data, epoch + 1, 0, None, record)
    if not ctx.master:
        return
    if run.task is not None and evaluated(args, epoch):
        run.task.after_epoch(run, data, epoch)
    eta = (time.time() - run.t_start) / max(run.done_steps, 1) * (args.epochs - epoch - 1) * run.spe
    heads = f" (cls {metrics['top1_cls']:.2f} dist {metrics['top1_dist']:.2f})" if "top1_cls" in metrics else ""
    log(f"epoch {epoch + 1}/{args.epochs} | loss {record['train_loss']:.4f} | lr {stats['lr']:.2e} | "
        f"{record['img_per_s']:.0f} img/s" + (f" | val loss {metrics['val_loss']:.4f}" if "val_loss" in metrics else "")
        + (f" | mAP {metrics['map']:.2f} AP50 {metrics['ap50']:.2f}" if "map" in metrics else "")
        + (f" mask mAP {metrics['mask_map']:.2f}" if "mask_map" in metrics else "")
        + (f" top1 {metrics['top1']:.2f} top5 {metrics['top5']:.2f}" if "top1" in metrics else "")
        + heads + (f" ema top1 {metrics['ema_top1']:.2f}" if "ema_top1" in metrics else "")
        + (f" | skipped {int(n_skipped)} images" if n_skipped else "")
        + (f" | skipped {record['skipped_val_images']} val images" if record["skipped_val_images"] else "")
        + f" | eta {fmt_time(eta)}"
        + (f" | compiled {record['compiled_frames']} frames, {record['graph_breaks']} graph breaks" if run.compile else ""))


def evaluated(args, epoch):
    """Whether epoch (0-based) ends with an evaluation: every --eval-interval epochs, and the last."""
    return (epoch + 1) % args.eval_interval == 0 or epoch + 1 == args.epochs


@torch.no_grad()
def evaluate(model, data, ctx, batch_size):
    """Top-1, top-5 and cross-entropy (no smoothing) on the held-out split, summed over all processes.
    A distilled model predicts with the mean of its two heads' logits (as the reference); its heads are
    also scored alone, as top1_cls and top1_dist (paper Table 3)."""
    raw = getattr(model, "module", model)  # under DDP and torch.compile: the model itself
    raw = getattr(raw, "_orig_mod", raw)
    distilled = raw.cfg.distilled
    model.eval()
    sums = torch.zeros(6, dtype=torch.float64, device=ctx.device)  # loss, top1, top5, n, cls1, dist1: no wait
    skipped = []  # image folders: files that cannot be decoded, named as they are met
    for x, y in val_batches(data, batch_size, ctx.device, ctx.rank, ctx.world, skipped):
        x = A.normalize(x, data.mean, data.std)
        with ctx.autocast:
            out = raw.forward_heads(x) if distilled else model(x)
        logits = ((out[0] + out[1]) / 2 if distilled else out).float()  # the mean = model(x) in eval mode
        topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums[0] += F.cross_entropy(logits, y, reduction="sum").double()
        sums[3] += len(y)
        hits = [topk[:, 0] == y, (topk == y[:, None]).any(1)] + ([o.argmax(1) == y for o in out] if distilled else [])
        for k, hit in zip((1, 2, 4, 5), hits):
            sums[k] += hit.sum()
    loss, top1, top5, n, cls1, dist1, n_skipped = all_sum([*sums.tolist(), len(skipped)], ctx)
    model.train()
    if n == 0:
        raise ValueError("no held-out image could be read: check the val/ split of --data")
    heads = {"top1_cls": 100 * cls1 / n, "top1_dist": 100 * dist1 / n} if distilled else {}
    return {"val_loss": loss / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n, **heads, "skipped": int(n_skipped)}


def check_finite(run, ctx, want_checkpoint=False):
    """Stop at a nan/inf loss before anything is saved: the last checkpoint stays the last good one. It reads
    values back from the device, so it runs every --check-interval steps and at the end of an epoch only,
    on every process at the same step; it also tells all of them whether process 0 asks for a mid-epoch
    checkpoint (its clock alone decides, so that all agree). Returns that answer."""
    flags = torch.stack([run.nonfinite_at, torch.full_like(run.nonfinite_at, -int(want_checkpoint))])
    if ctx.ddp:
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    s, want = flags.tolist()
    if s < NEVER:
        kept = f"the last good checkpoint {run.ckpt_path} is kept" if os.path.exists(run.ckpt_path) else "no checkpoint was written"
        raise ValueError(f"loss became nan/inf at step {s} (epoch {s // run.spe + 1}); stopped, {kept}. "
                         "Try a lower --lr or --clip-grad")
    return want < 0


def summary(args, run, log):
    """The last lines of a run: where it ended, where its files are, what to do next."""
    records = [json.loads(l) for l in open(run.log_path)] if os.path.exists(run.log_path) else []
    if not records:
        return
    key = next(k for k in ("top1", "map", "val_loss") if k in records[-1])
    sign = -1 if key == "val_loss" else 1
    best = max((r for r in records if key in r), key=lambda r: sign * r[key])  # (--eval-interval: some have none)
    steps = run.task.next_steps(args) if run.task else next_steps(args)
    log(f"done: {records[-1]['epoch']} epochs in {fmt_time(time.time() - run.t_start)} (this session) | final {key} "
        f"{records[-1][key]:.4g} | best {key} {best[key]:.4g} (epoch {best['epoch']})\n"
        f"  checkpoint {run.ckpt_path}, log {run.log_path}" + "".join(f"\n  {s}" for s in steps))


def next_steps(args):
    """What to run next, as commands that work as printed (test_next_steps_work_as_printed)."""
    return [f"evaluate: python train.py --eval-only --out-dir {args.out_dir}",
            f"train on: python {args.script} --resume --epochs {2 * args.epochs} --out-dir {args.out_dir}"]


def fmt_time(s):
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


def eval_only(args, ctx, log):
    """--eval-only: evaluate --ckpt (ours, an official release file or a state dict). One of ours brings its
    model (model_config) and its flags (start: data, classes, image size); another file takes --model."""
    path = args.ckpt or os.path.join(args.out_dir, "ckpt.pt")
    ckpt = read_file(path, "checkpoint")
    img_size = check_model(args)
    data = load_data(args, ctx.device, img_size)
    model = rebuild(ckpt, img_size=img_size).to(ctx.device) if ours(ckpt) else build_model(args, data, ctx, img_size)
    if ours(ckpt) and ckpt["model_config"]["num_classes"] != data.num_classes:
        raise ValueError(f"{path} predicts {ckpt['model_config']['num_classes']} classes, the data has "
                         f"{data.num_classes}: give the --data (and --classes) it was trained on")
    load_checked(model, fit_pos_embed(state_dict_of(ckpt, path, args.eval_ema), model), path)
    metrics = evaluate(model, data, ctx, max(256, args.batch_size // ctx.world))
    log(f"{path}: val loss {metrics['val_loss']:.4f} | top1 {metrics['top1']:.2f} | top5 {metrics['top5']:.2f}"
        + (f" | class head {metrics['top1_cls']:.2f} | dist head {metrics['top1_dist']:.2f}" if "top1_cls" in metrics else ""))
    return metrics


@contextmanager
def cli():
    """`with cli(): main()`: the convention of every file here is that a problem the user can fix (a bad flag,
    a missing file, weights that do not fit, a diverged run) raises ValueError with a one-line message; this
    is the one place that turns it into "error: ..." on stderr and exit code 2 instead of a traceback."""
    try:
        yield
        if dist.is_initialized():  # leave together: none closes its connections while another still works
            dist.barrier()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint written is kept: continue with --resume", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            # The process group is taken down while Python is whole: destroyed, then what still refers to it
            # (DDP's reducer, in reference cycles) collected now, not in the interpreter's teardown, whose
            # order of destruction is arbitrary. (One clean-clone test suite in 11 on a loaded 2-core machine
            # had a 2-process run end in "terminate called without an active exception" in a worker; 37 runs
            # of such commands alone did not: this is the defence, not a proof.)
            dist.destroy_process_group()
            gc.collect()


# ----------------------------------------------------------------------------------------------------------
# A run's state on disk: out_dir/ckpt.pt (plain types and tensors only, so torch.load(weights_only=True)
# reads it) and out_dir/log.jsonl, one JSON line per epoch; one run per out_dir.

def lock_out_dir(out_dir):
    """One out-dir, one run: process 0 holds an exclusive lock on out_dir/lock for its whole life. The OS
    releases it when the process ends in any way, kill -9 included, so a dead run never blocks a new one.
    It is a POSIX record lock (lockf), which belongs to this process alone: DataLoader workers forked from
    it do not hold it too (flock's would pass to them, and outlive a killed run in them). Also where an
    out-dir that cannot be written is found, before any training. Returns the open file."""
    path = os.path.join(out_dir, "lock")
    try:
        os.makedirs(out_dir, exist_ok=True)
        f = open(path, "a+")
    except OSError as e:
        raise ValueError(f"cannot write to --out-dir {out_dir}: {e.strerror or e}")
    try:
        import fcntl
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # not on Linux/macOS: no lock
        pass
    except OSError:
        f.seek(0)
        raise ValueError(f"--out-dir {out_dir} is in use by another run ({f.read().strip() or 'starting'}): "
                         "wait for it to end, or choose another --out-dir")
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
    except OSError as e:  # a full disk
        raise ValueError(f"cannot write to --out-dir {out_dir}: {e.strerror or e}")
    for name in os.listdir(out_dir):  # temp files of a run killed while writing: no one else writes here
        if name.endswith(".tmp"):
            os.remove(os.path.join(out_dir, name))
    return f


def write_atomic(path, save, what="the previous file is kept"):
    """save(tmp) writes to a temp file of this process, then it replaces path in one step: a kill or a full
    disk mid-write leaves the previous file intact and no temp file behind, and a disk problem is one line.
    (torch.save reports a full disk as RuntimeError "unexpected pos", not OSError: the free space tells.)"""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        save(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise write_error(path, e, what) from None


def append_line(path, line):
    """Append one line to a log, all or nothing: a disk that fills mid-write is cut back to the lines before."""
    size = os.path.getsize(path) if os.path.exists(path) else 0
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        if os.path.exists(path):
            os.truncate(path, size)
        raise write_error(path, e, "it keeps its earlier lines") from None


def write_error(path, e, what):
    """The one line for a write that failed (OSError, or torch.save's RuntimeError on a full disk), saying
    what is kept; a RuntimeError with disk space to spare is a fault of ours, raised as it is."""
    full = getattr(e, "errno", None) == errno.ENOSPC or disk_full(path)
    if not (full or isinstance(e, OSError)):
        raise e
    reason = "No space left on device (the disk is full)" if full else (e.strerror or str(e))
    return ValueError(f"cannot write {path}: {reason}; {what}")


def write_lines(path, lines):
    with open(path, "w") as f:  # closed here, so that a full disk raises here (not, unseen, at garbage collection)
        f.writelines(l + "\n" for l in lines)


def disk_full(path, least=1 << 20):
    """Whether the filesystem of path has less than least bytes free (1 MiB)."""
    try:
        return shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < least
    except OSError:
        return False


def resume_or_start(args, ctx, run, log):
    """With --resume: the weights, optimizer, EMA and every process's RNG state and partial epoch sums of
    out_dir/ckpt.pt, and the log lines of the epochs it holds (--resume auto: only if there is one). Without:
    refuse to overwrite a run. Returns (epochs done, steps done in the next epoch, this process's partial
    sums of that epoch or None)."""
    exists = os.path.exists(run.ckpt_path)
    if args.resume is None or (args.resume == "auto" and not exists):
        if exists:
            raise ValueError(f"{run.ckpt_path} exists: add --resume to continue that run, or choose another --out-dir")
        if ctx.master and os.path.exists(run.log_path):
            os.remove(run.log_path)
        return 0, 0, None
    if not exists:
        raise ValueError(f"--resume: there is no {run.ckpt_path} to continue; drop --resume to start a new run "
                         "(--resume auto does either)")
    ckpt = read_file(run.ckpt_path, "checkpoint")
    epoch, epoch_step = ckpt["epoch"], ckpt.get("epoch_step", 0)
    if epoch >= args.epochs and args.resume == "yes":
        raise ValueError(f"the run in {args.out_dir} is finished ({epoch} of {args.epochs} epochs): raise --epochs "
                         f"to train on, or evaluate it: python train.py --eval-only --out-dir {args.out_dir}")
    load_checked(run.model, ckpt["model"], run.ckpt_path)
    run.opt.load_state_dict(ckpt["optimizer"])
    if run.ema is not None and ckpt.get("ema") is not None:
        run.ema.load_state_dict(ckpt["ema"])
    state = ckpt["rng"][ctx.rank] if len(ckpt["rng"]) == ctx.world else None
    if state is not None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and ctx.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], ctx.device)
    elif ctx.master:
        log(f"note: checkpoint was written by {len(ckpt['rng'])} processes, now {ctx.world}: fresh RNG streams")
    if ctx.master:  # keep the log of the epochs the checkpoint holds, drop any written after it
        lines = open(run.log_path).read().splitlines() if os.path.exists(run.log_path) else []
        write_atomic(run.log_path, lambda tmp: write_lines(tmp, [l for l in lines if json.loads(l)["epoch"] <= epoch]),
                     "the log is kept")
        log(f"resumed from {run.ckpt_path} after epoch {epoch}" + (f", step {epoch_step}" if epoch_step else "")
            + (" (the run is finished)" if epoch >= args.epochs else ""))
    return epoch, epoch_step, (state or {}).get("partial")


def save_checkpoint(args, ctx, run, data, epoch, epoch_step, partial, record=None):
    """Every process calls it (it gathers their RNG states and partial sums); process 0 appends the log line
    (record, at the end of an epoch) and writes out_dir/ckpt.pt: epochs done, steps done in the next one."""
    state = {"cpu": torch.get_rng_state(), "partial": partial}
    if ctx.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(ctx.device)
    states = [state]
    if ctx.ddp:  # every process's RNG state, so a resumed run draws what the uninterrupted one would
        states = [None] * ctx.world
        dist.all_gather_object(states, state)
    if not ctx.master:
        return
    # the log line first, then the checkpoint: a kill between the two leaves a line past the checkpoint,
    # which --resume drops, never a checkpoint without its line
    if record is not None:
        append_line(run.log_path, json.dumps(record))
    ckpt = {"model": run.model.state_dict(), "optimizer": run.opt.state_dict(),
            "ema": run.ema.state_dict() if run.ema is not None else None,
            "epoch": epoch, "epoch_step": epoch_step, "step": epoch * run.spe + epoch_step, "rng": states,
            "config": vars(args), "model_config": vars(run.model.cfg) if hasattr(run.model, "cfg") else None,
            "num_classes": data.num_classes, "mean": list(data.mean), "std": list(data.std)}
    write_atomic(run.ckpt_path, lambda tmp: torch.save(ckpt, tmp), "the previous checkpoint is kept")
    run.t_ckpt = time.time()


if __name__ == "__main__":
    with cli():
        main()
