"""Wide ResNets (Zagoruyko & Komodakis 2016) with mdistiller's parameter names.

wrn_<depth>_<widen>: depth 6n+4, stage widths 16k, 32k, 64k. Blocks are
pre-activation (BN, ReLU, conv); ``feats`` are the raw block outputs.
"""
from torch import nn
import torch.nn.functional as F

from ...registry import CIFAR_MODELS


class WideBlock(nn.Module):
    """BN-ReLU-conv twice, with a 1x1 projection shortcut when the shape changes.

    As in the reference implementation, a block whose width changes applies
    its first BN-ReLU to the input before splitting into the two paths.
    """

    def __init__(self, in_channels, channels, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.same_shape = in_channels == channels
        self.convShortcut = None if self.same_shape else nn.Conv2d(
            in_channels, channels, 1, stride, 0, bias=False)

    def forward(self, x):
        activated = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(activated)), inplace=True)
        out = self.conv2(out)
        shortcut = x if self.same_shape else self.convShortcut(activated)
        return out + shortcut


class WideGroup(nn.Module):
    """One stage: ``layer`` holds its blocks (mdistiller's NetworkBlock)."""

    def __init__(self, blocks, in_channels, channels, stride):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(in_channels if i == 0 else channels, channels,
                                               stride if i == 0 else 1) for i in range(blocks)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """Wide ResNet for 32x32 images.

    Args:
        depth: 6n + 4 (16, 40, ...).
        widen: width multiplier k.
        num_classes: classifier outputs.
    """

    def __init__(self, depth, widen, num_classes=100):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = WideGroup(blocks, widths[0], widths[1], 1)
        self.block2 = WideGroup(blocks, widths[1], widths[2], 2)
        self.block3 = WideGroup(blocks, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x):
        stem = self.conv1(x)
        out1 = self.block1(stem)
        out2 = self.block2(out1)
        out3 = self.block3(out2)
        final = self.bn1(out3)
        pooled = F.adaptive_avg_pool2d(F.relu(final), 1).flatten(1)
        # Pre-activations: each stage output after the BN that follows it.
        preacts = [stem, self.block2.layer[0].bn1(out1), self.block3.layer[0].bn1(out2), final]
        return self.fc(pooled), {"feats": [stem, out1, out2, out3], "preact_feats": preacts,
                                 "pooled_feat": pooled}


def _register(depth, widen):
    name = f"wrn_{depth}_{widen}"

    def build(num_classes=100):
        return WideResNet(depth, widen, num_classes)
    build.__name__ = name
    build.__doc__ = f"{name}: Wide ResNet, depth {depth}, widen factor {widen}."
    CIFAR_MODELS.register(name, build)


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register(_depth, _widen)
