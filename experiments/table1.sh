#!/usr/bin/env bash
# The paper's Table 1: data sets x architectures, each collected with the v3 protocol's shape (a trained network,
# then K snapshots of its last normalisation layers, or of all parameters for mlp3 / convnet3), generated, judged.
#   bash experiments/table1.sh        (digits x mlp3, convnet3, resnet18: what runs offline)
#   SCALE=paper bash ...              (MNIST, CIFAR-10/100, STL-10, Flowers, Pets, Food-101 x ResNet-18/50,
#                                      ViT-B/16, ConvNeXt-T: the paper's grid, a GPU and --download)
#   DATASETS="digits" ARCHS="mlp3" bash ...   (a part of the grid)
source "$(dirname "$0")/common.sh"
if [[ $SCALE == paper ]]; then
  DATASETS=${DATASETS:-"mnist cifar10 cifar100 stl10 flowers102 pets food101"}
  ARCHS=${ARCHS:-"resnet18 resnet50 vit_b_16 convnext_tiny"}
else
  DATASETS=${DATASETS:-digits}; ARCHS=${ARCHS:-$([[ $SCALE == quick ]] && echo mlp3 || echo "mlp3 convnet3 resnet18")}
fi
header "data set / architecture"
for d in $DATASETS; do
  for a in $ARCHS; do
    net=$NET; [[ $SCALE != paper ]] && net="--data $d $NET"
    [[ $SCALE == paper ]] && net="${NET/--data cifar100/--data $d}"
    pd collect --run "$OUT/$d-$a" --arch "$a" $net $([[ $a == convnet3 ]] && echo "--snapshot-lr 0.001") >/dev/null
    pd fit --run "$OUT/$d-$a" $FIT >/dev/null
    row "$d / $a" "$(pd sample --run "$OUT/$d-$a" $SAMPLE --json)"
  done
done
