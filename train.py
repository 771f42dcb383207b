"""
Train DeiT (Touvron et al. 2021) on one CPU, one GPU, or many through torchrun.

    python train.py                         # a small DeiT on the bundled Fashion-MNIST: 81.4% top-1 (RESULTS.md)
    torchrun --nproc_per_node=8 train.py --distill hard   # distillation through attention (§4, distill.py)
    torchrun --nproc_per_node=8 train.py --data /imagenet --model deit_small_patch16_224 \
        --epochs 300 --batch-size 1024 --lr 5e-4 --warmup-epochs 5      # DeiT-S as in the paper (Table 9)

The recipe is DeiT's (paper §6, Table 9; facebookresearch/deit main.py) but for six defaults fit to the bundled
demo, each with DeiT's value in its help. --batch-size is global, so the lr (base_lr * global_batch / 512, paper
§6), logs and checkpoints mean the same for any number of processes. The README lists every deliberate difference.
"""

import argparse
import copy
import functools
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import augment as A
from checkpoint import resume_or_start, save_checkpoint
from data import BUNDLED_TEACHER, HERE, EpochSampler, load_data, parse_classes, train_batches, val_batches
from distill import (CONVNETS, DistillationLoss, base_loss, check_teacher, create_convnet, default_teacher,
                     inference_form, load_teacher, ours, rebuild)
from launch import HelpFormatter, all_sum, check_model, cli, fmt_time, start, summary
from model import MODELS, create_model, distilled, fit_pos_embed, load_checked, param_groups, read_file, state_dict_of

DEFAULT_MODEL = "deit_nano_patch7_28"  # the default job: 0.68M parameters, 16 tokens of 28-px Fashion-MNIST
NEVER = 2 ** 62  # Run.nonfinite_at while the loss has stayed finite: a step no run reaches


def get_parser():
    p = argparse.ArgumentParser(prog="train.py", description="Train DeiT.", formatter_class=HelpFormatter)
    a = p.add_argument
    # what to train on
    a("--data", default="bundled", help="bundled | fashion-mnist | cifar10 | cifar100 | synthetic | PATH "
      "(a folder of Fashion-MNIST idx files, or an ImageFolder root with train/ and val/)")
    a("--data-dir", default=os.path.join(HERE, "data"), help="where cifar10/cifar100 are kept or downloaded")
    a("--train-subset", type=float, default=None, help="train on a stratified part: a fraction below 1 (0.1) or a "
      "count of images (600; 1 is one image); default: all")
    a("--classes", default=None, help="keep only these classes, relabelled 0..k-1: '0-4' or '5,7,9'; default: all")
    a("--canvas", type=int, default=None, help="paste each image at a random scale and place on a CANVAS-px "
      "black canvas (the geometry of detect.py's scenes; data.make_canvases), once, from --seed; default input size: CANVAS")
    a("--workers", type=int, default=None, help="DataLoader workers a process (default: CPUs / processes, <= 8)")
    a("--decode", choices=["auto", "device", "workers"], default="auto", help="ImageFolder JPEGs decoded and cropped "
      "in batches on the device (TorchCodec/nvJPEG) or in the workers; auto: device on CUDA with a decoder (data.py)")
    # model (defaults: the bundled-data demo; the paper's models are deit_{tiny,small,base}_patch16_224)
    a("--model", default=None, help="one of: " + ", ".join([*MODELS, *CONVNETS]) + " (convnet: distill.py's small "
      f"teacher for 28-64 px). Default: {DEFAULT_MODEL}, or {DEFAULT_MODEL.replace('nano_', 'nano_distilled_')} with --distill")
    a("--img-size", type=int, default=None, help="input size (default: the model's); images, pos_embed resized to it")
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
    a("--teacher", default=None, help="regnety_160 (DeiT's released RegNetY-16GF), a torchvision name (regnet_y_16gf: "
      "torchvision's weights), convnet or a DeiT name with --teacher-weights, or a ckpt.pt. Default: on the bundled "
      "data its convnet (data/teachers/, from prepare_data.py --teacher), elsewhere regnety_160")
    a("--teacher-weights", default=None, help="a weights file for --teacher NAME (default: download the release)")
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
      "over the whole run; mae: warm-up from 0, then a half-cosine over the epochs after it (mae.py's default; lr_at)")
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
      "from its ckpt.pt, with its flags unless given again; auto: continue if there is one, else start (for torchrun "
      "--max-restarts); default: start a new run")
    a("--ckpt-every-minutes", type=float, default=10, help="also write ckpt.pt within an epoch after this long "
      "(at the next --check-interval step), so that a killed run loses minutes, not the epoch")
    a("--eval-only", action="store_true", help="evaluate --ckpt and exit; ours brings its model, data and flags")
    a("--ckpt", default=None, help="for --eval-only: ours, a DeiT release or a state dict (default: out-dir/ckpt.pt)")
    a("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (default: on with CUDA)")
    a("--amp", choices=["bf16", "none"], default=None, help="bf16 autocast (default: bf16 with CUDA, none on CPU)")
    a("--eval-interval", type=int, default=1, help="epochs between evaluations (and the last): for many short epochs")
    a("--log-seconds", type=float, default=5, help="seconds between progress lines within an epoch")
    a("--check-interval", type=int, default=100, help="steps between checks for a nan/inf loss (the one wait "
      "for the device within an epoch), which is also when a mid-epoch checkpoint may be written")
    p.set_defaults(script=p.prog)  # for the next steps a run prints
    p.ranges, p.check = dict(RANGES), check_flags
    return p


