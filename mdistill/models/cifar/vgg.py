"""VGG with batch norm for 32x32 images, parameter names as in mdistiller
(``vgg8`` ... ``vgg19`` are its ``vgg*_bn``).

Each of the five blocks is a Sequential of (conv3x3 with bias, BN, ReLU) with
the block's last ReLU left out, so ``block<i>.<j>`` keys match and the forward
keeps the pre-activation. Max-pooling follows blocks 0-2 (and 3 on 64x64 inputs).

``feats`` for a 32x32 input, all post-ReLU:
    0: block0, 64 x 32 x 32;   1: block1, 128 x 16 x 16;  2: block2, 256 x 8 x 8
    3: block3, 512 x 4 x 4;    4: block4, 512 x 4 x 4
``preact_feats`` are the same maps before the ReLU; ``bn_before_relu()`` gives
each block's last BN.
"""
from torch import nn
import torch.nn.functional as F

from ...registry import CIFAR_MODELS
from ..common import BNBeforeReLU, feature_dict, global_pool, init_conv_bn, init_linear

# Convolution widths of the five blocks.
LAYOUTS = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


def _block(in_channels, widths):
    layers = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width),
                   nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """Args:
        layout: the convolution widths of each of the five blocks.
        num_classes: classifier outputs.
    """

    #: ``feats[0]``, block0 at full resolution before the first pooling, plays the
    #: stem's part (as in mdistiller, whose stage methods leave it out; see
    #: :mod:`mdistill.models.stages`).
    stem_map = True

    def __init__(self, layout, num_classes=100):
        super().__init__()
        in_channels = 3
        for index, widths in enumerate(layout):
            setattr(self, f"block{index}", _block(in_channels, widths))
            in_channels = widths[-1]
        self.classifier = nn.Linear(in_channels, num_classes)
        init_conv_bn(self)
        init_linear(self, std=0.01)

    def blocks(self):
        return self.block0, self.block1, self.block2, self.block3, self.block4

    def forward(self, x):
        pool_block3 = x.shape[2] == 64
        feats, preacts = [], []
        out = x
        for index, block in enumerate(self.blocks()):
            preact = block(out)
            out = F.relu(preact)
            feats.append(out)
            preacts.append(preact)
            if index < 3 or (index == 3 and pool_block3):
                out = F.max_pool2d(out, 2)
        pooled = global_pool(out)
        return self.classifier(pooled), feature_dict(feats, preacts, pooled)

    def bn_before_relu(self):
        """One :class:`BNBeforeReLU` per map of ``preact_feats``."""
        return [BNBeforeReLU(block[-1]) for block in self.blocks()]


def _register(name):
    def build(num_classes=100):
        return VGG(LAYOUTS[name], num_classes)

    build.__name__ = name
    build.__doc__ = f"{name} with batch norm, for 32x32 images."
    CIFAR_MODELS.register(name, build)


for _name in LAYOUTS:
    _register(_name)
