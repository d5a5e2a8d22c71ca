# Sourced by the experiment scripts: the scale's settings, how to run pdiff and read its --json.
#   QUICK=1      a tiny version that runs in about a minute (a test uses it)
#   (default)    offline, on scikit-learn's digits: minutes on 2 CPU cores
#   SCALE=paper  ResNet-18 on CIFAR-100 as in the paper (a GPU; torchvision downloads CIFAR-100 the first time)
# Runs go to $OUT and stay there; without OUT, to a temporary folder removed at the end. PDIFF is the command
# (default: this checkout's pdiff.py).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PDIFF=${PDIFF:-"python3 $here/../pdiff.py"}
if [[ -z ${OUT:-} ]]; then OUT=$(mktemp -d); trap 'rm -rf "$OUT"' EXIT; fi
if [[ ${QUICK:-0} == 1 ]]; then
  SCALE=quick; NET="--epochs 2"; FIT="--ae-steps 30 --denoiser-steps 30"; SAMPLE="-n 8 --sampler ddim"
elif [[ ${SCALE:-} == paper ]]; then  # the v3 code's protocol (README: "The paper's protocols")
  NET="--data cifar100 --protocol v3"; FIT=""; SAMPLE="-n 200"
else
  SCALE=digits; NET=""; FIT=""; SAMPLE="-n 50"
fi

# pd ARGS: run pdiff (its stdout passes through); if it fails, say which command and its error line, and stop
pd() {
  local log; log=$(mktemp)
  if $PDIFF "$@" 2>"$log"; then rm -f "$log"; return; fi
  echo "experiment stopped: pdiff $1 failed: $(grep -h "pdiff: error" "$log" || tail -n 3 "$log")" >&2
  rm -f "$log"; exit 1
}

# get PATH: the value at a dotted path (.generated.best; a key with a dash quoted: .baselines."average-finished")
# of the JSON on stdin, null where there is none; jq where installed, else Python
get() {
  if command -v jq >/dev/null; then jq -r "$1"; else
    python3 -c 'import json, sys
d = json.load(sys.stdin)
for k in sys.argv[1].strip(".").split("."): d = None if d is None else d.get(k.strip("\""))
print("null" if d is None else d)' "$1"; fi
}

# row LABEL JSON: one Markdown row of a `pdiff sample --json` report
row() {
  local g=() o=() k
  for k in best mean median; do g+=("$(get ".generated.$k" <<<"$2")"); o+=("$(get ".original.$k" <<<"$2")"); done
  printf "| %s | %.2f / %.2f / %.2f | %.2f / %.2f / %.2f | %s | %.2f | %s / %s | %s |\n" "$1" "${g[@]}" "${o[@]}" \
    "$(num .held_out.median "$2")" "$(get .baselines.ensemble.median <<<"$2")" "$(num .generated.max_iou.mean "$2")" \
    "$(num .original.max_iou.mean "$2")" "$(get .verdict.label <<<"$2")"
}

# num PATH JSON: the number at PATH with two decimals, or - where there is none (one original has no neighbour)
num() {
  local v; v=$(get "$1" <<<"$2")
  [[ $v == null ]] && echo - || printf "%.2f" "$v"
}

header() {
  echo "| $1 | generated best / mean / median | training originals best / mean / median | held-out median | ensemble |" \
    "max IoU generated / originals | verdict |"
  echo "|---|---|---|---|---|---|---|"
}
