"""MobileNetV2 (Sandler et al. 2018) for 32x32 images; ``MobileNetV2`` is
mdistiller's ``mobile_half`` (expansion 6, width 0.5), with its parameter names.

``feats`` for a 32x32 input (the stem has stride 2):
    0: stem conv-BN-ReLU, 16 x 16 x 16
    1: blocks[1], 12 x 16 x 16;  2: blocks[2], 16 x 8 x 8
    3: blocks[4], 48 x 4 x 4;    4: blocks[6], 160 x 2 x 2
Maps 1-4 are linear-bottleneck outputs with no ReLU after them, so
``preact_feats`` holds the same tensors there (and the stem's BN output first).
``bn_before_relu()`` gives the stem's BN, then the projection BN of each
feature stage's last block (as mdistiller's ``get_bn_before_relu``).
``pooled_feat`` is the pooled output of the 1x1 head conv (1280 wide).
"""
from torch import nn
import torch.nn.functional as F

from ...registry import CIFAR_MODELS
from ..common import BNBeforeReLU, feature_dict, global_pool, init_conv_bn, init_linear

# (expansion or None for the model's, base width, blocks, first stride) per stage.
STAGES = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
          (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1))
# Stages whose outputs are the features (after the stem).
FEATURE_STAGES = (1, 2, 4, 6)


def conv_bn_relu(in_channels, out_channels, kernel, stride):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expansion, depthwise 3x3, linear 1x1 projection; a residual when the
    shape is kept."""

    def __init__(self, in_channels, out_channels, stride, expansion):
        super().__init__()
        hidden = in_channels * expansion
        self.residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, 1, 0, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = self.conv(x)
        if self.residual:
            out += x
        return out


class MobileNetV2(nn.Module):
    """Args:
        expansion: the inverted residuals' expansion factor T.
        width: the width multiplier.
        num_classes: classifier outputs.
    """

    #: ``feats[0]`` is the stem's map (see :mod:`mdistill.models.stages`).
    stem_map = True

    def __init__(self, expansion=6, width=0.5, num_classes=100):
        super().__init__()
        channels = int(32 * width)
        self.conv1 = conv_bn_relu(3, channels, 3, 2)
        self.blocks = nn.ModuleList()
        for factor, base, count, stride in STAGES:
            out = int(base * width)
            units = []
            for index in range(count):
                units.append(InvertedResidual(channels, out, stride if index == 0 else 1,
                                              factor or expansion))
                channels = out
            self.blocks.append(nn.Sequential(*units))
        head = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = conv_bn_relu(channels, head, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(head, num_classes))
        init_conv_bn(self)
        init_linear(self, std=0.01)

    def forward(self, x):
        stem_preact = self.conv1[1](self.conv1[0](x))
        out = F.relu(stem_preact)
        feats = [out]
        for index, stage in enumerate(self.blocks):
            out = stage(out)
            if index in FEATURE_STAGES:
                feats.append(out)
        pooled = global_pool(self.conv2(out))
        return self.classifier(pooled), feature_dict(feats, [stem_preact] + feats[1:], pooled)

    def bn_before_relu(self):
        """One :class:`BNBeforeReLU` per map of ``preact_feats``."""
        return [BNBeforeReLU(self.conv1[1])] + [BNBeforeReLU(self.blocks[index][-1].conv[-1])
                                                for index in FEATURE_STAGES]


@CIFAR_MODELS.register("MobileNetV2")
def mobilenet_v2_half(num_classes=100):
    """MobileNetV2, expansion 6, width 0.5 (mdistiller's ``mobile_half``)."""
    return MobileNetV2(6, 0.5, num_classes)
