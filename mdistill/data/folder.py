"""Your own images: ``<root>/train/<class>/*`` and ``<root>/val/<class>/*``.

Read with torchvision's ImageFolder (any format PIL opens; classes are the
folder names, sorted). ``DATASET.IMAGE_SIZE`` picks the recipe:

* 32 px and below, CIFAR-style: every image is resized (shorter side) and
  centre-cropped once, and the whole split is held in memory as uint8, so
  the device loader pads, crops and flips batches on the device. A split
  too large for :data:`IN_MEMORY_BYTES` is read per sample instead.
* above 32 px, ImageNet-style: RandomResizedCrop and flip for training,
  resize and centre crop for evaluation, decoded by worker processes.

0 (the default) picks from the first training image: its own size when that
is at most 32 px, else 224.
"""
import os

import torch
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes

from ..errors import UserError
from ..registry import DATASETS
from .base import DatasetSplits, ImageTensorDataset
from .imageops import channel_statistics
from .imagenet import IndexedImageFolder, imagenet_transforms

#: Largest side handled CIFAR-style.
SMALL_IMAGE = 32
#: Largest uint8 split held in memory.
IN_MEMORY_BYTES = 4 * 2 ** 30
#: Training images sampled to estimate mean and std of a split read per sample.
STATISTICS_SAMPLE = 1000


def class_folders(root):
    """The class names of ``<root>/train`` and ``<root>/val``, which must agree."""
    found = {}
    for split in ("train", "val"):
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            raise UserError(f"image folder not found: expected {path} with one sub-folder of "
                            f"images per class (DATASET.ROOT is {root})")
        try:
            found[split] = find_classes(path)[0]
        except FileNotFoundError as error:
            raise UserError(f"{path}: {error}") from None
    train, val = found["train"], found["val"]
    for name in train:
        if name not in val:
            raise UserError(f"class {name!r} is in {root}/train but not in {root}/val")
    for name in val:
        if name not in train:
            raise UserError(f"class {name!r} is in {root}/val but not in {root}/train")
    return train


def _open(path, transform):
    try:
        return IndexedImageFolder(path, transform=transform)
    except (FileNotFoundError, OSError) as error:   # a class folder without images
        raise UserError(f"cannot read image folder {path}: {error}") from None


def _auto_size(dataset):
    first_path = dataset.samples[0][0]
    width, height = dataset.loader(first_path).size
    return min(width, height) if min(width, height) <= SMALL_IMAGE else 224


def _fixed_size(size):
    return [transforms.Resize(size), transforms.CenterCrop(size)]


def _load_all(dataset, num_workers):
    """Decode a whole folder into uint8 ``[N, 3, S, S]`` and ``LongTensor [N]``."""
    loader = DataLoader(dataset, batch_size=256, num_workers=num_workers)
    images, labels = [], []
    for batch in loader:
        images.append(batch["image"])
        labels.append(batch["target"])
    return torch.cat(images), torch.cat(labels).long()


def _sampled_statistics(dataset, num_workers):
    """Mean and std from a fixed sample of up to STATISTICS_SAMPLE images."""
    generator = torch.Generator().manual_seed(0)
    count = min(len(dataset), STATISTICS_SAMPLE)
    positions = torch.randperm(len(dataset), generator=generator)[:count].tolist()
    subset = torch.utils.data.Subset(dataset, positions)
    images, _ = _load_all(subset, num_workers)
    return channel_statistics(images)


@DATASETS.register("imagefolder")
def build_image_folder(root, download=False, image_size=0, mean=None, std=None, num_workers=2):
    """The images under ``<root>/train`` and ``<root>/val`` (the test split).

    Args:
        root: the folder holding ``train/`` and ``val/``.
        download: ignored (there is nothing to download).
        image_size: the network's input side; 0 picks it from the first image.
        mean, std: normalisation; None computes it from the training split
            (exactly when it is held in memory, else from a fixed sample of
            :data:`STATISTICS_SAMPLE` images).
        num_workers: processes that decode the images.

    Raises:
        UserError: a missing folder, a class in one split only, or a class folder
            without images.
    """
    root = os.path.expanduser(str(root))
    class_names = class_folders(root)
    train_path, val_path = os.path.join(root, "train"), os.path.join(root, "val")
    plain = _open(train_path, transforms.PILToTensor())
    size = image_size or _auto_size(plain)
    fits = 3 * size * size * (len(plain.samples) + 1) <= IN_MEMORY_BYTES
    if size <= SMALL_IMAGE and fits:
        evaluation = transforms.Compose(_fixed_size(size) + [transforms.PILToTensor()])
        splits = []
        for path in (train_path, val_path):
            images, labels = _load_all(_open(path, evaluation), num_workers)
            splits.append(ImageTensorDataset(images, labels))
        train, test = splits
        if mean is None or std is None:
            measured = channel_statistics(train.images)
            mean, std = mean or measured[0], std or measured[1]
        return DatasetSplits(train=train, test=test, num_classes=len(class_names),
                             train_targets=train.targets, mean=tuple(mean), std=tuple(std),
                             image_size=size, class_names=tuple(class_names))
    if size <= SMALL_IMAGE:    # too many to hold: the same recipe, per sample
        train_steps = _fixed_size(size) + [transforms.RandomCrop(size, padding=4),
                                           transforms.RandomHorizontalFlip()]
        train_transform = transforms.Compose(train_steps + [transforms.PILToTensor()])
        test_transform = transforms.Compose(_fixed_size(size) + [transforms.PILToTensor()])
    else:
        train_transform = imagenet_transforms(True, size)
        test_transform = imagenet_transforms(False, size)
    train, test = _open(train_path, train_transform), _open(val_path, test_transform)
    if mean is None or std is None:
        measured = _sampled_statistics(_open(train_path, test_transform), num_workers)
        mean, std = mean or measured[0], std or measured[1]
    return DatasetSplits(train=train, test=test, num_classes=len(class_names),
                         train_targets=torch.tensor(train.targets, dtype=torch.long),
                         mean=tuple(mean), std=tuple(std), image_size=size,
                         class_names=tuple(class_names))
