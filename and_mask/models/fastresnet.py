"""FastResnet: the small residual network of the CIFAR-10 random-label experiment.

The architecture of the cifar10-fast recipe (Page, 2018) as the original code used it:

    prep    conv_bn(3 → 64)                                            32×32
    layer1  conv_bn(64 → 128), max-pool 2, + residual(128)              16×16
    layer2  conv_bn(128 → 256), max-pool 2                                8×8
    layer3  conv_bn(256 → 512), max-pool 2, + residual(512)               4×4
    head    global max-pool, flatten, Linear(512 → 10, no bias), logits × 0.125

conv_bn = 3×3 convolution (padding 1, no bias), BatchNorm2d, ReLU; residual(c) adds
conv_bn(c → c) ∘ conv_bn(c → c) of the input to the input. The 0.125 factor keeps the initial
logits small (a softmax temperature of 8). A uint8 input is divided by 255 first; float inputs
(already normalised by the data loader) are used as they are.
"""
import torch
from torch import nn

LOGIT_SCALE = 0.125


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU())


class Residual(nn.Module):
    """x + f(x), f = two conv_bn blocks of `channels` → `channels`."""

    def __init__(self, channels: int):
        super().__init__()
        self.res = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x):
        return x + self.res(x)


class FastResnet(nn.Module):
    def __init__(self, n_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.prep = conv_bn(in_channels, 64)
        self.layer1 = nn.Sequential(conv_bn(64, 128), nn.MaxPool2d(2), Residual(128))
        self.layer2 = nn.Sequential(conv_bn(128, 256), nn.MaxPool2d(2))
        self.layer3 = nn.Sequential(conv_bn(256, 512), nn.MaxPool2d(2), Residual(512))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.classifier = nn.Linear(512, n_classes, bias=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 512) globally max-pooled features."""
        if x.dtype == torch.uint8:
            x = x.float() / 255
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return torch.flatten(self.pool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, n_classes) logits = 0.125 · classifier(features(x))."""
        return self.classifier(self.features(x)) * LOGIT_SCALE
