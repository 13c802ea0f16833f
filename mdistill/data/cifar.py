"""CIFAR-100 from the standard ``cifar-100-python`` folder.

We read the pickles ourselves instead of using torchvision's CIFAR100 class:
it checks the files' MD5 sums, so it refuses the small sets in the same
format that tests (and users trying the tool) write with :func:`write_cifar100`.
"""
import os
import pickle

import numpy as np
import torch

from ..errors import UserError
from ..registry import DATASETS
from .base import DatasetSplits, ImageTensorDataset, download

FOLDER = "cifar-100-python"
URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
ARCHIVE = "cifar-100-python.tar.gz"
ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
NUM_CLASSES = 100
IMAGE_SIZE = 32
MEAN = (0.5071, 0.4867, 0.4408)
STD = (0.2675, 0.2565, 0.2761)

FINE_LABEL_NAMES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)
COARSE_LABEL_NAMES = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates", "people",
    "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2",
)


@DATASETS.register("cifar100")
def build_cifar100(root, download=False):
    """CIFAR-100 read from ``<root>/cifar-100-python/{train,test,meta}``.

    Args:
        root: the folder that holds (or will hold) ``cifar-100-python``.
        download: fetch and unpack the official archive when the folder is missing.

    Returns:
        :class:`DatasetSplits` of two :class:`ImageTensorDataset` (uint8 images).

    Raises:
        UserError: the folder is missing (and ``download`` is False), a file
            is missing, or a file is not a valid CIFAR-100 pickle.
    """
    folder = os.path.join(os.path.expanduser(str(root)), FOLDER)
    if not os.path.isdir(folder):
        if not download:
            raise UserError(f"CIFAR-100 not found: expected the folder {folder}; set "
                            f"DATASET.DOWNLOAD True to download it, or put the "
                            f"{FOLDER} folder there")
        _download(os.path.dirname(folder))
    for name in ("train", "test", "meta"):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise UserError(f"CIFAR-100 folder {folder} is incomplete: {path} is missing; "
                            f"delete the folder to download it again")
    class_names = _read_meta(os.path.join(folder, "meta"))
    train_images, train_labels = read_split(os.path.join(folder, "train"))
    test_images, test_labels = read_split(os.path.join(folder, "test"))
    return DatasetSplits(
        train=ImageTensorDataset(train_images, train_labels),
        test=ImageTensorDataset(test_images, test_labels),
        num_classes=NUM_CLASSES, train_targets=train_labels, mean=MEAN, std=STD,
        image_size=IMAGE_SIZE, class_names=class_names)


def _download(root):
    download("CIFAR-100", URL, root, ARCHIVE, ARCHIVE_MD5)


def load_pickle(path, what="CIFAR-100"):
    try:
        with open(path, "rb") as handle:
            return pickle.load(handle, encoding="latin1")
    except Exception as error:  # a damaged pickle can raise nearly anything
        raise UserError(f"{path} is not a readable {what} pickle "
                        f"({type(error).__name__}: {error}); delete the folder to download "
                        f"it again") from None


def _read_meta(path):
    entry = load_pickle(path)
    names = entry.get("fine_label_names") if isinstance(entry, dict) else None
    if names is None or len(names) != NUM_CLASSES:
        raise UserError(f"{path} is not a CIFAR-100 meta file: it needs "
                        f"'fine_label_names' with {NUM_CLASSES} names")
    return tuple(str(name) for name in names)


def read_split(path, label_key="fine_labels", num_classes=NUM_CLASSES, what="CIFAR-100"):
    """``(uint8 [N, 3, 32, 32], LongTensor [N])`` from one split's pickle
    (CIFAR-10's batches keep their labels under ``labels``)."""
    entry = load_pickle(path, what)
    if not isinstance(entry, dict) or "data" not in entry or label_key not in entry:
        raise UserError(f"{path} is not a {what} pickle: it needs the keys "
                        f"'data' and '{label_key}'")
    data = np.asarray(entry["data"])
    labels = np.asarray(entry[label_key])
    pixels = 3 * IMAGE_SIZE * IMAGE_SIZE
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels:
        raise UserError(f"{path}: 'data' must be uint8 of shape (N, {pixels}), got "
                        f"{data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu":
        raise UserError(f"{path}: '{label_key}' must be {data.shape[0]} integers, got "
                        f"{labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"{path}: '{label_key}' must lie in 0..{num_classes - 1}, found "
                        f"{labels.min()}..{labels.max()}")
    # Rows are channel-major: 1024 red, then 1024 green, then 1024 blue values.
    images = torch.from_numpy(np.require(data, requirements=["C", "W"]))
    images = images.view(-1, 3, IMAGE_SIZE, IMAGE_SIZE)
    return images, torch.from_numpy(labels.astype(np.int64))


def write_cifar100(root, train, test):
    """Write a CIFAR-100 folder in the real ``cifar-100-python`` format.

    Tests and demos use it to make small datasets that
    :func:`build_cifar100` (and any other CIFAR-100 reader) loads.

    Args:
        root: the folder in which ``cifar-100-python/`` is created.
        train: ``(images, labels)``: uint8 ``[N, 3, 32, 32]`` and N labels in 0..99.
        test: the same for the test split.

    Returns:
        The path of the ``cifar-100-python`` folder.

    ``coarse_labels`` are written as ``label // 5``, placeholders in the
    right range (nothing here reads them).
    """
    folder = os.path.join(str(root), FOLDER)
    os.makedirs(folder, exist_ok=True)
    for name, (images, labels) in (("train", train), ("test", test)):
        images = torch.as_tensor(images)
        labels = torch.as_tensor(labels).long()
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"{name} images must be uint8 [N, 3, 32, 32], got "
                             f"{images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],) or (
                labels.numel() and (labels.min() < 0 or labels.max() >= NUM_CLASSES)):
            raise ValueError(f"{name} labels must be {images.shape[0]} integers in 0..99")
        fine = [int(label) for label in labels]
        entry = {
            "filenames": [f"{name}_{position:05d}.png" for position in range(len(fine))],
            "batch_label": f"{name} batch",
            "fine_labels": fine,
            "coarse_labels": [label // 5 for label in fine],
            "data": images.reshape(len(fine), -1).numpy().copy(),
        }
        _dump(entry, os.path.join(folder, name))
    meta = {"fine_label_names": list(FINE_LABEL_NAMES),
            "coarse_label_names": list(COARSE_LABEL_NAMES)}
    _dump(meta, os.path.join(folder, "meta"))
    return folder


def _dump(entry, path):
    with open(path, "wb") as handle:
        pickle.dump(entry, handle, protocol=2)   # the protocol of the official files
