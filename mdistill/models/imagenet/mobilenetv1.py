"""MobileNetV1 (Howard et al. 2017) for ImageNet, parameter names as in
mdistiller: ``model`` is a Sequential of a conv-BN stem and 13 depthwise-
separable units (``model.<i>.0/1`` and ``.3/.4``), then ``fc``.

As in mdistiller, ``feats`` has no stem map: for a 224x224 input it holds the
post-ReLU outputs of units 3, 5, 11 and 13:
    0: 128 x 56 x 56;  1: 256 x 28 x 28;  2: 512 x 14 x 14;  3: 1024 x 7 x 7
and ``preact_feats`` the same outputs before that ReLU; ``bn_before_relu()``
gives those units' last BN. Initialisation is PyTorch's default, as in mdistiller.
"""
from torch import nn
import torch.nn.functional as F

from ...registry import IMAGENET_MODELS
from ..common import BNBeforeReLU, feature_dict, global_pool

# (output width, stride) of the depthwise-separable units after the stem.
UNITS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1),
         (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))
# Positions in ``model`` whose outputs are the features.
FEATURE_UNITS = frozenset((3, 5, 11, 13))


def _separable(in_channels, out_channels, stride):
    # The unit's final ReLU is applied in forward (and left out here) so the
    # pre-activation can be kept; ReLU has no parameters, so keys are unchanged.
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False),
        nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, out_channels, 1, 1, 0, bias=False), nn.BatchNorm2d(out_channels))


class MobileNetV1(nn.Module):
    """Args:
        num_classes: classifier outputs.
    """

    #: ``feats`` has no stem map: ``feats[0]`` is already a stage at stride 4
    #: (see :mod:`mdistill.models.stages`).
    stem_map = False

    def __init__(self, num_classes=1000):
        super().__init__()
        units, width = [nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False),
                                      nn.BatchNorm2d(32))], 32
        for out, stride in UNITS:
            units.append(_separable(width, out, stride))
            width = out
        self.model = nn.Sequential(*units)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        feats, preacts = [], []
        out = x
        for index, unit in enumerate(self.model):
            out = unit(out)
            if index in FEATURE_UNITS:
                preacts.append(out)
                out = F.relu(out)
                feats.append(out)
            else:
                out = F.relu(out, inplace=True)
        pooled = global_pool(out)
        return self.fc(pooled), feature_dict(feats, preacts, pooled)

    def bn_before_relu(self):
        """One :class:`BNBeforeReLU` per map of ``preact_feats``."""
        return [BNBeforeReLU(self.model[index][-1]) for index in sorted(FEATURE_UNITS)]


@IMAGENET_MODELS.register("MobileNetV1")
def mobilenet_v1(num_classes=1000):
    """MobileNetV1 (width 1.0) for 224x224 images."""
    return MobileNetV1(num_classes)
