#!/usr/bin/env bash
# Which layers can be generated? The paper's v1 Table 4c: the BatchNorm layers of one residual block at three
# depths of ResNet-18 (early, middle, late: the last is pdiff's default `norm`). Same seed: the same network.
#   bash experiments/ablate_layers.sh     (digits, 5 epochs; SCALE=paper: CIFAR-100)
source "$(dirname "$0")/common.sh"
EPOCHS=$([[ $SCALE == digits ]] && echo "--epochs 5" || echo "")
header "generated layers"
for layers in "layer1.1.bn*" "layer3.1.bn*" "layer4.1.bn*"; do
  run="$OUT/${layers%%.bn*}"
  pd collect --run "$run" --arch resnet18 --params "$layers" $NET $EPOCHS $([[ $SCALE == quick ]] && echo "-k 10") \
    >/dev/null
  pd fit --run "$run" $FIT >/dev/null
  s=$(pd sample --run "$run" $SAMPLE --json)
  row "\`$layers\`" "$s"
done
