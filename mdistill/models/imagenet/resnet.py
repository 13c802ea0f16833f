"""ImageNet ResNets: torchvision's modules and parameter names (so its
pretrained weights load), with a forward that also returns the features."""
import torch.nn.functional as F
from torchvision import models
from torchvision.models.resnet import BasicBlock, Bottleneck

from ...registry import IMAGENET_MODELS

# name -> (block, blocks per stage, torchvision weights enum name)
ARCHITECTURES = {
    "ResNet18": (BasicBlock, (2, 2, 2, 2), "ResNet18_Weights"),
    "ResNet34": (BasicBlock, (3, 4, 6, 3), "ResNet34_Weights"),
    "ResNet50": (Bottleneck, (3, 4, 6, 3), "ResNet50_Weights"),
    "ResNet101": (Bottleneck, (3, 4, 23, 3), "ResNet101_Weights"),
}


class ImageNetResNet(models.ResNet):
    """torchvision's ResNet; ``forward`` returns ``(logits, feats)``.

    ``preact_feats`` are each stage's last residual sum before its ReLU,
    caught by running the stage's last block by hand.
    """

    def _stage(self, stage, x):
        for block in list(stage)[:-1]:
            x = block(x)
        last = stage[-1]
        identity = x if last.downsample is None else last.downsample(x)
        out = last.relu(last.bn1(last.conv1(x)))
        if isinstance(last, Bottleneck):
            out = last.relu(last.bn2(last.conv2(out)))
            preact = last.bn3(last.conv3(out)) + identity
        else:
            preact = last.bn2(last.conv2(out)) + identity
        return F.relu(preact), preact

    def forward(self, x):
        stem = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats, preacts = [stem], [stem]
        out = stem
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            out, preact = self._stage(stage, out)
            feats.append(out)
            preacts.append(preact)
        pooled = self.avgpool(out).flatten(1)
        return self.fc(pooled), {"feats": feats, "preact_feats": preacts, "pooled_feat": pooled}


def _register(name):
    block, layers, _ = ARCHITECTURES[name]

    def build(num_classes=1000):
        return ImageNetResNet(block, list(layers), num_classes=num_classes)
    build.__name__ = name
    build.__doc__ = f"{name} for 224x224 images, torchvision's parameter names."
    IMAGENET_MODELS.register(name, build)


for _name in ARCHITECTURES:
    _register(_name)


def torchvision_weights(name):
    """torchvision's ImageNet weights for model ``name`` (IMAGENET1K_V1), or None."""
    if name not in ARCHITECTURES:
        return None
    return getattr(models, ARCHITECTURES[name][2]).IMAGENET1K_V1
