"""A small ResNet with BatchNorm for whole-network generation from many seeds: a 3x3 stem of 32 channels, one
residual block at 32 and one at 64 (stride 2, with a 1x1 projection), global average pooling, a Linear head.
On scikit-learn's 8x8 digits it has 78k parameters and trains to about 97 % in 30 epochs:

    pdiff collect --arch examples/resnet_bn.py:make --networks 32

Its running statistics stay out of the parameter vectors: every network pdiff evaluates from a vector gets them
recomputed on training batches (collect --recalibrate). Written for pdiff.
"""
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.project = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)) \
            if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.project(x))


class ResNetBN(nn.Module):
    def __init__(self, channels: int, classes: int, widths: tuple = (32, 64)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        self.blocks = nn.Sequential(Block(widths[0], widths[0], 1), Block(widths[0], widths[1], 2))
        self.head = nn.Linear(widths[1], classes)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


def make(channels: int, size: int, classes: int) -> nn.Module:
    return ResNetBN(channels, classes)


def tiny(channels: int, size: int, classes: int) -> nn.Module:  # 8 and 16 channels: what the tests train
    return ResNetBN(channels, classes, (8, 16))
