"""ImageNet ResNets built from torchvision's modules, so their parameter names
are torchvision's and its pretrained weights load as they are.

``feats`` for a 224x224 input (``e`` = 1 for ResNet18/34, 4 for ResNet50/101),
placed as in mdistiller's ImageNet ResNet, all post-ReLU:
    0: stem conv7x7-BN-ReLU before the max-pool, 64 x 112 x 112
    1: layer1, 64e x 56 x 56;   2: layer2, 128e x 28 x 28
    3: layer3, 256e x 14 x 14;  4: layer4, 512e x 7 x 7
``preact_feats`` are the same maps before the ReLU (the stem's BN output, as in
mdistiller, then each stage's last residual sum); ``bn_before_relu()`` gives
the stem's ``bn1`` and each stage's last ``bn2`` (``bn3`` in bottlenecks).
"""
import torch.nn.functional as F
from torchvision import models
from torchvision.models import resnet as tv_resnet

from ...registry import IMAGENET_MODELS
from ..common import BNBeforeReLU, feature_dict


def _finish(out, returns_preact):
    if returns_preact:
        return F.relu(out), out
    return F.relu(out, inplace=True)


class BasicBlock(tv_resnet.BasicBlock):
    """torchvision's block; the last one of a stage also returns its pre-activation."""

    returns_preact = False

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        return _finish(out, self.returns_preact)


class Bottleneck(tv_resnet.Bottleneck):
    """torchvision's block; the last one of a stage also returns its pre-activation."""

    returns_preact = False

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += x if self.downsample is None else self.downsample(x)
        return _finish(out, self.returns_preact)


class ResNet(models.ResNet):
    """torchvision's ResNet whose ``forward`` returns ``(logits, feats)``."""

    #: ``feats[0]`` is the stem's map, before the max-pool (see :mod:`mdistill.models.stages`).
    stem_map = True

    def __init__(self, block, counts, num_classes=1000):
        super().__init__(block, list(counts), num_classes=num_classes)
        for stage in self.stages():
            stage[-1].returns_preact = True

    def stages(self):
        return self.layer1, self.layer2, self.layer3, self.layer4

    def forward(self, x):
        stem_preact = self.bn1(self.conv1(x))
        stem = F.relu(stem_preact)
        out = self.maxpool(stem)
        feats, preacts = [stem], [stem_preact]
        for stage in self.stages():
            out, preact = stage(out)
            feats.append(out)
            preacts.append(preact)
        pooled = self.avgpool(out).flatten(1)
        return self.fc(pooled), feature_dict(feats, preacts, pooled)

    def bn_before_relu(self):
        """One :class:`BNBeforeReLU` per map of ``preact_feats``."""
        last = "bn3" if isinstance(self.layer1[0], Bottleneck) else "bn2"
        return [BNBeforeReLU(self.bn1)] + [BNBeforeReLU(getattr(stage[-1], last))
                                           for stage in self.stages()]


# name -> (block, blocks per stage, torchvision weights enum)
ARCHITECTURES = {
    "ResNet18": (BasicBlock, (2, 2, 2, 2), models.ResNet18_Weights),
    "ResNet34": (BasicBlock, (3, 4, 6, 3), models.ResNet34_Weights),
    "ResNet50": (Bottleneck, (3, 4, 6, 3), models.ResNet50_Weights),
    "ResNet101": (Bottleneck, (3, 4, 23, 3), models.ResNet101_Weights),
}


def _register(name):
    block, counts, _ = ARCHITECTURES[name]

    def build(num_classes=1000):
        return ResNet(block, counts, num_classes)

    build.__name__ = name
    build.__doc__ = f"{name} for 224x224 images with torchvision's parameter names."
    IMAGENET_MODELS.register(name, build)


for _name in ARCHITECTURES:
    _register(_name)


def torchvision_weights(name):
    """torchvision's ImageNet weights for the ImageNet model ``name``.

    Returns the ``IMAGENET1K_V1`` entry (the weights mdistiller's ImageNet
    teachers use; call ``.get_state_dict(progress=True)`` to download them),
    or None for a model torchvision has no weights for (MobileNetV1).
    """
    if name not in ARCHITECTURES:
        return None
    return ARCHITECTURES[name][2].IMAGENET1K_V1
