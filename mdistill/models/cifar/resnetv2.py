"""ResNet18 / ResNet50 for 32x32 images (a 3x3 stem, no max-pool), with
mdistiller's parameter names (``shortcut``, ``linear``)."""
from torch import nn
import torch.nn.functional as F

from ...registry import CIFAR_MODELS


class Basic(nn.Module):
    expansion = 1

    def __init__(self, in_channels, channels, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = _shortcut(in_channels, channels, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        preact = self.bn2(self.conv2(out)) + self.shortcut(x)
        return F.relu(preact), preact


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels, channels, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, channels * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels * 4)
        self.shortcut = _shortcut(in_channels, channels * 4, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        preact = self.bn3(self.conv3(out)) + self.shortcut(x)
        return F.relu(preact), preact


def _shortcut(in_channels, out_channels, stride):
    if stride == 1 and in_channels == out_channels:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                         nn.BatchNorm2d(out_channels))


class Stage(nn.Sequential):
    def forward(self, x):
        preact = None
        for block in self:
            x, preact = block(x)
        return x, preact


class ResNetV2(nn.Module):
    """Four stages of widths 64/128/256/512 (times the block expansion)."""

    def __init__(self, block, counts, num_classes=100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_channels = 64
        for index, (channels, count) in enumerate(zip((64, 128, 256, 512), counts), start=1):
            stride = 1 if index == 1 else 2
            blocks = []
            for position in range(count):
                blocks.append(block(in_channels, channels, stride if position == 0 else 1))
                in_channels = channels * block.expansion
            setattr(self, f"layer{index}", Stage(*blocks))
        self.linear = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        feats, preacts = [out], [out]
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            out, preact = stage(out)
            feats.append(out)
            preacts.append(preact)
        pooled = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(pooled), {"feats": feats, "preact_feats": preacts,
                                     "pooled_feat": pooled}


@CIFAR_MODELS.register("ResNet18")
def resnet18_cifar(num_classes=100):
    """ResNet18 for 32x32 images."""
    return ResNetV2(Basic, (2, 2, 2, 2), num_classes)


@CIFAR_MODELS.register("ResNet50")
def resnet50_cifar(num_classes=100):
    """ResNet50 for 32x32 images (a released mdistiller teacher)."""
    return ResNetV2(Bottleneck, (3, 4, 6, 3), num_classes)
