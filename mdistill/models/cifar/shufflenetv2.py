"""ShuffleNet V2 1.0x (Ma et al. 2018) for 32x32 images, parameter names as in
mdistiller: a 1x1 stem, stages of widths 116/232/464 (one downsampling unit,
then 3/7/3 units), a 1x1 head conv to 1024.

``feats`` for a 32x32 input, all post-ReLU:
    0: stem conv1x1-BN-ReLU, 24 x 32 x 32
    1: layer1, 116 x 16 x 16;  2: layer2, 232 x 8 x 8;  3: layer3, 464 x 4 x 4
``preact_feats`` are the same maps before the ReLU: the stem's BN output, then
the last unit's kept half and branch before its ReLU, shuffled as the output
is, so ``relu(preact) == feat`` (mdistiller returns them unshuffled, in another
channel order). ``bn_before_relu()`` gives the stem's ``bn1`` and each stage's
last ``bn3``, which feeds the odd channels; the even ones are the kept half,
already non-negative. ``pooled_feat`` is the pooled head output (1024).
Initialisation is PyTorch's default, as in mdistiller.
"""
from torch import nn
import torch.nn.functional as F

from ...registry import CIFAR_MODELS
from ..common import BNBeforeReLU, feature_dict, global_pool, interleave


class ShuffleUnit(nn.Module):
    """Split the channels in half; 1x1, depthwise 3x3, 1x1 on the second half;
    concatenate it after the untouched first half and shuffle the two.

    Made with ``returns_preact`` it returns ``(output, pre-activation)``.
    """

    def __init__(self, channels, returns_preact=False):
        super().__init__()
        self.returns_preact = returns_preact
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x):
        kept, changed = x.chunk(2, dim=1)
        out = F.relu(self.bn1(self.conv1(changed)), inplace=True)
        out = self.bn2(self.conv2(out))
        branch = self.bn3(self.conv3(out))
        if self.returns_preact:
            return interleave(kept, F.relu(branch)), interleave(kept, branch)
        return interleave(kept, F.relu(branch, inplace=True))


class DownUnit(nn.Module):
    """Two branches that both halve the resolution (depthwise 3x3, stride 2) and
    each produce half the output channels; concatenated and shuffled."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        half = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, half, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(in_channels, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.conv4 = nn.Conv2d(half, half, 3, 2, 1, groups=half, bias=False)
        self.bn4 = nn.BatchNorm2d(half)
        self.conv5 = nn.Conv2d(half, half, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(half)

    def forward(self, x):
        left = self.bn1(self.conv1(x))
        left = F.relu(self.bn2(self.conv2(left)), inplace=True)
        right = F.relu(self.bn3(self.conv3(x)), inplace=True)
        right = self.bn4(self.conv4(right))
        right = F.relu(self.bn5(self.conv5(right)), inplace=True)
        return interleave(left, right)


class ShuffleNetV2(nn.Module):
    """Args:
        widths: the three stage widths, then the head width.
        counts: units per stage after its downsampling unit.
        num_classes: classifier outputs.
    """

    #: ``feats[0]`` is the stem's map (see :mod:`mdistill.models.stages`).
    stem_map = True

    def __init__(self, widths=(116, 232, 464, 1024), counts=(3, 7, 3), num_classes=100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_channels = 24
        for index, (width, count) in enumerate(zip(widths, counts), start=1):
            units = [DownUnit(in_channels, width)]
            units += [ShuffleUnit(width, position == count - 1) for position in range(count)]
            setattr(self, f"layer{index}", nn.Sequential(*units))
            in_channels = width
        self.conv2 = nn.Conv2d(in_channels, widths[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.linear = nn.Linear(widths[3], num_classes)

    def forward(self, x):
        pre0 = self.bn1(self.conv1(x))
        stem = F.relu(pre0)
        out1, pre1 = self.layer1(stem)
        out2, pre2 = self.layer2(out1)
        out3, pre3 = self.layer3(out2)
        pooled = global_pool(F.relu(self.bn2(self.conv2(out3)), inplace=True))
        return self.linear(pooled), feature_dict([stem, out1, out2, out3],
                                                 [pre0, pre1, pre2, pre3], pooled)

    def bn_before_relu(self):
        """One :class:`BNBeforeReLU` per map of ``preact_feats``; a stage's ``bn3``
        feeds its odd channels (``interleave`` puts the branch there)."""
        return [BNBeforeReLU(self.bn1)] + [BNBeforeReLU(stage[-1].bn3, slice(1, None, 2))
                                           for stage in (self.layer1, self.layer2, self.layer3)]


@CIFAR_MODELS.register("ShuffleV2")
def shufflenet_v2(num_classes=100):
    """ShuffleNet V2 1.0x: widths 116/232/464, 3/7/3 units, a 1024-wide head."""
    return ShuffleNetV2(num_classes=num_classes)
