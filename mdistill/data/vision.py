"""torchvision's small image datasets, in torchvision's on-disk layout.

``mnist``, ``fashion_mnist`` and ``kmnist`` are read by torchvision's own
classes (``<root>/MNIST/raw/``, ``<root>/FashionMNIST/raw/``, ``<root>/KMNIST/raw/``).
``cifar10`` (``<root>/cifar-10-batches-py/``), ``svhn`` (``<root>/{train,test}_32x32.mat``)
and ``stl10`` (``<root>/stl10_binary/``) are read here from the same files,
because torchvision's classes check every file's MD5 sum on load and so refuse
the small sets in the real formats that tests (and users trying the tool) write;
downloads go through torchvision's helpers with torchvision's URLs and sums.

Every split is held in memory as uint8 ``[N, 3, S, S]``: grey images get three
equal channels, 28-pixel images are zero-padded to 32, and ``image_size``
resizes (STL-10's 96 px to 32, say). ``mean`` and ``std`` default to the
training split's own per-channel statistics.
"""
import gzip
import os
import shutil

import numpy as np
import torch
from torchvision import datasets as tv_datasets

from ..errors import UserError
from ..registry import DATASETS
from .base import DatasetSplits, ImageTensorDataset, download as fetch
from .cifar import load_pickle, read_split
from .imageops import channel_statistics, fit_size, to_rgb

#: Where Debian's ``dataset-fashion-mnist`` package puts the four gzipped IDX files.
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def in_memory_splits(train, test, class_names, image_size=0, mean=None, std=None, hflip=True):
    """:class:`DatasetSplits` of two in-memory splits brought to one shape.

    Args:
        train, test: ``(images, labels)``; images uint8 ``[N, H, W]`` or
            ``[N, C, H, W]`` with C 1 or 3, square.
        class_names: the names of the classes, in label order.
        image_size: the side of the network input; 0 keeps the images' size
            (28-pixel images are padded to 32).
        mean, std: normalisation; None computes it from the training images.
        hflip: whether a horizontal flip is a valid augmentation.
    """
    splits = []
    for images, labels in (train, test):
        images = fit_size(to_rgb(images), image_size)
        splits.append(ImageTensorDataset(images, torch.as_tensor(labels).long()))
    train_set, test_set = splits
    if mean is None or std is None:
        measured_mean, measured_std = channel_statistics(train_set.images)
        mean = measured_mean if mean is None else mean
        std = measured_std if std is None else std
    return DatasetSplits(train=train_set, test=test_set, num_classes=len(class_names),
                         train_targets=train_set.targets, mean=tuple(mean), std=tuple(std),
                         image_size=train_set.image_size[0], class_names=tuple(class_names),
                         hflip=hflip)


# ------------------------------------------------------------- MNIST family
def _idx_names(cls):
    """The four uncompressed IDX file names torchvision's class reads."""
    return [os.path.splitext(name)[0] for name, _ in cls.resources]


def _mnist_family(cls, what, root, download, image_size, mean, std, hflip, local=None, hint=""):
    """Read one of torchvision's MNIST-style classes; ``local(raw)`` may first
    fill the raw folder from files on this machine (True when it did)."""
    root = os.path.expanduser(str(root))
    raw = os.path.join(root, cls.__name__, "raw")
    missing = [name for name in _idx_names(cls) if not os.path.isfile(os.path.join(raw, name))]
    if missing and local is not None and local(raw):
        missing = []
    if missing:
        if not download:
            raise UserError(f"{what} not found: {os.path.join(raw, missing[0])} is missing; set "
                            f"DATASET.DOWNLOAD True to download it, or put the IDX files there{hint}")
        try:
            cls(root, train=True, download=True)
        except (OSError, RuntimeError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"could not download {what} into {raw} ({first}); download the "
                            f"IDX files yourself and put them there") from None
    try:
        train, test = cls(root, train=True), cls(root, train=False)
    except (OSError, RuntimeError, AssertionError, ValueError) as error:
        raise UserError(f"cannot read {what} from {raw}: {error}") from None
    return in_memory_splits((train.data, train.targets), (test.data, test.targets),
                            train.classes, image_size, mean, std, hflip)


def copy_debian_fashion_mnist(raw, source=None):
    """Decompress Debian's Fashion-MNIST files into torchvision's ``raw`` folder.

    Returns:
        True when all four files were found and written, False when the
        package is not installed (nothing is written then).
    """
    source = source or DEBIAN_FASHION_MNIST
    names = [name for name, _ in tv_datasets.FashionMNIST.resources]
    if not all(os.path.isfile(os.path.join(source, name)) for name in names):
        return False
    os.makedirs(raw, exist_ok=True)
    for name in names:
        target = os.path.join(raw, os.path.splitext(name)[0])
        partial = target + ".partial"
        with gzip.open(os.path.join(source, name), "rb") as packed, open(partial, "wb") as out:
            shutil.copyfileobj(packed, out)
        os.replace(partial, target)
    return True


@DATASETS.register("mnist")
def build_mnist(root, download=False, image_size=0, mean=None, std=None):
    """MNIST (60,000 / 10,000 handwritten digits, 28 px grey) from ``<root>/MNIST/raw/``."""
    return _mnist_family(tv_datasets.MNIST, "MNIST", root, download, image_size, mean, std,
                         hflip=False)


@DATASETS.register("fashion_mnist")
def build_fashion_mnist(root, download=False, image_size=0, mean=None, std=None):
    """Fashion-MNIST (60,000 / 10,000 clothing images, 28 px grey) from
    ``<root>/FashionMNIST/raw/``.

    When those files are missing and Debian's ``dataset-fashion-mnist`` package
    is installed (``apt-get install dataset-fashion-mnist``), its files are
    decompressed there, so no network is needed.
    """
    return _mnist_family(tv_datasets.FashionMNIST, "Fashion-MNIST", root, download, image_size,
                         mean, std, hflip=True, local=copy_debian_fashion_mnist,
                         hint=" (or apt-get install dataset-fashion-mnist)")


