"""Whole-dataset operations on uint8 image tensors: channels, size, statistics.

The in-memory datasets (torchvision's small sets, small image folders) are
brought to one shape, uint8 ``[N, 3, S, S]``, once when they are loaded, so
the device loader can augment them in batches without per-sample work.
"""
import torch
import torch.nn.functional as F

#: Images resized or measured per chunk, so a 60,000-image set never needs a
#: float copy of itself.
CHUNK = 4096


def to_rgb(images):
    """uint8 ``[N, H, W]``, ``[N, 1, H, W]`` or ``[N, 3, H, W]`` -> ``[N, 3, H, W]``.

    Grey images repeat their one channel three times, so every model of the
    zoo (all built for RGB) takes them unchanged.
    """
    images = torch.as_tensor(images)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, H, W] or [N, 1|3, H, W], got {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.contiguous()


def fit_size(images, size=0, pad_to=32):
    """Bring square uint8 images ``[N, 3, H, H]`` to ``size`` x ``size``.

    Images up to 4 pixels smaller than ``pad_to`` (MNIST's 28 px for a 32 px
    network) are zero-padded around, as LeNet's inputs were: the digit keeps
    its pixels and the border is background. Any other change of size is a
    bilinear, anti-aliased resize.

    Args:
        images: uint8 ``[N, 3, H, H]``.
        size: the side wanted; 0 keeps the images' own size (after the padding).
        pad_to: the side that slightly smaller images are padded to.

    Returns:
        uint8 ``[N, 3, size, size]``.
    """
    side = images.shape[2]
    if images.shape[3] != side:
        raise ValueError(f"expected square images, got {tuple(images.shape[2:])}")
    if pad_to - 4 <= side < pad_to and size in (0, pad_to):
        before = (pad_to - side) // 2
        after = pad_to - side - before
        return F.pad(images, (before, after, before, after))
    size = size or side
    if size == side:
        return images
    parts = []
    for start in range(0, images.shape[0], CHUNK):
        chunk = images[start:start + CHUNK].float()
        resized = F.interpolate(chunk, size=(size, size), mode="bilinear",
                                align_corners=False, antialias=True)
        parts.append(resized.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(parts) if parts else images.new_zeros((0, 3, size, size))


def channel_statistics(images):
    """Per-channel mean and standard deviation of uint8 ``[N, 3, H, W]`` images.

    Computed in float64 chunk by chunk, in ``[0, 1]`` pixel units and rounded
    to 4 digits, so the same images give the same numbers on every machine.

    Returns:
        ``(mean, std)``, two 3-tuples of floats.
    """
    count = images.shape[0] * images.shape[2] * images.shape[3]
    if count == 0:
        raise ValueError("cannot compute the statistics of an empty image set")
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    for start in range(0, images.shape[0], CHUNK):
        chunk = images[start:start + CHUNK].double().div_(255.0)
        total += chunk.sum(dim=(0, 2, 3))
        squares += chunk.pow_(2).sum(dim=(0, 2, 3))
    mean = total / count
    variance = (squares / count - mean.pow(2)).clamp_min(0)
    std = variance.sqrt().clamp_min(1e-4)   # a constant channel must still divide
    return (tuple(round(float(value), 4) for value in mean),
            tuple(round(float(value), 4) for value in std))
