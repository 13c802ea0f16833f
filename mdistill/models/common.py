"""Small pieces the model families share: weight initialisation, pooling,
channel shuffling, the feature dict every ``forward`` returns and the record
of the BatchNorm before each pre-activation."""
from typing import NamedTuple

import torch
from torch import nn
import torch.nn.functional as F


def init_conv_bn(model):
    """He-normal convolutions (fan-out, as mdistiller) and BN scale 1, shift 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def init_linear(model, std=None):
    """Zero the classifier biases; also draw the weights from N(0, std) when given."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            if std is not None:
                nn.init.normal_(module.weight, 0.0, std)
            nn.init.zeros_(module.bias)


def global_pool(x):
    """[N, C, H, W] -> [N, C], the spatial mean (any memory format)."""
    return F.adaptive_avg_pool2d(x, 1).flatten(1)


def _channels_innermost(x):
    # True for channels_last tensors and for channel slices of them (ShuffleNet V2's
    # kept half), which are not contiguous in any format. For 1x1 maps both paths agree.
    return x.stride(1) == 1 and x.shape[2] * x.shape[3] > 1


def channel_shuffle(x, groups):
    """Interleave the channels of ``groups`` equal groups (ShuffleNet).

    Channel ``g * (C // groups) + i`` moves to ``i * groups + g``. The result keeps
    the input's memory format, so a channels_last network stays channels_last.
    """
    if groups == 1:
        return x
    batch, channels, height, width = x.shape
    if _channels_innermost(x):
        nhwc = x.permute(0, 2, 3, 1)
        shuffled = nhwc.reshape(batch, height, width, groups, channels // groups).transpose(3, 4)
        return shuffled.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
    return (x.reshape(batch, groups, channels // groups, height, width).transpose(1, 2)
            .reshape(batch, channels, height, width))


def interleave(first, second):
    """``channel_shuffle(torch.cat([first, second], 1), 2)`` in one copy instead of two."""
    batch, half, height, width = first.shape
    if _channels_innermost(first):
        merged = torch.stack([first.permute(0, 2, 3, 1), second.permute(0, 2, 3, 1)], dim=4)
        return merged.reshape(batch, height, width, 2 * half).permute(0, 3, 1, 2)
    return torch.stack([first, second], dim=2).reshape(batch, 2 * half, height, width)


def feature_dict(feats, preact_feats, pooled_feat):
    """The second value of every model's ``forward``.

    Args:
        feats: feature maps, the stem first, then one per stage.
        preact_feats: the same positions before the stage's last ReLU.
        pooled_feat: the [N, C] vector the classifier reads.
    """
    return {"feats": feats, "preact_feats": preact_feats, "pooled_feat": pooled_feat}


class BNBeforeReLU(NamedTuple):
    """The BatchNorm whose output makes (some channels of) a pre-activation map.

    Every model's ``bn_before_relu()`` returns one per map of ``preact_feats``
    (mdistiller's ``get_bn_before_relu`` lists the modules only, for the stages
    its OFD can use). In a residual block the map is this BN's output plus the
    shortcut; elsewhere it is the BN's output itself.

    Args:
        bn: the ``nn.BatchNorm2d``.
        channels: the positions its outputs take in the map (all of them, in
            order, by default). The map's other channels come from an earlier
            ReLU unchanged (ShuffleNet V2's kept half), so they are never negative.
    """
    bn: nn.BatchNorm2d
    channels: slice = slice(None)
