#!/usr/bin/env bash
# Whole networks from many seeds (the paper's v1 Table 3 / v3 Table 2) for any network pdiff can align: N networks
# trained from N seeds, with their hidden units aligned to the first network's by the symmetry spec read from the
# network's graph (weight matching), and without. Medians of test accuracy; "average of 16": blends of 16 training
# networks; the ensemble: the weight average of all training networks; "finished": the same given the generator's
# own fitting step (a generator with finish(), e.g. the neuron generator's probe calibration; else -). The ResNet's
# BatchNorm statistics are recomputed on 20 training batches for every network evaluated.
#   bash experiments/whole_model.sh     (digits: mlp3 w32 / w128 / w512, convnet3, LeNet-5 at 28 px, ResNet-BN 32/64;
#                                        N = 32; SCALE=paper: convnet3 on CIFAR-10, N = 200)
#   ONLY="mlp3 w32,LeNet-5"            (those rows only)
#   GENERATOR=experiments/neurons.py:Neurons ONLY="mlp3 w32,mlp3 w128"   (another generator: the neuron generator;
#   GENERATOR=experiments/neurons.py:ConvNeurons ONLY=convnet3             its recipe measured on convolutions)
source "$(dirname "$0")/common.sh"
ex="$here/../examples"
declare -A ARCH=(["mlp3 w32"]="--arch mlp3" ["mlp3 w128"]="--arch mlp3 --width 128" ["mlp3 w512"]="--arch mlp3 --width 512"
                 ["convnet3"]="--arch convnet3" ["LeNet-5"]="--arch $ex/lenet5.py:make --image-size 28 --lr 0.02"
                 ["ResNet-BN"]="--arch $ex/resnet_bn.py:make --epochs 10")
ORDER=("mlp3 w32" "mlp3 w128" "mlp3 w512" "convnet3" "LeNet-5" "ResNet-BN")
if [[ $SCALE == quick ]]; then
  N=${N:-10}; MORE="--epochs 2"; ARCH["ResNet-BN"]="--arch $ex/resnet_bn.py:tiny"  # 8 / 16 channels
elif [[ $SCALE == paper ]]; then
  N=${N:-200}; MORE="--data cifar10 --download"; ORDER=("convnet3")
else
  N=${N:-32}; MORE=""
fi
IFS=, read -ra ORDER <<<"${ONLY:-$(IFS=,; echo "${ORDER[*]}")}"
read -ra FITS <<<"$FIT"
[[ -n ${GENERATOR:-} ]] && FITS=(--generator "$GENERATOR")  # its class's DEFAULTS, not the built-in generators' $FIT
echo "| $N seeds | aligned | originals | average of 16 | ensemble | finished: average / ensemble | generated best / median | verdict |"
echo "|---|---|---|---|---|---|---|---|"
for name in "${ORDER[@]}"; do
  for align in align no-align; do
    run="$OUT/$(tr -cd '[:alnum:]' <<<"$name")-$align"
    pd collect --run "$run" ${ARCH[$name]} --networks "$N" --$align $MORE >/dev/null
    pd fit --run "$run" "${FITS[@]}" >/dev/null
    s=$(pd sample --run "$run" $SAMPLE --json)
    printf "| %s | %s | %.2f | %.2f | %.2f | %s / %s | %.2f / %.2f | %s |\n" "$name" \
      "$([[ $align == align ]] && echo yes || echo no)" "$(get .original.median <<<"$s")" \
      "$(get .baselines.average.median <<<"$s")" "$(get .baselines.ensemble.median <<<"$s")" \
      "$(num '.baselines."average-finished".median' "$s")" "$(num '.baselines."ensemble-finished".median' "$s")" \
      "$(get .generated.best <<<"$s")" "$(get .generated.median <<<"$s")" \
      "$(get .verdict.label <<<"$s")"
  done
done
