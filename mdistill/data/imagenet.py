"""ImageNet from ``<root>/imagenet/{train,val}`` (one folder per class)."""
import os

import torch
from torchvision import transforms
from torchvision.datasets import ImageFolder

from ..errors import UserError
from ..registry import DATASETS
from .base import DatasetSplits

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
IMAGE_SIZE = 224


class IndexedImageFolder(ImageFolder):
    """An ImageFolder whose items are ``{"image", "target", "index"}`` dicts."""

    def __getitem__(self, index):
        image, target = super().__getitem__(index)
        return {"image": image, "target": target, "index": index}


def imagenet_transforms(train, size=IMAGE_SIZE):
    """The standard ImageNet transforms, ending in a uint8 tensor.

    Normalisation happens on the device (the loader does it), so workers
    send 4x fewer bytes than float tensors would need. Evaluation resizes to
    ``size * 256 / 224`` and crops the centre, the usual 0.875 ratio.
    """
    if train:
        steps = [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]
    else:
        steps = [transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size)]
    return transforms.Compose(steps + [transforms.PILToTensor()])


@DATASETS.register("imagenet")
def build_imagenet(root, download=False):
    """ImageNet (ILSVRC-2012) as two ImageFolder datasets.

    Args:
        root: the folder that holds ``imagenet/train`` and ``imagenet/val``,
            each with one sub-folder of images per class.
        download: not supported (ImageNet needs a registered account).

    Raises:
        UserError: a folder is missing, or train and val have different classes.
    """
    folder = os.path.join(os.path.expanduser(str(root)), "imagenet")
    splits = {}
    for name in ("train", "val"):
        path = os.path.join(folder, name)
        if not os.path.isdir(path):
            hint = " (ImageNet cannot be downloaded automatically)" if download else ""
            raise UserError(f"ImageNet not found: expected the folder {path} with one "
                            f"sub-folder per class{hint}")
        try:
            splits[name] = IndexedImageFolder(path, transform=imagenet_transforms(name == "train"))
        except (FileNotFoundError, OSError) as error:   # e.g. a class folder without images
            raise UserError(f"cannot read ImageNet folder {path}: {error}") from None
    train, test = splits["train"], splits["val"]
    if train.classes != test.classes:
        raise UserError(f"ImageNet folders {folder}/train and {folder}/val have different "
                        f"classes ({len(train.classes)} and {len(test.classes)})")
    return DatasetSplits(train=train, test=test, num_classes=len(train.classes),
                         train_targets=torch.tensor(train.targets, dtype=torch.long),
                         mean=MEAN, std=STD, image_size=IMAGE_SIZE,
                         class_names=tuple(train.classes))
