"""VGG with batch norm for 32x32 images, mdistiller's parameter names.

Five blocks of 3x3 convolutions (with bias) + BN + ReLU; the last ReLU of a
block is applied in ``forward`` so the pre-activation can be returned.
"""
from torch import nn
import torch.nn.functional as F

from ...registry import CIFAR_MODELS

# Output widths of the convolutions in each of the five blocks.
VGG_BLOCKS = {
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
    """VGG-BN; max-pooling between blocks 0-3 (and before block 4 on 64x64 inputs).

    Args:
        blocks: widths of each block's convolutions.
        num_classes: classifier outputs.
    """

    def __init__(self, blocks, num_classes=100):
        super().__init__()
        in_channels = 3
        for index, widths in enumerate(blocks):
            setattr(self, f"block{index}", _block(in_channels, widths))
            in_channels = widths[-1]
        self.classifier = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        large = x.shape[2] == 64
        stem = F.relu(self.block0(x))
        feats, preacts = [stem], [stem]
        x = F.max_pool2d(stem, 2)
        for index in range(1, 5):
            preact = getattr(self, f"block{index}")(x)
            x = F.relu(preact)
            feats.append(x)
            preacts.append(preact)
            if index < 3 or (index == 3 and large):
                x = F.max_pool2d(x, 2)
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(pooled), {"feats": feats, "preact_feats": preacts,
                                         "pooled_feat": pooled}


def _register(name):
    def build(num_classes=100):
        return VGG(VGG_BLOCKS[name], num_classes)
    build.__name__ = name
    build.__doc__ = f"{name} with batch norm for 32x32 images."
    CIFAR_MODELS.register(name, build)


for _name in VGG_BLOCKS:
    _register(_name)
