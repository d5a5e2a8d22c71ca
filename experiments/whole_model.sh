#!/usr/bin/env bash
# Whole networks from many seeds (the paper's v1 Table 3 / v3 Table 2): N networks trained from N seeds, with
# their hidden units aligned to the first network's (weight matching) and without. Medians of test accuracy;
# the ensemble is the weight average of all N.
#   bash experiments/whole_model.sh     (digits: mlp3, N = 200; SCALE=paper: convnet3 on CIFAR-10)
source "$(dirname "$0")/common.sh"
N=${N:-$([[ $SCALE == quick ]] && echo 12 || echo 200)}
ARCH=$([[ $SCALE == paper ]] && echo "convnet3 --data cifar10 --download" || echo mlp3)
echo "| $N seeds | originals | decoded | generated best / median | average of $((N < 16 ? N : 16)) | ensemble | gaussian | verdict |"
echo "|---|---|---|---|---|---|---|---|"
for align in align no-align; do
  run="$OUT/$align"
  pd collect --run "$run" --arch $ARCH --seeds "$N" --$align $([[ $SCALE == quick ]] && echo "--epochs 3") >/dev/null
  pd fit --run "$run" $FIT >/dev/null
  s=$(pd sample --run "$run" $SAMPLE --json)
  printf "| %s | %.2f | %.2f | %.2f / %.2f | %.2f | %.2f | %.2f | %s |\n" "$align" \
    "$(get .original.median <<<"$s")" "$(get .decoded.median <<<"$s")" "$(get .generated.best <<<"$s")" \
    "$(get .generated.median <<<"$s")" "$(get .baselines.average.median <<<"$s")" \
    "$(get .baselines.ensemble.median <<<"$s")" "$(get .baselines.gaussian.median <<<"$s")" \
    "$(get .verdict.label <<<"$s")"
done