# Every number flag's valid values, checked before anything loads (launch.check_args): "[a, b)" as in mathematics,
# a bound may name another flag. A script that adds flags adds their ranges to its parser's.
RANGES = {
    "train_subset": "(0, inf)", "canvas": "[8, inf)", "workers": "[0, inf)", "img_size": "[1, inf)",
    "drop_path": "[0, 1)", "crop_pad": "[0, inf)", "hflip": "[0, 1]", "rrc_scale": "(0, 1]", "reprob": "[0, 1]",
    "mixup": "[0, inf)", "cutmix": "[0, inf)", "mixup_switch_prob": "[0, 1]", "distill_alpha": "[0, 1]",
    "distill_tau": "(0, inf)", "epochs": "[1, inf)", "batch_size": "[1, inf)", "lr": "(0, inf)", "min_lr": "[0, inf)",
    "warmup_lr": "[0, inf)", "warmup_epochs": "[0, epochs]", "weight_decay": "[0, inf)", "beta2": "[0, 1)",
    "smoothing": "[0, 1)", "clip_grad": "(0, inf)", "model_ema_decay": "[0, 1]", "seed": "[0, 4294967296)",
    "ckpt_every_minutes": "[0, inf)", "log_seconds": "[0, inf)", "check_interval": "[1, inf)",
    "eval_interval": "[1, inf)",
}


def check_flags(args):
    """What a range cannot say, before anything loads: the teacher, --classes' form, the RandAugment string."""
    if args.distill in ("soft", "hard"):
        check_teacher(default_teacher(args.teacher, args.data, BUNDLED_TEACHER), args.teacher_weights)
    if args.classes is not None:
        parse_classes(args.classes, math.inf)  # its form; the class numbers are checked against the data's
    if args.aa != "none":
        A.parse_aa(args.aa)  # a malformed string fails now, not at the first step


def load(args, device, img_size):
    """data.load_data with this run's flags."""
    return load_data(args.data, device, img_size, args.data_dir, args.train_subset, args.classes, args.canvas,
                     args.seed, args.crop_pad, args.decode, args.workers, args.rrc_scale)


def build_model(args, data, ctx, img_size, global_pool=None):
    if args.model in CONVNETS:
        return create_convnet(args.model, data.num_classes, data.in_chans).to(ctx.device)
    return create_model(args.model, num_classes=data.num_classes, img_size=img_size, in_chans=data.in_chans,
                        drop_path_rate=args.drop_path, global_pool=global_pool).to(ctx.device)


