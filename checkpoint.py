"""
A run on disk: out_dir/ckpt.pt (plain types and tensors only, so torch.load(weights_only=True) reads it) and
out_dir/log.jsonl, one JSON line per epoch; one run per out_dir, held by a lock. Every write is atomic, and a full
disk is one line saying what is kept. A resumed run (resume_or_start) draws what the uninterrupted one would.
"""

import errno
import json
import os
import shutil
import socket
import time

import torch
import torch.distributed as dist

from model import load_checked, read_file


def lock_out_dir(out_dir):
    """One out-dir, one run: process 0 holds an exclusive lock on out_dir/lock for its whole life, which the OS
    releases however the process ends (kill -9 too), so a dead run never blocks a new one. A POSIX record lock
    (lockf) belongs to this process alone: DataLoader workers forked from it do not hold it too (flock's would pass
    to them, and outlive a killed run in them). Also finds, before training, an out-dir that cannot be written."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        f = open(os.path.join(out_dir, "lock"), "a+")
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
    """save(tmp) writes to a temp file of this process, then it replaces path in one step: a kill or a full disk
    mid-write leaves the previous file intact and no temp file behind, and a disk problem is one line."""
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
    """The one line for a failed write: OSError, or torch.save's RuntimeError "unexpected pos" on a full disk (the free
    space tells), saying what is kept; a RuntimeError with space to spare is a fault of ours, raised as it is."""
    full = getattr(e, "errno", None) == errno.ENOSPC or disk_full(path)
    if not (full or isinstance(e, OSError)):
        raise e
    reason = "No space left on device (the disk is full)" if full else (e.strerror or str(e))
    return ValueError(f"cannot write {path}: {reason}; {what}")


def write_lines(path, lines):
    with open(path, "w") as f:  # closed here, so that a full disk raises here (not, unseen, at garbage collection)
        f.writelines(l + "\n" for l in lines)


def disk_full(path, least=1 << 20):
    try:
        return shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < least
    except OSError:
        return False


def resume_or_start(args, ctx, run, log):
    """With --resume: the weights, optimizer, EMA and every process's RNG state and partial epoch sums of ckpt.pt,
    and the log lines of the epochs it holds (--resume auto: only if there is one). Without: refuse to overwrite a
    run. Returns (epochs done, steps done in the next epoch, this process's partial sums of that epoch or None)."""
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
    states = [None] * ctx.world if ctx.ddp else [state]
    if ctx.ddp:  # every process's RNG state
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
            "config": vars(args), "model_config": model_config(run.model, data),
            "num_classes": data.num_classes, "mean": list(data.mean), "std": list(data.std)}
    write_atomic(run.ckpt_path, lambda tmp: torch.save(ckpt, tmp), "the previous checkpoint is kept"
                 if os.path.exists(run.ckpt_path) else "this run has no checkpoint yet")
    run.t_ckpt = time.time()


def model_config(model, data):
    """What rebuilds the model (distill.rebuild): its config (ours: DeiT, ConvNet, a detector), or for a model
    of torchvision's, which has none, its classes and input channels."""
    return vars(model.cfg) if hasattr(model, "cfg") else {"num_classes": data.num_classes, "in_chans": data.in_chans}
