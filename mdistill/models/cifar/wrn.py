"""Wide ResNets (Zagoruyko & Komodakis 2016), parameter names as in mdistiller.

wrn_<depth>_<k>: depth 6n+4, n pre-activation blocks (BN-ReLU-conv, twice) in
each of three groups of widths 16k, 32k, 64k; a final BN-ReLU before pooling.

``feats`` for a 32x32 input are the raw outputs (no ReLU, so they hold negative
values):
    0: the stem convolution, 16 x 32 x 32
    1: block1, 16k x 32 x 32;  2: block2, 32k x 16 x 16;  3: block3, 64k x 8 x 8
``preact_feats`` are those maps after the BN that follows them (the first
``bn1`` of block1, block2 and block3, then the top-level ``bn1``), the last
step before a ReLU; ``bn_before_relu()`` gives those BNs.
"""
from torch import nn
import torch.nn.functional as F

from ...registry import CIFAR_MODELS
from ..common import BNBeforeReLU, feature_dict, global_pool, init_conv_bn, init_linear


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus the shortcut.

    A block that changes the width feeds the BN-ReLU'd input to both paths (the
    1x1 ``convShortcut`` included); one that keeps it adds its raw input. A block
    made with ``returns_normed_input`` also returns ``bn1(x)``, the preceding
    stage's pre-activation feature.
    """

    def __init__(self, in_channels, channels, stride, returns_normed_input=False):
        super().__init__()
        self.returns_normed_input = returns_normed_input
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.convShortcut = None
        if in_channels != channels:
            self.convShortcut = nn.Conv2d(in_channels, channels, 1, stride, 0, bias=False)

    def forward(self, x):
        normed = self.bn1(x)
        activated = F.relu(normed, inplace=not self.returns_normed_input)
        out = F.relu(self.bn2(self.conv1(activated)), inplace=True)
        out = self.conv2(out)
        out += x if self.convShortcut is None else self.convShortcut(activated)
        if self.returns_normed_input:
            return out, normed
        return out


class WideGroup(nn.Module):
    """One group of blocks, kept in ``layer`` as mdistiller's NetworkBlock.

    ``forward`` returns ``(output, bn1 of the input)``; the second is None unless
    the group was made with ``returns_normed_input``.
    """

    def __init__(self, count, in_channels, channels, stride, returns_normed_input=False):
        super().__init__()
        self.returns_normed_input = returns_normed_input
        self.layer = nn.Sequential(*[
            WideBlock(in_channels if index == 0 else channels, channels,
                      stride if index == 0 else 1, returns_normed_input and index == 0)
            for index in range(count)])

    def forward(self, x):
        blocks = iter(self.layer)
        out = next(blocks)(x)
        normed = None
        if self.returns_normed_input:
            out, normed = out
        for block in blocks:
            out = block(out)
        return out, normed


class WideResNet(nn.Module):
    """Args:
        depth: 6n + 4 (16, 40, ...).
        widen: the width multiplier k.
        num_classes: classifier outputs.
    """

    #: ``feats[0]`` is the stem convolution's map (see :mod:`mdistill.models.stages`).
    stem_map = True

    def __init__(self, depth, widen, num_classes=100):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
        count = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = WideGroup(count, widths[0], widths[1], 1, returns_normed_input=True)
        self.block2 = WideGroup(count, widths[1], widths[2], 2, returns_normed_input=True)
        self.block3 = WideGroup(count, widths[2], widths[3], 2, returns_normed_input=True)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        init_conv_bn(self)
        init_linear(self)

    def forward(self, x):
        stem = self.conv1(x)
        out1, pre0 = self.block1(stem)
        out2, pre1 = self.block2(out1)
        out3, pre2 = self.block3(out2)
        pre3 = self.bn1(out3)
        pooled = global_pool(F.relu(pre3))
        # mdistiller gets pre1 and pre2 by calling the next group's bn1 a second
        # time, which in training also updates that BN's running statistics twice
        # per step; taking the value the block computes anyway avoids both.
        # (Its preact_feats[0] is the raw stem; ours follows the rule of the others.)
        return self.fc(pooled), feature_dict([stem, out1, out2, out3],
                                             [pre0, pre1, pre2, pre3], pooled)

    def bn_before_relu(self):
        """One :class:`BNBeforeReLU` per map of ``preact_feats``."""
        groups = (self.block1, self.block2, self.block3)
        return [BNBeforeReLU(group.layer[0].bn1) for group in groups] + [BNBeforeReLU(self.bn1)]


def _register(depth, widen):
    name = f"wrn_{depth}_{widen}"

    def build(num_classes=100):
        return WideResNet(depth, widen, num_classes)

    build.__name__ = name
    build.__doc__ = f"{name}: Wide ResNet, depth {depth}, widen factor {widen}."
    CIFAR_MODELS.register(name, build)


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register(_depth, _widen)