def build_teacher(args, data, img_size, log):
    """The teacher for --distill soft/hard (distill.py), checked against the data before training starts."""
    if args.distill in ("none", "labels"):
        return None
    args.teacher = default_teacher(args.teacher, args.data, BUNDLED_TEACHER)
    teacher = load_teacher(args.teacher, args.teacher_weights, data.num_classes, data.in_chans,
                           data.train[0].shape[-1] if data.tensors else img_size)
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
    CosineLRScheduler without warmup_prefix, as DeiT uses it). Deliberate difference: the reference steps it after
    each epoch, one epoch behind (epochs 0 and 1 at 1e-6, the peak never reached); we evaluate it at every step.
    --sched mae: MAE's util/lr_sched.py, a warm-up from 0, then a half-cosine over the epochs after it."""
    e, w = epoch_float, args.warmup_epochs
    lo, s = (0.0, w) if args.sched == "mae" else (args.warmup_lr, 0)  # the warm-up's start, the cosine's
    if e < w:
        return lo + (peak - lo) * e / w
    return args.min_lr + 0.5 * (peak - args.min_lr) * (1 + math.cos(math.pi * (e - s) / (args.epochs - s)))


# ----------------------------------------------------------------------------------------------------------
# The loop

def main(argv=None):
    args, ctx, log = start(get_parser(), argv)
    if args.eval_only:
        return eval_only(args, ctx, log)
    img_size = check_model(args, DEFAULT_MODEL, ctx)
    data = load(args, ctx.device, img_size)
    model = build_model(args, data, ctx, img_size)
    return train(args, ctx, model, data, log, build_teacher(args, data, img_size, log))


@dataclass
class Task:
    """What train() asks of a task other than classification (None: DeiT's augmentation, DistillationLoss, top-1)."""
    loss: Callable  # (run, inputs, targets, gen) -> the step's loss, a device scalar
    evaluate: Callable  # (run, data, ctx, batch_size) -> {metric: number}, summed over the processes
    next_steps: Callable  # (args) -> the lines a finished run prints: commands that work as printed
    key: str = "top1"  # the metric the run's summary ranks epochs by
    lower_is_better: bool = False
    augment: Optional[Callable] = None  # (x uint8, y, rng, gen) -> (inputs, targets); None: DeiT's augmentation
    after_epoch: Optional[Callable] = None  # (run, data, epoch) -> None: process 0, after an evaluated epoch


@dataclass
class Run:
    """A run's state besides the model and data: made by start_run, stepped by train_step, saved by checkpoint.py."""
    model: Any  # the model itself: what checkpoints hold
    net: Any  # what a step calls: the model, compiled and in DDP as asked
    criterion: Any  # distill.DistillationLoss: the labels' loss, and the teacher's when distilling
    augment: Any  # augment.deit_augment with the run's flags: (x, y, rng, gen) -> (images, targets)
    opt: Any
    ema: Any  # an EMA copy of the model, or None
    ema_pairs: Any  # (EMA, model) tensors: (averaged, copied)
    sampler: EpochSampler
    task: Optional[Task]  # None: classification
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
    """Everything a run holds besides the model and the data: the sampler, AdamW, the EMA, what a step calls (the
    model compiled and in DDP as asked) and the loss, whose teacher is on the device, frozen, its BatchNorms folded
    (distill.inference_form) and compiled like the student; resumed from out_dir with --resume."""
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
    net = torch.compile(model) if compiled else model
    if ctx.ddp:  # a distilled model trained without distillation: head_dist gets no gradient
        net = DDP(net, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                  find_unused_parameters=distilled(model) and args.distill == "none")
    if teacher is not None:
        teacher = inference_form(teacher.to(ctx.device).eval().requires_grad_(False))
        teacher = torch.compile(teacher) if compiled else teacher
    criterion = DistillationLoss(functools.partial(base_loss, smoothing=args.smoothing), teacher, args.distill,
                                 args.distill_alpha, args.distill_tau)
    augment = task.augment if task and task.augment else augmentation(args, data)
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
        partial = (run.partial if start else None) or {"loss_sum": 0.0, "loss_n": 0}  # loss summed on the device:
        loss_n, loss_sum = partial["loss_n"], torch.tensor(partial["loss_sum"], device=ctx.device)  # no wait
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
        task = run.task or Task(None, None, next_steps)  # classification: top-1, higher is better
        summary(run.log_path, run.ckpt_path, run.t_start, task.key, task.lower_is_better, task.next_steps(args), log)
    return model


