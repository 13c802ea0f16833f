"""MobileNetV1 (Howard et al. 2017) for ImageNet, mdistiller's parameter names
(one ``model`` Sequential of conv-BN-ReLU units, then ``fc``)."""
from torch import nn
import torch.nn.functional as F

from ...registry import IMAGENET_MODELS

# (output width, stride) of each depthwise-separable unit after the stem.
UNITS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1),
         (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))
# Indexes in ``model`` whose outputs are the four stage features.
STAGE_ENDS = (3, 5, 11, 13)


def _standard(in_channels, out_channels, stride):
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def _separable(in_channels, out_channels, stride):
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False),
        nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, out_channels, 1, 1, 0, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class MobileNetV1(nn.Module):
    """MobileNetV1; ``feats`` are the outputs of units 3, 5, 11 and 13."""

    def __init__(self, num_classes=1000):
        super().__init__()
        units, width = [_standard(3, 32, 2)], 32
        for out, stride in UNITS:
            units.append(_separable(width, out, stride))
            width = out
        self.model = nn.Sequential(*units)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x):
        feats, preacts, start = [], [], 0
        for end in STAGE_ENDS:
            x = self.model[start:end](x)
            unit = self.model[end]
            preact = unit[:-1](x)          # the unit without its final ReLU
            x = F.relu(preact)
            feats.append(x)
            preacts.append(preact)
            start = end + 1
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(pooled), {"feats": feats, "preact_feats": preacts, "pooled_feat": pooled}


@IMAGENET_MODELS.register("MobileNetV1")
def mobilenet_v1(num_classes=1000):
    """MobileNetV1 for 224x224 images."""
    return MobileNetV1(num_classes)
