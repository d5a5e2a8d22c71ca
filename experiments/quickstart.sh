#!/usr/bin/env bash
# The README's quick start as it runs: the three commands at their defaults on the offline digits, their tables
# and wall times (Python's start included), and the sample's verdict. results.py puts this into the README.
#   bash experiments/quickstart.sh         (QUICK=1: a tiny version for the tests)
source "$(dirname "$0")/common.sh"
export COLUMNS=${COLUMNS:-120}
[[ $SCALE == quick ]] && q=(--epochs 2 -k 30) || q=()
[[ $SCALE == quick ]] && f=(--ae-steps 30 --denoiser-steps 30) || f=()
step() {  # step NAME ARGS...: run pdiff, keep its table (stderr, no progress bars) and its wall time
  local start=$SECONDS
  if ! $PDIFF "$@" --run "$OUT/run" 2>"$OUT/$1.txt" >/dev/null; then
    echo "experiment stopped: pdiff $1 failed: $(grep -h "pdiff: error" "$OUT/$1.txt" || tail -n 3 "$OUT/$1.txt")" >&2
    exit 1
  fi
  times+=("$1 $((SECONDS - start)) s")
}
times=(); mkdir -p "$OUT"
step collect "${q[@]}"
step fit "${f[@]}"
step sample -n 50
echo '```'
echo "\$ pdiff collect && pdiff fit && pdiff sample -n 50"
grep -hv "━" "$OUT/sample.txt"
echo '```'
echo "Wall times, Python's start included: $(IFS=,; echo "${times[*]}" | sed 's/,/, /g')."
