"""CIFAR ResNets (He et al. 2016), parameter names as in mdistiller.

resnet8 ... resnet110 have widths (16, 16, 32, 64); resnet8x4 and resnet32x4
(32, 64, 128, 256). Depth 6n+2 means n basic blocks in each of three stages.

``feats`` for a 32x32 input (``W`` = the widths):
    0: stem conv-BN-ReLU, W[0] x 32 x 32
    1: layer1, W[1] x 32 x 32;  2: layer2, W[2] x 16 x 16;  3: layer3, W[3] x 8 x 8
all post-ReLU; ``preact_feats`` are the same maps before that ReLU (the stem's
BN output, then each stage's last residual sum). ``bn_before_relu()`` gives the
BN behind each: the stem's ``bn1``, then each stage's last ``bn2``.
"""
from torch import nn
import torch.nn.functional as F

from ...registry import CIFAR_MODELS
from ..common import BNBeforeReLU, feature_dict, global_pool, init_conv_bn


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut, then ReLU.

    The last block of a stage (``returns_preact``) returns ``(output, sum)`` so the
    stage's pre-activation comes for free; the others return the output only.
    """

    expansion = 1

    def __init__(self, in_channels, channels, stride=1, returns_preact=False):
        super().__init__()
        self.returns_preact = returns_preact
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        if self.returns_preact:
            return F.relu(out), out
        return F.relu(out, inplace=True)


def make_stage(block, in_channels, channels, count, stride):
    """``count`` blocks; the first may change width and stride, the last returns
    its pre-activation too (so the Sequential's output is a pair)."""
    return nn.Sequential(*[
        block(in_channels if index == 0 else channels * block.expansion,
              channels, stride if index == 0 else 1, returns_preact=index == count - 1)
        for index in range(count)])


class CifarResNet(nn.Module):
    """ResNet for 32x32 images.

    Args:
        depth: 6n + 2 (8, 14, 20, 32, 44, 56, 110).
        widths: the stem width, then the three stage widths.
        num_classes: classifier outputs.
    """

    #: ``feats[0]`` is the stem's map (see :mod:`mdistill.models.stages`).
    stem_map = True

    def __init__(self, depth, widths, num_classes=100):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        count = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = make_stage(BasicBlock, widths[0], widths[1], count, 1)
        self.layer2 = make_stage(BasicBlock, widths[1], widths[2], count, 2)
        self.layer3 = make_stage(BasicBlock, widths[2], widths[3], count, 2)
        self.fc = nn.Linear(widths[3], num_classes)
        init_conv_bn(self)

    def forward(self, x):
        pre0 = self.bn1(self.conv1(x))
        stem = F.relu(pre0)
        out1, pre1 = self.layer1(stem)
        out2, pre2 = self.layer2(out1)
        out3, pre3 = self.layer3(out2)
        pooled = global_pool(out3)
        return self.fc(pooled), feature_dict([stem, out1, out2, out3],
                                             [pre0, pre1, pre2, pre3], pooled)

    def bn_before_relu(self):
        """One :class:`BNBeforeReLU` per map of ``preact_feats``."""
        return [BNBeforeReLU(self.bn1)] + [BNBeforeReLU(stage[-1].bn2)
                                           for stage in (self.layer1, self.layer2, self.layer3)]


def _register(name, depth, widths):
    def build(num_classes=100):
        return CifarResNet(depth, widths, num_classes)

    build.__name__ = name
    build.__doc__ = f"{name}: CIFAR ResNet, depth {depth}, widths {widths}."
    CIFAR_MODELS.register(name, build)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register(f"resnet{_depth}", _depth, (16, 16, 32, 64))
_register("resnet8x4", 8, (32, 64, 128, 256))
_register("resnet32x4", 32, (32, 64, 128, 256))
