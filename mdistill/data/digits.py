"""scikit-learn's handwritten digits: 1,797 real 8x8 images, bundled (no download).

Small enough to train a real model to a meaningful accuracy on a laptop CPU
in minutes, which CIFAR-100 is not.
"""
import torch
import torch.nn.functional as F

from ..registry import DATASETS
from .base import DatasetSplits, ImageTensorDataset

IMAGE_SIZE = 32
TEST_FRACTION = 0.25
SPLIT_SEED = 0


@DATASETS.register("digits")
def build_digits(root=None, download=False):
    """The digits upsampled to 32x32x3 uint8, split 75/25 (stratified).

    The split is fixed (seed 0), independent of the training seed, so every
    run is evaluated on the same test images. ``root`` and ``download`` are
    accepted for a uniform interface and ignored.

    Returns:
        :class:`DatasetSplits` of two :class:`ImageTensorDataset`; ``mean`` and
        ``std`` are the train split's pixel statistics.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # 0..16 ink levels -> 0..255, then bilinear upsampling to the CIFAR input size.
    small = torch.from_numpy(digits.images).float().mul(255.0 / 16.0).unsqueeze(1)
    large = F.interpolate(small, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                          align_corners=False)
    images = large.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target).long()

    positions = torch.arange(len(labels)).numpy()
    train_positions, test_positions = train_test_split(
        positions, test_size=TEST_FRACTION, random_state=SPLIT_SEED,
        stratify=digits.target)
    train_index = torch.from_numpy(train_positions).sort().values
    test_index = torch.from_numpy(test_positions).sort().values
    train_images, train_labels = images[train_index], labels[train_index]
    test_images, test_labels = images[test_index], labels[test_index]

    # float64 reductions on the CPU: the same numbers on every machine and run.
    pixels = train_images.double().div(255.0)
    mean = tuple(round(float(value), 4) for value in pixels.mean(dim=(0, 2, 3)))
    std = tuple(round(float(value), 4) for value in pixels.std(dim=(0, 2, 3), unbiased=False))
    return DatasetSplits(
        train=ImageTensorDataset(train_images, train_labels),
        test=ImageTensorDataset(test_images, test_labels),
        num_classes=10, train_targets=train_labels, mean=mean, std=std,
        image_size=IMAGE_SIZE, class_names=tuple(str(name) for name in digits.target_names),
        hflip=False)
