"""Random images and labels of any size: smoke tests and benchmarks."""
import torch

from ..errors import UserError
from ..registry import DATASETS
from .base import DatasetSplits, ImageTensorDataset, check_positive, mix_seed

# Statistics of uniform 0..255 pixels, in [0, 1] units: mean 0.5, std 1/sqrt(12).
MEAN = (0.5, 0.5, 0.5)
STD = (0.2887, 0.2887, 0.2887)


@DATASETS.register("synthetic")
def build_synthetic(root=None, download=False, num_train=1024, num_test=256, num_classes=100,
                    image_size=32, seed=0):
    """Uniformly random uint8 images with uniformly random labels.

    The same options give the same data every time (``seed`` is the
    dataset's, not the run's). ``root`` and ``download`` are ignored.

    Args:
        num_train, num_test: split sizes.
        num_classes: labels are drawn from ``0..num_classes - 1``.
        image_size: images are ``[3, image_size, image_size]``.
        seed: the data's seed.
    """
    check_positive("DATASET.SYNTHETIC.NUM_TRAIN", num_train)
    check_positive("DATASET.SYNTHETIC.NUM_TEST", num_test)
    check_positive("DATASET.SYNTHETIC.NUM_CLASSES", num_classes)
    check_positive("DATASET.SYNTHETIC.IMAGE_SIZE", image_size)
    if num_classes < 2:
        raise UserError(f"DATASET.SYNTHETIC.NUM_CLASSES must be at least 2, got {num_classes}")
    splits = []
    for part, size in enumerate((num_train, num_test)):
        generator = torch.Generator().manual_seed(mix_seed(seed, part))
        images = torch.randint(0, 256, (size, 3, image_size, image_size), generator=generator,
                               dtype=torch.uint8)
        labels = torch.randint(0, num_classes, (size,), generator=generator)
        splits.append(ImageTensorDataset(images, labels))
    train, test = splits
    return DatasetSplits(train=train, test=test, num_classes=num_classes,
                         train_targets=train.targets, mean=MEAN, std=STD, image_size=image_size)
