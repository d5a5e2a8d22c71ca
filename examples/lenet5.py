"""LeNet-5 (LeCun et al. 1998) as it is usually written in PyTorch: two 5x5 convolutions of 6 and 16 channels,
each followed by ReLU and 2x2 max-pooling, then Linear 120, 84 and the classes. It needs images of at least
28x28 (a 32x32 input is the original's); scikit-learn's 8x8 digits are resized:

    pdiff collect --arch examples/lenet5.py:LeNet5 --image-size 32 --networks 32

The constructor takes `in_channels` and `num_classes` by name, as such classes do; pdiff fills them. Written for
pdiff.
"""
import torch.nn as nn


class LeNet5(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 32):
        super().__init__()
        side = ((image_size - 4) // 2 - 4) // 2  # after each 5x5 convolution and 2x2 pooling
        self.features = nn.Sequential(nn.Conv2d(in_channels, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(16 * side * side, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                                        nn.Linear(84, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


make = LeNet5