def end_of_epoch(args, ctx, run, data, epoch, stats, log):
    """Evaluate (every --eval-interval epochs and the last), write the epoch's log line, save the checkpoint, print
    the line. stats: this process's train_loss (mean over its steps), lr, img_per_s, epoch_time."""
    batch = max(256, args.batch_size // ctx.world)
    evaluated = (epoch + 1) % args.eval_interval == 0 or epoch + 1 == args.epochs
    if not evaluated:
        metrics = {}  # --eval-interval: not this epoch
    elif run.task is not None:
        metrics = run.task.evaluate(run, data, ctx, batch)
    else:
        metrics = evaluate(run.net, data, ctx, batch)
        if run.ema is not None and args.eval_ema:
            metrics["ema_top1"] = evaluate(run.ema, data, ctx, batch)["top1"]
    rescued = getattr(data, "rescued", None)  # an image folder's files the device decoder rejected and PIL read
    train_loss, n_skipped, n_rescued = all_sum([stats["train_loss"], len(data.skipped), len(rescued or ())], ctx)
    record = {"epoch": epoch + 1, "step": (epoch + 1) * run.spe, "train_loss": train_loss / ctx.world, **metrics,
              "lr": stats["lr"], "img_per_s": stats["img_per_s"], "epoch_time": stats["epoch_time"],
              "skipped_images": int(n_skipped), "skipped_val_images": metrics.pop("skipped", 0),
              **({"rescued_images": int(n_rescued)} if rescued is not None else {})}
    if run.compile:  # every recompile or graph break costs time: one graph for training, one for evaluation
        c = torch._dynamo.utils.counters
        record.update(compiled_frames=c["frames"]["total"], graph_breaks=sum(c["graph_break"].values()))
    save_checkpoint(args, ctx, run, data, epoch + 1, 0, None, record)
    if not ctx.master:
        return
    if run.task and run.task.after_epoch and evaluated:
        run.task.after_epoch(run, data, epoch)
    eta = (time.time() - run.t_start) / max(run.done_steps, 1) * (args.epochs - epoch - 1) * run.spe
    log(f"epoch {epoch + 1}/{args.epochs} | loss {record['train_loss']:.4f} | lr {stats['lr']:.2e} | "
        f"{record['img_per_s']:.0f} img/s" + ("" if not metrics else " | " + " ".join(
            f"{k} {v:.4f}" if "loss" in k else f"{k} {v:.2f}" for k, v in metrics.items()))
        + "".join(what.format(n) for n, what in ((int(n_skipped), " | skipped {} images"), (record["skipped_val_images"],
                  " | skipped {} val images"), (record.get("rescued_images", 0), " | {} images decoded by PIL")) if n)
        + f" | eta {fmt_time(eta)}"
        + (f" | compiled {record['compiled_frames']} frames, {record['graph_breaks']} graph breaks" if run.compile else ""))


@torch.no_grad()
def evaluate(model, data, ctx, batch_size):
    """Top-1, top-5 and cross-entropy (no smoothing) on the held-out split, summed over all processes.
    A distilled model predicts with the mean of its two heads' logits (as the reference); its heads are
    also scored alone, as top1_cls and top1_dist (paper Table 3)."""
    raw = getattr(model, "module", model)  # under DDP and torch.compile: the model itself
    raw = getattr(raw, "_orig_mod", raw)
    two_heads = distilled(raw)
    model.eval()
    sums = torch.zeros(6, dtype=torch.float64, device=ctx.device)  # loss, top1, top5, n, cls1, dist1: no wait
    skipped = []  # image folders: files that cannot be decoded, named as they are met
    for x, y in val_batches(data, batch_size, ctx.device, ctx.rank, ctx.world, skipped):
        x = A.normalize(x, data.mean, data.std)
        with ctx.autocast:
            out = raw.forward_heads(x) if two_heads else model(x)
        logits = ((out[0] + out[1]) / 2 if two_heads else out).float()  # the mean = model(x) in eval mode
        topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums[0] += F.cross_entropy(logits, y, reduction="sum").double()
        sums[3] += len(y)
        hits = [topk[:, 0] == y, (topk == y[:, None]).any(1)] + ([o.argmax(1) == y for o in out] if two_heads else [])
        for k, hit in zip((1, 2, 4, 5), hits):
            sums[k] += hit.sum()
    loss, top1, top5, n, cls1, dist1, n_skipped = all_sum([*sums.tolist(), len(skipped)], ctx)
    model.train()
    if n == 0:
        raise ValueError("no held-out image could be read: check the val/ split of --data")
    heads = {"top1_cls": 100 * cls1 / n, "top1_dist": 100 * dist1 / n} if two_heads else {}
    return {"val_loss": loss / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n, **heads, "skipped": int(n_skipped)}


def check_finite(run, ctx, want_checkpoint=False):
    """Stop at a nan/inf loss before anything is saved. It waits for the device: every --check-interval steps and at an
    epoch's end, on every process; returns whether process 0's clock asks for a mid-epoch checkpoint (all agree)."""
    flags = torch.stack([run.nonfinite_at, torch.full_like(run.nonfinite_at, -int(want_checkpoint))])
    if ctx.ddp:
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    s, want = flags.tolist()
    if s < NEVER:
        kept = f"the last good checkpoint {run.ckpt_path} is kept" if os.path.exists(run.ckpt_path) else "no checkpoint was written"
        raise ValueError(f"loss became nan/inf at step {s} (epoch {s // run.spe + 1}); stopped, {kept}. "
                         "Try a lower --lr or --clip-grad")
    return want < 0


def next_steps(args):
    """What to run next, as commands that work as printed (test_next_steps_work_as_printed)."""
    return [f"evaluate: python train.py --eval-only --out-dir {args.out_dir}",
            f"train on: python {args.script} --resume --epochs {2 * args.epochs} --out-dir {args.out_dir}"]


def eval_only(args, ctx, log):
    """--eval-only: evaluate --ckpt. Ours brings its model and flags (data, classes, size); others take --model."""
    path = args.ckpt or os.path.join(args.out_dir, "ckpt.pt")
    ckpt = read_file(path, "checkpoint")
    img_size = check_model(args, DEFAULT_MODEL)
    data = load(args, ctx.device, img_size)
    model = rebuild(ckpt, img_size=img_size).to(ctx.device) if ours(ckpt) else build_model(args, data, ctx, img_size)
    if ours(ckpt) and ckpt["model_config"]["num_classes"] != data.num_classes:
        raise ValueError(f"{path} predicts {ckpt['model_config']['num_classes']} classes, the data has "
                         f"{data.num_classes}: give the --data (and --classes) it was trained on")
    load_checked(model, fit_pos_embed(state_dict_of(ckpt, path, args.eval_ema), model), path)
    metrics = evaluate(model, data, ctx, max(256, args.batch_size // ctx.world))
    log(f"{path}: val loss {metrics['val_loss']:.4f} | top1 {metrics['top1']:.2f} | top5 {metrics['top5']:.2f}"
        + (f" | class head {metrics['top1_cls']:.2f} | dist head {metrics['top1_dist']:.2f}" if "top1_cls" in metrics else ""))
    return metrics


if __name__ == "__main__":
    with cli():
        main()
