"""ShuffleNet V1 (Zhang et al. 2018) and V2 (Ma et al. 2018) for 32x32 images,
with mdistiller's parameter names."""
import torch
from torch import nn
import torch.nn.functional as F

from ...registry import CIFAR_MODELS


def channel_shuffle(x, groups):
    """[N, g*c, H, W] -> interleave the g groups' channels."""
    batch, channels, height, width = x.shape
    return (x.reshape(batch, groups, channels // groups, height, width).transpose(1, 2)
            .reshape(batch, channels, height, width))


class ShuffleUnitV1(nn.Module):
    """Grouped 1x1, shuffle, depthwise 3x3, grouped 1x1; add (stride 1) or
    concatenate an average-pooled shortcut (stride 2)."""

    def __init__(self, in_channels, out_channels, stride, groups):
        super().__init__()
        mid = out_channels // 4
        self.first_groups = 1 if in_channels == 24 else groups
        self.stride = stride
        self.conv1 = nn.Conv2d(in_channels, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_channels, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            preact = torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1)
        else:
            preact = out + x
        return F.relu(preact), preact


class ShuffleUnitV2(nn.Module):
    """Split the channels; transform one half (1x1, depthwise 3x3, 1x1); concat; shuffle."""

    def __init__(self, channels):
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x):
        kept, changed = x.chunk(2, dim=1)
        out = F.relu(self.bn1(self.conv1(changed)))
        out = self.bn2(self.conv2(out))
        branch = self.bn3(self.conv3(out))
        preact = torch.cat([kept, branch], 1)
        return channel_shuffle(torch.cat([kept, F.relu(branch)], 1), 2), preact


class DownUnitV2(nn.Module):
    """Both branches downsample (depthwise stride 2); concat; shuffle."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class Stage(nn.Sequential):
    """Units in sequence; returns the output and the last unit's pre-activation."""

    def forward(self, x):
        preact = None
        for unit in self:
            x = unit(x)
            if isinstance(x, tuple):
                x, preact = x
        return x, preact


class ShuffleNet(nn.Module):
    """Shared stem, three stages and head of both versions.

    Args:
        stages: the three Stage modules.
        head: optional final 1x1 conv width (V2), or None (V1).
        width: channels entering the head.
        num_classes: classifier outputs.
    """

    def __init__(self, stages, width, head=None, num_classes=100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.layer1, self.layer2, self.layer3 = stages
        if head is not None:
            self.conv2 = nn.Conv2d(width, head, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(head)
            width = head
        self.has_head = head is not None
        self.linear = nn.Linear(width, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        feats, preacts = [out], [out]
        for stage in (self.layer1, self.layer2, self.layer3):
            out, preact = stage(out)
            feats.append(out)
            preacts.append(preact)
        if self.has_head:
            out = F.relu(self.bn2(self.conv2(out)))
        pooled = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(pooled), {"feats": feats, "preact_feats": preacts,
                                     "pooled_feat": pooled}


@CIFAR_MODELS.register("ShuffleV1")
def shufflenet_v1(num_classes=100):
    """ShuffleNet V1, 3 groups, stage widths 240/480/960, 4/8/4 units."""
    stages, in_channels = [], 24
    for width, count in ((240, 4), (480, 8), (960, 4)):
        units = []
        for index in range(count):
            # The first unit concatenates its input: it produces only width - in_channels.
            units.append(ShuffleUnitV1(in_channels, width - (in_channels if index == 0 else 0),
                                       2 if index == 0 else 1, groups=3))
            in_channels = width
        stages.append(Stage(*units))
    return ShuffleNet(stages, 960, num_classes=num_classes)


@CIFAR_MODELS.register("ShuffleV2")
def shufflenet_v2(num_classes=100):
    """ShuffleNet V2 1.0x: stage widths 116/232/464, 3/7/3 units, a 1024-wide head."""
    stages, in_channels = [], 24
    for width, count in ((116, 3), (232, 7), (464, 3)):
        stages.append(Stage(DownUnitV2(in_channels, width),
                            *[ShuffleUnitV2(width) for _ in range(count)]))
        in_channels = width
    return ShuffleNet(stages, 464, head=1024, num_classes=num_classes)
