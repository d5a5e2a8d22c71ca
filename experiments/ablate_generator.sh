#!/usr/bin/env bash
# p-diff's generator beside pdiff's, on one collection: fit --generator span (pdiff's), v3 (the v3 reference code's
# architecture and training settings) and the two mixed (span+conv: pdiff's autoencoder, p-diff's denoiser; conv+mlp:
# the other way round), each judged against the same held-out originals. The label column says what fit took, in s.
#   bash experiments/ablate_generator.sh            (digits: the quick start's collection)
#   PROTOCOL=seeds bash experiments/ablate_generator.sh   (200 seed-trained, aligned networks)
#   SCALE=paper bash ...                                  (ResNet-18's BatchNorm subset on CIFAR-100, a GPU)
#   GENERATORS="span v3" ...                              (which generators)
source "$(dirname "$0")/common.sh"
GENERATORS=${GENERATORS:-"span span+conv conv+mlp v3"}
ARCH=$([[ $SCALE == paper ]] && echo resnet18 || echo mlp3)
if [[ ${PROTOCOL:-steps} == seeds ]]; then COLLECT="--networks $([[ $SCALE == quick ]] && echo 20 || echo 200)"
else COLLECT="-k $([[ $SCALE == quick ]] && echo 40 || echo 200)"; fi
[[ $SCALE == quick ]] && FIT="--ae-steps 2 --denoiser-steps 2" && SAMPLE="-n 4 --sampler ddim"
pd collect --run "$OUT/run" --arch "$ARCH" $COLLECT $NET >/dev/null
header "generator (fit s)"
for gen in $GENERATORS; do
  f=$(pd fit --run "$OUT/run" --name "${gen/+/-}" --generator "$gen" $FIT --json)
  s=$(pd sample --run "$OUT/run" --model "${gen/+/-}" $SAMPLE --json)
  row "$gen ($(get .seconds.total <<<"$f" | cut -d. -f1))" "$s"
done
