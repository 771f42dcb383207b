# Sourced by every study: runs from the repository root, keeps each cell's run in $OUT/<name>/ (default
# studies/out/<study>, one folder per study) and its printed output in $OUT/<name>.txt. Each cell runs with --resume auto, so a finished
# cell is skipped and a killed one continues: rerun the study to resume it. QUICK=1 shrinks every cell
# (--train-subset 640 --epochs 1) to check that a study runs end to end; its numbers mean nothing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-studies/out}/$(basename "$0" .sh)
mkdir -p "$OUT"
SHRINK=()
if [ "${QUICK:-0}" = 1 ]; then SHRINK=(--train-subset 640 --epochs 1 --warmup-epochs 0); fi

cell() {  # cell NAME python SCRIPT.py FLAGS...: one run, skipped when finished
  local name=$1; shift
  echo "$(date +%H:%M:%S) $name: $*" >&2
  if ! "$@" "${SHRINK[@]}" --out-dir "$OUT/$name" --resume auto > "$OUT/$name.txt" 2>&1; then
    echo "failed: $name (its output: $OUT/$name.txt)" >&2; tail -3 "$OUT/$name.txt" >&2; exit 1
  fi
}

needs_fashion_mnist() {
  [ -d /usr/share/datasets/fashion-mnist ] || { echo "needs the full Fashion-MNIST: apt-get install -y dataset-fashion-mnist" >&2; exit 1; }
}

report() {  # report <<'EOF' ... EOF: python that prints the study's table (studies/report.py's helpers)
  OUT="$OUT" python -c "import sys; sys.path.insert(0, 'studies'); from report import *; exec(sys.stdin.read())"
}
