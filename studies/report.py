"""Helpers for the studies' tables: a cell's last logged value or its curve, seeds as 'mean (each)', and where
and when the cells ran."""
import json
import os
import platform
import subprocess

import torch

OUT = os.environ.get("OUT", "studies/out")  # the cells' logs (studies/logs/STUDY for a study that keeps them)
RUNS = os.environ.get("RUNS", OUT)  # the cells' runs and the pictures


def last(name, key="top1"):
    """The last epoch's value of key in $OUT/name/log.jsonl."""
    with open(os.path.join(OUT, name, "log.jsonl")) as f:
        return [json.loads(line) for line in f][-1][key]


def curve(name, key="top1"):
    """{epoch: value} for the epochs of $OUT/name/log.jsonl that logged key (the evaluated ones)."""
    with open(os.path.join(OUT, name, "log.jsonl")) as f:
        return {r["epoch"]: r[key] for r in map(json.loads, f) if key in r}


def kept(name):
    """Whether cell name has run: its log is in $OUT (a study still running elsewhere keeps only those that have)."""
    return os.path.exists(os.path.join(OUT, name, "log.jsonl"))


def finished(name, epochs):
    """Whether $OUT/name ran all its epochs (a cell killed midway has a shorter log)."""
    return kept(name) and last(name, "epoch") == epochs


def seeds(names, key="top1"):
    """'mean (seed 0, seed 1, ...)' over the cells named that have run ('running' if none has)."""
    values = [last(n, key) for n in names if kept(n)]
    if not values:
        return "running"
    return f"{sum(values) / len(values):.2f} (" + ", ".join(f"{v:.2f}" for v in values) + ")"


def evaluated(name):
    """The top-1 an --eval-only cell printed (its $OUT/name.txt)."""
    line = [l for l in open(os.path.join(OUT, name + ".txt")) if "top1" in l][-1]
    return float(line.split("top1 ")[1].split()[0])


def table(header, rows):
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")


def machine():
    print(f"\n{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}")


def provenance(names):
    """Where and when the cells ran: the '# ran DATE at commit C on MACHINE' lines lib.sh writes at the head of
    each cell's printed output, counted; cells kept from before those lines, by the commits that added their logs."""
    runs, older = {}, []
    for n in [n for n in names if kept(n)]:
        path = os.path.join(OUT, n + ".txt")
        heads = [l[len("# ran "):].strip() for l in open(path) if l.startswith("# ran ")] if os.path.exists(path) else []
        for h in heads:
            runs[h] = runs.get(h, 0) + 1
        if not heads:
            older.append(subprocess.run(["git", "log", "--diff-filter=A", "-1", "--format=%cs %h", "--",
                                         os.path.join(OUT, n, "log.jsonl")], capture_output=True, text=True).stdout.split())
    lines = [f"{h} ({k} run{'s' * (k > 1)})" for h, k in sorted(runs.items())]
    if older:
        dates, commits = sorted({o[0] for o in older if o}), sorted({o[1] for o in older if o})
        lines.append(f"{len(older)} cells from earlier runs, their own commits unrecorded: logged "
                     + (f"{dates[0]} to {dates[-1]}" if len(dates) > 1 else dates[0] if dates else "in no commit yet")
                     + (f" in commits {', '.join(commits)}" if commits else ""))
    print("\nran: " + "; ".join(lines))
