"""Datasets and loaders; importing this package registers every dataset.

Batches are dicts (``image``, ``target``, ``index`` and any extra fields);
nothing here knows about distillation or the config.
"""
import inspect

from ..errors import UserError
from ..registry import DATASETS
from .base import DatasetSplits, ImageTensorDataset
from .cifar import write_cifar100
from .contrastive import ContrastiveSampler
from .loaders import DeviceLoader, TorchLoader, build_test_loader, build_train_loader
from .subsets import apply_split_options
from . import cifar, digits, folder, imagenet, synthetic, vision  # noqa: F401  (registration)

__all__ = ["DATASETS", "ContrastiveSampler", "DatasetSplits", "DeviceLoader", "apply_split_options",
           "ImageTensorDataset", "TorchLoader", "build_dataset", "build_test_loader",
           "build_train_loader", "write_cifar100"]


def build_dataset(name, root, download=False, **options):
    """Build the dataset registered as ``name``.

    Args:
        name: ``cifar100``, ``fashion_mnist``, ``imagefolder``, ``digits``, ... any
            registered name.
        root: the data folder.
        download: fetch the data when it is missing (where possible).
        **options: the dataset's own options (e.g. ``num_train`` for ``synthetic``).

    Returns:
        :class:`DatasetSplits`.

    Raises:
        UserError: an unknown name (the valid ones are listed), an option the
            dataset does not take, or missing or damaged files.
    """
    builder = DATASETS.get(name)
    parameters = inspect.signature(builder).parameters
    takes_any = any(parameter.kind == parameter.VAR_KEYWORD for parameter in parameters.values())
    known = [key for key in parameters if key not in ("root", "download")]
    unknown = sorted(key for key in options if key not in parameters)
    if unknown and not takes_any:
        raise UserError(f"dataset {name!r} has no option {', '.join(unknown)}; its options: "
                        f"{', '.join(known) or 'none'}")
    return builder(root, download, **options)
