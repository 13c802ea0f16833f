"""ShuffleNet V1 (Zhang et al. 2018) for 32x32 images, parameter names as in
mdistiller: 3 groups, stage widths 240/480/960 with 4/8/4 units, a 1x1 stem.

``feats`` for a 32x32 input, all post-ReLU:
    0: stem conv1x1-BN-ReLU, 24 x 32 x 32
    1: layer1, 240 x 16 x 16;  2: layer2, 480 x 8 x 8;  3: layer3, 960 x 4 x 4
``preact_feats`` are the same maps before the ReLU: the stem's BN output, then
the last unit's sum (or concatenation) before its ReLU. ``bn_before_relu()``
gives the stem's ``bn1`` and each stage's last ``bn3`` (mdistiller has none
for ShuffleNets). Initialisation is PyTorch's default, as in mdistiller.
"""
import torch
from torch import nn
import torch.nn.functional as F

from ...registry import CIFAR_MODELS
from ..common import BNBeforeReLU, channel_shuffle, feature_dict, global_pool


class ShuffleUnit(nn.Module):
    """Grouped 1x1, channel shuffle, depthwise 3x3, grouped 1x1.

    Stride 1 adds the input; stride 2 concatenates a 3x3 average-pooled input,
    so such a unit produces only ``stage width - input width`` channels itself.
    The first convolution of the network's first unit is not grouped (24 input
    channels). The last unit of a stage (``returns_preact``) returns
    ``(output, pre-activation)``.
    """

    def __init__(self, in_channels, out_channels, stride, groups, returns_preact=False):
        super().__init__()
        self.stride = stride
        self.returns_preact = returns_preact
        middle = out_channels // 4
        self.first_groups = 1 if in_channels == 24 else groups
        self.conv1 = nn.Conv2d(in_channels, middle, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(middle)
        self.conv2 = nn.Conv2d(middle, middle, 3, stride, 1, groups=middle, bias=False)
        self.bn2 = nn.BatchNorm2d(middle)
        self.conv3 = nn.Conv2d(middle, out_channels, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            out = torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1)
        else:
            out += x
        if self.returns_preact:
            return F.relu(out), out
        return F.relu(out, inplace=True)


class ShuffleNetV1(nn.Module):
    """Args:
        widths: the three stage widths.
        counts: units per stage.
        groups: groups of the 1x1 convolutions.
        num_classes: classifier outputs.
    """

    #: ``feats[0]`` is the stem's map (see :mod:`mdistill.models.stages`).
    stem_map = True

    def __init__(self, widths=(240, 480, 960), counts=(4, 8, 4), groups=3, num_classes=100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_channels = 24
        for index, (width, count) in enumerate(zip(widths, counts), start=1):
            units = [ShuffleUnit(in_channels, width - in_channels, 2, groups, count == 1)]
            units += [ShuffleUnit(width, width, 1, groups, position == count - 1)
                      for position in range(1, count)]
            setattr(self, f"layer{index}", nn.Sequential(*units))
            in_channels = width
        self.linear = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        pre0 = self.bn1(self.conv1(x))
        stem = F.relu(pre0)
        out1, pre1 = self.layer1(stem)
        out2, pre2 = self.layer2(out1)
        out3, pre3 = self.layer3(out2)
        pooled = global_pool(out3)
        return self.linear(pooled), feature_dict([stem, out1, out2, out3],
                                                 [pre0, pre1, pre2, pre3], pooled)

    def bn_before_relu(self):
        """One :class:`BNBeforeReLU` per map of ``preact_feats``. A stage whose last
        unit downsamples gets only its first channels from ``bn3``; the rest are
        the pooled, already non-negative input."""
        records = [BNBeforeReLU(self.bn1)]
        for stage in (self.layer1, self.layer2, self.layer3):
            bn = stage[-1].bn3
            records.append(BNBeforeReLU(bn, slice(None) if stage[-1].stride == 1
                                        else slice(0, bn.num_features)))
        return records


@CIFAR_MODELS.register("ShuffleV1")
def shufflenet_v1(num_classes=100):
    """ShuffleNet V1, 3 groups, widths 240/480/960, 4/8/4 units."""
    return ShuffleNetV1(num_classes=num_classes)
