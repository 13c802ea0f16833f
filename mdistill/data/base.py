"""What every dataset builder returns, and the in-memory image dataset."""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..errors import UserError


@dataclass
class DatasetSplits:
    """The train and test splits of one dataset and how to normalise them.

    Attributes:
        train: an :class:`ImageTensorDataset` (in-memory) or a torch Dataset
            whose items are ``{"image", "target", "index"}`` dicts.
        test: the same for the test split.
        num_classes: number of classes.
        train_targets: ``LongTensor [num_train]``, the label of every training
            sample (CRD's sampler needs it).
        mean, std: per-channel normalisation, in ``[0, 1]`` pixel units.
        image_size: side of the (square) network input.
        class_names: optional names of the classes, in label order.
        hflip: whether a horizontal flip is a valid augmentation (False for
            digits, whose mirror images are other or no digits).
        val: a validation split held out from the training data
            (DATASET.VAL_FRACTION), read like ``test``; None without one.
    """

    train: object
    test: object
    num_classes: int
    train_targets: torch.Tensor
    mean: tuple
    std: tuple
    image_size: int
    class_names: Optional[Tuple[str, ...]] = None
    hflip: bool = True
    val: object = None

    @property
    def num_train(self):
        """Number of training samples."""
        return int(self.train_targets.numel())


class ImageTensorDataset:
    """Images and labels held as two tensors.

    The fast loader (:func:`mdistill.data.build_train_loader`) moves both to
    the device once and augments whole batches there; ``__getitem__`` exists
    so that a standard ``torch.utils.data.DataLoader`` (and a test) can read
    it one sample at a time.

    Args:
        images: ``uint8`` tensor ``[N, 3, H, W]``.
        targets: labels, ``[N]`` integers.
        transform: optional function applied to the uint8 ``[3, H, W]`` image
            in ``__getitem__`` (the fast loader ignores it).
    """

    def __init__(self, images, targets, transform=None):
        images = torch.as_tensor(images)
        targets = torch.as_tensor(targets).long()
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a uint8 tensor [N, 3, H, W], got "
                             f"{images.dtype} {tuple(images.shape)}")
        if targets.shape != (images.shape[0],):
            raise ValueError(f"targets must have shape ({images.shape[0]},), "
                             f"got {tuple(targets.shape)}")
        self.images = images
        self.targets = targets
        self.transform = transform

    @property
    def image_size(self):
        """``(H, W)`` of the stored images."""
        return tuple(self.images.shape[2:])

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, index):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "target": self.targets[index], "index": index}

    def __repr__(self):
        return f"ImageTensorDataset({len(self)} images of {tuple(self.images.shape[1:])})"


def mix_seed(*values):
    """A 63-bit generator seed from several integers (seed, epoch, rank, ...).

    Neighbouring tuples such as (0, 1) and (1, 0) give unrelated seeds, unlike
    ``seed + epoch``, so no two (seed, epoch) pairs share a random stream.
    """
    mask = (1 << 64) - 1
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (int(value) & mask)) & mask
        # SplitMix64 finaliser: every input bit affects every output bit.
        state = (state + 0x9E3779B97F4A7C15) & mask
        state = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & mask
        state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & mask
        state ^= state >> 31
    return state & ((1 << 63) - 1)


def check_positive(name, value):
    """Raise a UserError unless ``value`` is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return value


def download(what, url, root, filename, md5, extract=True):
    """Fetch ``url`` into ``root`` with torchvision's helpers (checked against
    ``md5``) and unpack it there, or raise a UserError saying what to do by hand."""
    import os
    from torchvision.datasets.utils import download_and_extract_archive, download_url
    os.makedirs(root, exist_ok=True)
    fetch = download_and_extract_archive if extract else download_url
    try:
        fetch(url, root, filename=filename, md5=md5)
    except (OSError, RuntimeError) as error:   # URLError is an OSError; bad MD5 a RuntimeError
        raise UserError(f"could not download {what} from {url} into {root} ({error}); "
                        f"download it yourself and put it there") from None
