"""CIFAR ResNets (He et al. 2016) with mdistiller's parameter names.

resnet8 ... resnet110 use widths (16, 16, 32, 64); resnet8x4 and resnet32x4
use (32, 64, 128, 256). Depth 6n+2 gives n basic blocks per stage.
"""
from torch import nn
import torch.nn.functional as F

from ...registry import CIFAR_MODELS


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual; returns the output and the
    pre-ReLU sum (the stage's pre-activation feature)."""

    def __init__(self, in_channels, channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                            nn.BatchNorm2d(channels))

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        preact = self.bn2(self.conv2(out)) + shortcut
        return F.relu(preact), preact


class Stage(nn.Sequential):
    """A sequence of blocks that also hands back the last block's pre-activation."""

    def forward(self, x):
        preact = None
        for block in self:
            x, preact = block(x)
        return x, preact


class CifarResNet(nn.Module):
    """ResNet for 32x32 images.

    Args:
        depth: 6n + 2 (8, 14, 20, 32, 44, 56, 110).
        widths: stem width, then the three stage widths.
        num_classes: classifier outputs.
    """

    def __init__(self, depth, widths, num_classes=100):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_channels = widths[0]
        for index, (channels, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            stage = Stage(*[BasicBlock(in_channels if i == 0 else channels, channels,
                                       stride if i == 0 else 1) for i in range(blocks)])
            setattr(self, f"layer{index}", stage)
            in_channels = channels
        self.fc = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        stem = F.relu(self.bn1(self.conv1(x)))
        feats, preacts = [stem], [stem]
        x = stem
        for stage in (self.layer1, self.layer2, self.layer3):
            x, preact = stage(x)
            feats.append(x)
            preacts.append(preact)
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(pooled), {"feats": feats, "preact_feats": preacts, "pooled_feat": pooled}


def _register(name, depth, widths):
    def build(num_classes=100):
        return CifarResNet(depth, widths, num_classes)
    build.__name__ = name
    build.__doc__ = f"{name}: CIFAR ResNet of depth {depth}, widths {widths}."
    CIFAR_MODELS.register(name, build)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register(f"resnet{_depth}", _depth, (16, 16, 32, 64))
_register("resnet8x4", 8, (32, 64, 128, 256))
_register("resnet32x4", 32, (32, 64, 128, 256))
