"""ResNet18 / ResNet50 for 32x32 images: a 3x3 stride-1 stem without max-pool,
four stages of widths 64/128/256/512 (x4 for bottlenecks); parameter names as
in mdistiller (``shortcut``, ``linear``), so its ResNet50 teacher loads.

``feats`` for a 32x32 input (``e`` = 1 for ResNet18, 4 for ResNet50):
    0: stem conv-BN-ReLU, 64 x 32 x 32
    1: layer1, 64e x 32 x 32;  2: layer2, 128e x 16 x 16
    3: layer3, 256e x 8 x 8;   4: layer4, 512e x 4 x 4
all post-ReLU; ``preact_feats`` are the same maps before that ReLU (the stem's
BN output, then each stage's last residual sum). ``bn_before_relu()`` gives the
BN behind each: the stem's ``bn1``, then each stage's last ``bn2`` (``bn3`` in
bottlenecks).
"""
from torch import nn
import torch.nn.functional as F

from ...registry import CIFAR_MODELS
from ..common import BNBeforeReLU, feature_dict, global_pool, init_conv_bn
from .resnet import make_stage


def _shortcut(in_channels, out_channels, stride):
    # An empty Sequential for the identity keeps mdistiller's module tree.
    if stride == 1 and in_channels == out_channels:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                         nn.BatchNorm2d(out_channels))


class _Residual(nn.Module):
    """Adds the shortcut to the residual branch and applies the final ReLU."""

    def _finish(self, out, x):
        out += self.shortcut(x) if len(self.shortcut) else x
        if self.returns_preact:
            return F.relu(out), out
        return F.relu(out, inplace=True)


class BasicBlock(_Residual):
    expansion = 1

    def __init__(self, in_channels, channels, stride=1, returns_preact=False):
        super().__init__()
        self.returns_preact = returns_preact
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = _shortcut(in_channels, channels, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return self._finish(self.bn2(self.conv2(out)), x)


class Bottleneck(_Residual):
    expansion = 4

    def __init__(self, in_channels, channels, stride=1, returns_preact=False):
        super().__init__()
        self.returns_preact = returns_preact
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, channels * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels * 4)
        self.shortcut = _shortcut(in_channels, channels * 4, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        return self._finish(self.bn3(self.conv3(out)), x)


class ResNetV2(nn.Module):
    """Args:
        block: BasicBlock or Bottleneck.
        counts: blocks in each of the four stages.
        num_classes: classifier outputs.
    """

    #: ``feats[0]`` is the stem's map (see :mod:`mdistill.models.stages`).
    stem_map = True

    def __init__(self, block, counts, num_classes=100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_channels = 64
        for index, (channels, count) in enumerate(zip((64, 128, 256, 512), counts), start=1):
            stage = make_stage(block, in_channels, channels, count, 1 if index == 1 else 2)
            setattr(self, f"layer{index}", stage)
            in_channels = channels * block.expansion
        self.linear = nn.Linear(in_channels, num_classes)
        init_conv_bn(self)

    def stages(self):
        return self.layer1, self.layer2, self.layer3, self.layer4

    def forward(self, x):
        preact = self.bn1(self.conv1(x))
        out = F.relu(preact)
        feats, preacts = [out], [preact]
        for stage in self.stages():
            out, preact = stage(out)
            feats.append(out)
            preacts.append(preact)
        pooled = global_pool(out)
        return self.linear(pooled), feature_dict(feats, preacts, pooled)

    def bn_before_relu(self):
        """One :class:`BNBeforeReLU` per map of ``preact_feats``."""
        last = "bn3" if isinstance(self.layer1[0], Bottleneck) else "bn2"
        return [BNBeforeReLU(self.bn1)] + [BNBeforeReLU(getattr(stage[-1], last))
                                           for stage in self.stages()]


@CIFAR_MODELS.register("ResNet18")
def resnet18(num_classes=100):
    """ResNet18 for 32x32 images (BasicBlocks 2-2-2-2)."""
    return ResNetV2(BasicBlock, (2, 2, 2, 2), num_classes)


@CIFAR_MODELS.register("ResNet50")
def resnet50(num_classes=100):
    """ResNet50 for 32x32 images (Bottlenecks 3-4-6-3); a released mdistiller teacher."""
    return ResNetV2(Bottleneck, (3, 4, 6, 3), num_classes)
