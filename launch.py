"""
What the scripts do before and around their loop (as nanoGPT's configurator and DeiT's utils.py): the flags
checked, the processes (torchrun's RANK/WORLD_SIZE/LOCAL_RANK, else one), a bad flag or a step that cannot fit in
memory one line before anything loads, `with cli(): main()` turning a ValueError into "error: ...", exit code 2.
"""

import argparse
import gc
import json
import os
import sys
import threading
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

from checkpoint import lock_out_dir
from data import free_memory
from distill import CONVNETS
from model import MODELS, SIZES, check_file, read_file, variant


class HelpFormatter(argparse.HelpFormatter):
    """--help gives each flag's default once: in its text where that says it, else appended (not for off
    switches, and never "None": a flag whose default is None says in words what happens without it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


FILES_READ = ("teacher_weights", "ckpt", "weights", "probe")  # flags naming a file that must exist


def out_of_range(name, spec, args):
    """None if args.<name> lies in spec, else the one-line complaint. spec: "[a, b)" as in mathematics; a bound may
    name another flag ("[0, epochs]")."""
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


def check_args(parser, args, ctx, given=()):
    """Flags that cannot work, each one line before anything loads: parser.ranges (each script's parser adds its
    own), the files to read, and parser.check(args) for what a range cannot say; the --workers default. A default
    warm-up (not in given: the flags typed) longer than a short run is cut to it (`--epochs 1` warms up over 1)."""
    flags = vars(args)
    if "warmup_epochs" not in given and args.warmup_epochs > args.epochs:
        args.warmup_epochs = float(args.epochs)
    for name, spec in parser.ranges.items():
        problem = out_of_range(name, spec, args) if flags.get(name) is not None else None
        if problem:
            raise ValueError(problem)
    for name in FILES_READ:
        if flags.get(name) is not None:
            check_file(flags[name], f"--{name.replace('_', '-')}")
    if args.batch_size % ctx.world:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the {ctx.world} processes")
    if getattr(parser, "check", None):
        parser.check(args)
    if args.workers is None:  # the machine's CPUs shared by the processes on it (torchrun's LOCAL_WORLD_SIZE)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        args.workers = max(1, min(8, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def start(parser, argv=None, defaults=None):
    """What every script does first: the flags, checked; the processes; the out-dir's lock (process 0, before anything
    slow: a run started a moment later must not win the out-dir while this one loads); the seed and process 0's
    printer. Flags the command line leaves out come from the checkpoint --resume continues or --eval-only evaluates
    (`--resume --epochs 72` trains on as the run began), then from defaults(args) (finetune.py: its weights'), then
    the parser. Returns (args, ctx, log); ctx.lock: the held lock (None: not process 0, or --eval-only)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    unset = object()  # parsed into a namespace that holds it everywhere, a flag the command line gives replaces it
    given = {k for k, v in vars(parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset)))).items()
             if v is not unset}
    ctx = setup_distributed(args.amp)
    check_args(parser, args, ctx, given)
    ctx.lock = lock_out_dir(args.out_dir) if ctx.master and not args.eval_only else None
    inherited = {**(defaults(args) if defaults else {}), **saved_flags(args)}
    if inherited:  # argparse sets a default only where the namespace has no value yet
        args = parser.parse_args(argv, namespace=argparse.Namespace(**inherited))
        check_args(parser, args, ctx, given)
    torch.manual_seed(args.seed + ctx.rank)  # seed + rank, as the reference (drop path differs per process)
    log = print if ctx.master else (lambda *a, **k: None)
    return args, ctx, log


def saved_flags(args):
    """The flags of the checkpoint --eval-only evaluates or --resume continues, but this machine's (NOT_INHERITED)."""
    path = args.ckpt if args.eval_only and args.ckpt else os.path.join(args.out_dir, "ckpt.pt")
    if not (args.eval_only or args.resume) or not os.path.isfile(path):
        return {}
    ckpt = read_file(path, "checkpoint")
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict)):  # not ours: no flags to take
        return {}
    return {k: v for k, v in ckpt["config"].items() if k in vars(args) and k not in NOT_INHERITED}


NOT_INHERITED = ("out_dir", "resume", "eval_only", "ckpt", "workers", "script")


def setup_distributed(amp=None):
    """Processes, device, and the autocast context: bf16 by default on CUDA, on any device with amp="bf16"
    (so the tests run the CUDA path's autocast on the CPU)."""
    ddp = "RANK" in os.environ
    cuda = torch.cuda.is_available()
    if ddp:
        rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        if cuda:
            torch.cuda.set_device(local_rank)
        # under torchrun --max-restarts each restart meets in the store of the processes it replaces: a key prefix
        # of its own keeps it from the dead ones' addresses (gloo: "connection refused", or a 30-minute wait)
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
    """A worker of torchrun stops when its agent dies. After a kill -9 of the agent its workers would live on as
    orphans, keep the out-dir's lock and wait for peers that are gone, so the same command could not run again. A
    thread watches for the parent to change (init or a subreaper adopts the orphan) and ends the process."""
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


