# Sourced by every study: runs from the repository root, keeps each cell's run in $OUT/<name>/ (default
# studies/out/<study>, one folder per study) and its printed output in $OUT/<name>.txt, whose first line says
# when, at which commit and on what it ran (report.py's provenance reads it). Each cell runs with --resume auto,
# so a finished cell is skipped and a killed one continues: rerun the study to resume it. A study that calls
# keep_logs also copies each finished cell's log.jsonl and printed output to studies/logs/<study>/, which is
# committed: its report reads them there, and a fresh clone skips those cells (delete the folder to rerun them
# all). A cell that feeds later ones (a teacher, an MAE encoder) also keeps its final weights there
# (weights.pt: the model and its config, no optimiser), so a later session can run the cells it feeds without
# rerunning it. QUICK=1 shrinks every cell (--train-subset 640 --epochs 1) to check that a study runs end to
# end; its numbers mean nothing, and it keeps nothing. REPORT=1 runs no cell: it prints the table and redraws the
# pictures from the cells kept so far (a study still running elsewhere, in a clone).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-studies/out}/$(basename "$0" .sh)
mkdir -p "$OUT"
LOGS=$OUT  # where the report reads each cell's log; keep_logs moves it into git
RUNS=$OUT  # the cells' runs (checkpoints) and the pictures a report draws
SHRINK=()
if [ "${QUICK:-0}" = 1 ]; then SHRINK=(--train-subset 640 --epochs 1 --warmup-epochs 0); fi

keep_logs() {  # a study that runs for hours keeps each finished cell's log in git, so it resumes in a fresh clone
  [ "${QUICK:-0}" = 1 ] || LOGS=studies/logs/$(basename "$0" .sh)
  mkdir -p "$LOGS"
}

cell() {  # cell NAME [--feeds "LATER..."] python SCRIPT.py FLAGS...: one run, skipped when finished
  local name=$1 feeds= later pending=; shift
  if [ "$1" = --feeds ]; then feeds=$2; shift 2; fi  # the cells LATER read this cell's weights (weights NAME)
  for later in $feeds; do [ -f "$LOGS/$later/log.jsonl" ] || pending=1; done
  # a kept cell is skipped unless a cell it feeds still has to run and its weights are gone (then it is
  # rerun, seeded, to remake them)
  if [ -f "$LOGS/$name/log.jsonl" ] && { [ -z "$pending" ] || [ -f "$(weights $name)" ]; }; then
    echo "$(date +%H:%M:%S) $name: kept in $LOGS/$name" >&2; return
  fi
  if [ "${REPORT:-0}" = 1 ]; then echo "$(date +%H:%M:%S) $name: not run yet (REPORT=1 runs nothing)" >&2; return; fi
  echo "$(date +%H:%M:%S) $name: $*" >&2
  ran >> "$OUT/$name.txt"
  if ! "$@" "${SHRINK[@]}" --out-dir "$OUT/$name" --resume auto >> "$OUT/$name.txt" 2>&1; then
    echo "failed: $name (its output: $OUT/$name.txt)" >&2; tail -3 "$OUT/$name.txt" >&2; exit 1
  fi
  mkdir -p "$LOGS/$name"
  if [ "$LOGS" != "$OUT" ]; then  # the log, the printed output and any picture the run drew
    cp "$OUT/$name/log.jsonl" "$OUT/$name.txt" "$LOGS/$name/"; mv "$LOGS/$name/$name.txt" "$LOGS/"
    find "$OUT/$name" -maxdepth 1 -name '*.png' -exec cp {} "$LOGS/$name/" \;
  fi
  if [ -n "$feeds" ]; then
    python -c "import torch, sys; c = torch.load(sys.argv[1], weights_only=True); torch.save({k: c[k] for k in
      ('model', 'config', 'model_config', 'num_classes', 'mean', 'std') if k in c}, sys.argv[2])" \
      "$OUT/$name/ckpt.pt" "$(weights $name)"
  fi
}

ran() {  # the line that heads a cell's printed output: when, at which commit, on what (report.py's provenance)
  echo "# ran $(date -u +%Y-%m-%d) at commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- '*.py' '*.sh' || echo +changes)" \
    "on $(uname -m), $(env -u OMP_NUM_THREADS nproc) cores ($(nproc) threads), torch $(python -c 'import torch; print(torch.__version__)')"
}

weights() { echo "$LOGS/$1/weights.pt"; }  # weights NAME: the final weights a feeding cell keeps

needs_fashion_mnist() {
  [ -d /usr/share/datasets/fashion-mnist ] || { echo "needs the full Fashion-MNIST: apt-get install -y dataset-fashion-mnist" >&2; exit 1; }
}

report() {  # report <<'EOF' ... EOF: python that prints the study's table (studies/report.py's helpers)
  RUNS="$RUNS" OUT="$LOGS" python -c "import sys; sys.path.insert(0, 'studies'); from report import *; exec(sys.stdin.read())"
}

subset() {  # a fraction's --train-subset; 1.0 (all) leaves the flag out, since --train-subset 1 means one image
  [ "$1" = 1.0 ] || echo "--train-subset $1"
}
