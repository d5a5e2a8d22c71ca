"""The small ConvNet of the p-diff reference code's whole-model experiments (v3: dataset/full/cifar10_convnet/
model.py): three conv layers of 8, 8 and 4 channels, each with a LayerNorm over (channels, height, width), LeakyReLU
and 2x2 max-pooling, then Linear 16 and the classes. The reference builds it for 3x64x64 images (CIFAR-10 resized to
64); here its sizes follow the input, so that

    pdiff collect --arch examples/v3_convnet.py:make --data cifar10 --download --image-size 64 ...

is the same network (README: "The paper's protocols"). Written for pdiff, not copied from the reference.
"""
import torch.nn as nn


def make(channels: int, size: int, classes: int) -> nn.Module:
    s = [size // 2, size // 4, size // 8, size // 16]  # after the stride-2 conv, then after each pooling
    block = lambda c_in, c_out, k, stride, side: [nn.Conv2d(c_in, c_out, k, stride, k // 2),
                                                   nn.LayerNorm([c_out, side, side]), nn.LeakyReLU(), nn.MaxPool2d(2, 2)]
    return nn.Sequential(*block(channels, 8, 7, 2, s[0]), *block(8, 8, 3, 1, s[1]), *block(8, 4, 3, 1, s[2]),
                         nn.Flatten(), nn.Linear(4 * s[3] * s[3], 16), nn.LeakyReLU(), nn.Linear(16, classes))
