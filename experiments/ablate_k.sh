#!/usr/bin/env bash
# How many snapshots does the generator need? The paper's v1 Table 4a (K = 1, 10, 50, 200 training snapshots). Each K
# is its own collection with the same seed: the same network, and stage 2's first K + H steps, of which fit holds
# H = max(5, K / 10) out (spread through them) for the verdict: the generator sees K.
#   bash experiments/ablate_k.sh     (digits: mlp3, all 3,466 parameters; SCALE=paper: resnet18's last two BN layers)
source "$(dirname "$0")/common.sh"
KS=${KS:-$([[ $SCALE == quick ]] && echo "1 10" || echo "1 10 50 200")}
ARCH=$([[ $SCALE == paper ]] && echo resnet18 || echo mlp3)
header K
for k in $KS; do
  h=$(( k / 10 > 5 ? k / 10 : 5 ))
  pd collect --run "$OUT/k$k" --arch "$ARCH" -k $((k + h)) $NET >/dev/null
  pd fit --run "$OUT/k$k" --holdout "$h" $FIT >/dev/null
  s=$(pd sample --run "$OUT/k$k" $SAMPLE --json)
  row "$k" "$s"
done
