#!/usr/bin/env bash
# Generation at a target accuracy (fit --condition, sample --target-accuracy A --guidance W): one collection, one
# conditioned model, the generated networks unguided and at the originals' median and best validation accuracy for
# several guidance weights, each judged against the held-out originals (the label says when a target is reached
# by copying). Condition and targets are validation accuracies; the test set only grades.
#   bash experiments/target_accuracy.sh    (digits: the quick start's collection)
source "$(dirname "$0")/common.sh"
GUIDANCE=${GUIDANCE:-$([[ $SCALE == quick ]] && echo "2" || echo "0 1 2 4")}
c=$(pd collect --run "$OUT/run" $NET --json)
pd fit --run "$OUT/run" --condition $FIT >/dev/null
s=$(pd sample --run "$OUT/run" $SAMPLE --json)
header "target (guidance)"
row "none" "$s"
for t in "$(get .validation.median <<<"$c")" "$(get .validation.best <<<"$c")"; do
  for w in $GUIDANCE; do
    row "$(printf "%.2f" "$t") ($w)" "$(pd sample --run "$OUT/run" $SAMPLE --target-accuracy "$t" --guidance "$w" --json)"
  done
done
