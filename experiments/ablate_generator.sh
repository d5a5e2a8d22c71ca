#!/usr/bin/env bash
# p-diff's generator beside pdiff's, on one collection: fit --autoencoder pdiff|pca x --denoiser pdiff|mlp (pdiff:
# the v3 reference code's architecture and training settings; pca / mlp: pdiff's own), each judged against the same
# held-out originals. The label column says what fit took, in seconds.
#   bash experiments/ablate_generator.sh            (digits: the quick start's collection)
#   PROTOCOL=seeds bash experiments/ablate_generator.sh   (200 seed-trained, aligned networks)
#   SCALE=paper bash ...                                  (ResNet-18's BatchNorm subset on CIFAR-100, a GPU)
#   COMBOS="pca,mlp pdiff,pdiff" ...                      (which pairs, autoencoder,denoiser)
source "$(dirname "$0")/common.sh"
COMBOS=${COMBOS:-"pca,mlp pca,pdiff pdiff,mlp pdiff,pdiff"}
ARCH=$([[ $SCALE == paper ]] && echo resnet18 || echo mlp3)
if [[ ${PROTOCOL:-steps} == seeds ]]; then COLLECT="--seeds $([[ $SCALE == quick ]] && echo 20 || echo 200)"
else COLLECT="-k $([[ $SCALE == quick ]] && echo 40 || echo 200)"; fi
[[ $SCALE == quick ]] && FIT="--ae-steps 2 --ddpm-steps 2" && SAMPLE="-n 4 --sampler ddim --steps 5"
pd collect --run "$OUT/run" --arch "$ARCH" $COLLECT $NET >/dev/null
header "autoencoder + denoiser (fit s)"
for c in $COMBOS; do
  ae=${c%,*}; dn=${c#*,}
  f=$(pd fit --run "$OUT/run" --name "$ae-$dn" --autoencoder "$ae" --denoiser "$dn" $FIT --json)
  s=$(pd sample --run "$OUT/run" --model "$ae-$dn" $SAMPLE --json)
  row "$ae + $dn ($(get .seconds.total <<<"$f" | cut -d. -f1))" "$s"
done