def check_model(args, default, ctx=None, kept=1.0):
    """--model and --distill checked before anything loads, and with ctx whether a step fits in memory (check_memory).
    Without --model: default (a script's default job), distilled with --distill (`torchrun ... train.py --distill
    hard` runs as typed). Returns the input size (a convnet: None)."""
    if args.model is None:
        args.model = default.replace("nano_", "nano_distilled_") if args.distill != "none" else default
    v = None if args.model in CONVNETS else variant(args.model)
    if v and args.img_size and args.img_size % v.patch_size:
        raise ValueError(f"--img-size {args.img_size} is not a multiple of {args.model}'s patch size {v.patch_size}: "
                         f"try {max(1, round(args.img_size / v.patch_size)) * v.patch_size}")
    if args.distill != "none" and not (v and v.distilled):
        raise ValueError(f"--distill {args.distill} needs a student with a distillation token, and {args.model} has "
                         f"none; distilled models: {', '.join(m for m, v in MODELS.items() if v.distilled)}")
    size = args.img_size or getattr(args, "canvas", None) or (v.img_size if v else None)
    if ctx is not None and size:
        check_memory(args.model, v, size, args.batch_size // ctx.world, ctx, kept)
    return size


def check_memory(model, v, size, batch, ctx, kept=1.0):
    """Refuse, before anything loads, a step that cannot fit (`--img-size 7000` would otherwise fail after a minute
    with no message, or be killed by the OS): step_bytes is a lower bound, so a step it stops cannot fit. v: the
    model's Variant (None: a convnet); batch: images per process; kept: the share of the activations a step keeps."""
    free = free_memory(ctx.device)
    if free is None:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if ctx.device.type == "cpu" else 1  # processes sharing it
    need, tokens = step_bytes(v, size, batch, not isinstance(ctx.autocast, nullcontext), kept)
    if need * local > free:
        raise ValueError(f"a training step of {model} at --img-size {size} ({tokens} tokens an image) with "
                         f"{batch} images per process needs at least {need / 2**30:.1f} GiB, "
                         f"and {free / 2**30:.1f} GiB of {ctx.device.type} memory is free"
                         + (f" for {local} processes" if local > 1 else "") + ": lower --img-size or --batch-size")


def step_bytes(v, size, batch, bf16, kept=1.0):
    """A lower bound on the memory one training step holds (bytes), and the tokens an image: the batch through
    augmentation (3 channels of float32, 4 copies), and for a ViT the activations its backward keeps (about 16
    numbers per token and channel in each block: 2 norms, q, k, v, the attention's output and projection, the MLP's
    4x-wide hidden layer before and after GELU; 2 bytes each under bf16), the weights, their gradients and AdamW's
    two moments; kept: the share of the activations kept. A convnet (v None): the batch only."""
    images = batch * 3 * size * size * 4 * 4
    if v is None:
        return images, None
    width, depth, _ = SIZES[v.size]
    tokens = (size // v.patch_size) ** 2 + 1 + v.distilled
    params = 12 * depth * width * width
    return images + int(kept * 16 * tokens * width * depth * batch * (2 if bf16 else 4)) + 16 * params, tokens


def summary(log_path, ckpt_path, t_start, key, lower_is_better, steps, log):
    """The last lines of a run: where it ended (by the metric key), where its files are, what to do next (steps)."""
    records = [json.loads(l) for l in open(log_path)] if os.path.exists(log_path) else []
    if not records:
        return
    best = max((r for r in records if key in r), key=lambda r: (-1 if lower_is_better else 1) * r[key])
    n = records[-1]["epoch"]
    log(f"done: {n} epoch{'s' * (n != 1)} in {fmt_time(time.time() - t_start)} (this session) | final {key} "
        f"{records[-1][key]:.4g} | best {key} {best[key]:.4g} (epoch {best['epoch']})\n"
        f"  checkpoint {ckpt_path}, log {log_path}" + "".join(f"\n  {s}" for s in steps))


def fmt_time(s):
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


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
            # Taken down while Python is whole: destroyed, then what refers to it (DDP's reducer, in cycles) collected
            # now, not in the teardown, whose order can end a worker in "terminate called without an active exception"
            dist.destroy_process_group()
            gc.collect()
