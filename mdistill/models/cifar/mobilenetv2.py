"""MobileNetV2 for 32x32 images (mdistiller's ``mobile_half``: expansion 6,
width 0.5), with mdistiller's parameter names."""
import math

from torch import nn
import torch.nn.functional as F

from ...registry import CIFAR_MODELS

# (expansion, output width, blocks, first stride) per stage; "T" stands for the expansion.
STAGES = ((1, 16, 1, 1), ("T", 24, 2, 1), ("T", 32, 3, 2), ("T", 64, 4, 2), ("T", 96, 3, 1),
          ("T", 160, 3, 2), ("T", 320, 1, 1))


def conv_bn_relu(in_channels, out_channels, kernel, stride):
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2,
                                   bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, 1x1 linear projection; residual when shapes match."""

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
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2; ``feats`` are the stem and the outputs of stages 1, 2, 4, 6
    (linear bottlenecks, so they equal the pre-activations)."""

    def __init__(self, expansion=6, width=0.5, num_classes=100):
        super().__init__()
        channels = int(32 * width)
        self.conv1 = conv_bn_relu(3, channels, 3, 2)
        blocks = []
        for factor, out, count, stride in STAGES:
            factor = expansion if factor == "T" else factor
            out = int(out * width)
            layers = []
            for index in range(count):
                layers.append(InvertedResidual(channels, out, stride if index == 0 else 1, factor))
                channels = out
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        last = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = conv_bn_relu(channels, last, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        out = self.conv1(x)
        feats = [out]
        for index, block in enumerate(self.blocks):
            out = block(out)
            if index in (1, 2, 4, 6):
                feats.append(out)
        pooled = F.adaptive_avg_pool2d(self.conv2(out), 1).flatten(1)
        return self.classifier(pooled), {"feats": feats, "preact_feats": list(feats),
                                         "pooled_feat": pooled}


@CIFAR_MODELS.register("MobileNetV2")
def mobilenet_v2_half(num_classes=100):
    """MobileNetV2 with expansion 6 and width 0.5 (mdistiller's mobile_half)."""
    return MobileNetV2(6, 0.5, num_classes)
