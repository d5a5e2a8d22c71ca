#!/usr/bin/env bash
# Does the autoencoder need its noise augmentation? The paper's v1 Table 4b: no noise, input noise only,
# latent noise only, both. One collection, four named models fitted to it.
#   bash experiments/ablate_noise.sh     (digits: mlp3; SCALE=paper: resnet18's last two BN layers)
source "$(dirname "$0")/common.sh"
ARCH=$([[ $SCALE == paper ]] && echo resnet18 || echo mlp3)
pd collect --run "$OUT/noise" --arch "$ARCH" $NET $([[ $SCALE == quick ]] && echo "-k 20") >/dev/null
header "noise augmentation"
for setting in "none:--noise none" "input only:--noise input" "latent only:--noise latent" "both (default):"; do
  name=${setting%%:*}
  model=$(tr -cd 'a-z' <<<"${name%% *}")
  pd fit --run "$OUT/noise" --name "$model" ${setting#*:} $FIT >/dev/null
  s=$(pd sample --run "$OUT/noise" --model "$model" $SAMPLE --json)
  row "$name" "$s"
done