@DATASETS.register("kmnist")
def build_kmnist(root, download=False, image_size=0, mean=None, std=None):
    """Kuzushiji-MNIST (60,000 / 10,000 cursive Japanese characters, 28 px grey)
    from ``<root>/KMNIST/raw/``."""
    return _mnist_family(tv_datasets.KMNIST, "KMNIST", root, download, image_size, mean, std,
                         hflip=False)


# ------------------------------------------------------- CIFAR-10, STL-10
def _unpack_if_missing(what, folder, names, download, cls):
    """Download and unpack torchvision's archive of ``cls`` next to ``folder``
    when any of ``names`` is missing from it (or say how to get them)."""
    missing = [name for name in names if not os.path.isfile(os.path.join(folder, name))]
    if not missing:
        return
    if not download:
        raise UserError(f"{what} not found: {os.path.join(folder, missing[0])} is missing; "
                        f"set DATASET.DOWNLOAD True to download it")
    fetch(what, cls.url, os.path.dirname(folder), cls.filename, cls.tgz_md5)


@DATASETS.register("cifar10")
def build_cifar10(root, download=False, image_size=0, mean=None, std=None):
    """CIFAR-10 (50,000 / 10,000 images, 32 px) from ``<root>/cifar-10-batches-py/``."""
    cls = tv_datasets.CIFAR10
    folder = os.path.join(os.path.expanduser(str(root)), cls.base_folder)
    names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    _unpack_if_missing("CIFAR-10", folder, names, download, cls)
    meta = os.path.join(folder, cls.meta["filename"])
    entry = load_pickle(meta, "CIFAR-10")
    class_names = entry.get(cls.meta["key"]) if isinstance(entry, dict) else None
    if not class_names or len(class_names) != 10:
        raise UserError(f"{meta} is not a CIFAR-10 meta file: it needs "
                        f"'{cls.meta['key']}' with 10 names")
    splits = []
    for files in (cls.train_list, cls.test_list):
        parts = [read_split(os.path.join(folder, name), "labels", 10, "CIFAR-10")
                 for name, _ in files]
        splits.append((torch.cat([images for images, _ in parts]),
                       torch.cat([labels for _, labels in parts])))
    return in_memory_splits(splits[0], splits[1], class_names, image_size, mean, std)


# --------------------------------------------------------------------- SVHN
@DATASETS.register("svhn")
def build_svhn(root, download=False, image_size=0, mean=None, std=None):
    """SVHN digits (73,257 / 26,032 images, 32 px) from ``<root>/{train,test}_32x32.mat``.

    Labels are 0..9 (the files' 10 for the digit 0 becomes 0, as in torchvision).
    """
    from scipy.io import loadmat
    root = os.path.expanduser(str(root))
    splits = []
    for split in ("train", "test"):
        url, filename, md5 = tv_datasets.SVHN.split_list[split]
        path = os.path.join(root, filename)
        if not os.path.isfile(path):
            if not download:
                raise UserError(f"SVHN not found: {path} is missing; set DATASET.DOWNLOAD True "
                                f"to download it")
            fetch("SVHN", url, root, filename, md5, extract=False)
        try:
            entry = loadmat(path)
            images = np.transpose(entry["X"], (3, 2, 0, 1))     # H, W, C, N -> N, C, H, W
            labels = entry["y"].astype(np.int64).reshape(-1) % 10
        except Exception as error:  # noqa: BLE001  (a damaged .mat raises many kinds)
            raise UserError(f"{path} is not an SVHN .mat file with 'X' [32, 32, 3, N] and "
                            f"'y' [N, 1] ({type(error).__name__}: {error})") from None
        splits.append((torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)),
                       torch.from_numpy(labels)))
    return in_memory_splits(splits[0], splits[1], [str(digit) for digit in range(10)],
                            image_size, mean, std, hflip=False)


# -------------------------------------------------------------------- STL-10
@DATASETS.register("stl10")
def build_stl10(root, download=False, image_size=0, mean=None, std=None):
    """STL-10's labelled splits (5,000 / 8,000 images, 96 px) from ``<root>/stl10_binary/``.

    ``image_size 32`` downsamples them for the CIFAR models.
    """
    cls = tv_datasets.STL10
    folder = os.path.join(os.path.expanduser(str(root)), cls.base_folder)
    names = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", cls.class_names_file]
    _unpack_if_missing("STL-10", folder, names, download, cls)
    with open(os.path.join(folder, cls.class_names_file)) as handle:
        class_names = [line.strip() for line in handle if line.strip()]
    splits = []
    for split in ("train", "test"):
        images = np.fromfile(os.path.join(folder, f"{split}_X.bin"), dtype=np.uint8)
        labels = np.fromfile(os.path.join(folder, f"{split}_y.bin"), dtype=np.uint8)
        if images.size != labels.size * 3 * 96 * 96:
            raise UserError(f"{folder}/{split}_X.bin holds {images.size} bytes, not "
                            f"{labels.size} images of 3x96x96 for the labels of {split}_y.bin")
        # Stored column-major per channel: transpose each plane to row-major.
        images = images.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)
        labels = labels.astype(np.int64) - 1
        if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise UserError(f"{folder}/{split}_y.bin: labels must lie in 1..{len(class_names)}")
        splits.append((torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)))
    return in_memory_splits(splits[0], splits[1], class_names, image_size, mean, std)
