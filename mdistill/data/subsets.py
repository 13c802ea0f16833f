"""Stratified training subsets and a held-out validation split.

``DATASET.TRAIN_PER_CLASS`` / ``DATASET.TRAIN_FRACTION`` keep part of each
class of the training split (low-data experiments, quick CPU runs), and
``DATASET.VAL_FRACTION`` moves part of each class of what is left into a
validation split, on which the "best" checkpoint is chosen so the test set
plays no part in model selection.

Both draws are seeded by ``DATASET.SUBSET_SEED`` alone, not by the run's seed:
runs of several seeds then differ in initialisation and data order but train
and validate on the same images, so their spread measures the method and not
the luck of the subset.
"""
import copy
import dataclasses

import torch

from ..errors import UserError
from .base import ImageTensorDataset, mix_seed


def stratified_positions(targets, seed, per_class=0, fraction=1.0):
    """Positions of a per-class random subset, sorted.

    Args:
        targets: ``LongTensor [N]`` labels.
        seed: the draw's seed (the same seed and labels give the same subset).
        per_class: keep this many of each class (all of a smaller class); 0: use ``fraction``.
        fraction: keep ``round(fraction * count)`` of each class, at least one.

    Returns:
        ``LongTensor`` of kept positions, in increasing order.
    """
    targets = torch.as_tensor(targets).long()
    generator = torch.Generator().manual_seed(mix_seed(seed, 0x5B5E7))
    kept = []
    for label in torch.unique(targets).tolist():
        positions = torch.nonzero(targets == label).flatten()
        order = positions[torch.randperm(positions.numel(), generator=generator)]
        count = per_class if per_class else max(1, round(fraction * positions.numel()))
        kept.append(order[:count])
    return torch.cat(kept).sort().values if kept else targets.new_zeros(0)


def split_positions(targets, fraction, seed):
    """Split every class into ``(kept, held_out)`` positions, ``fraction`` held out.

    Each class with at least two samples gives ``round(fraction * count)``
    of them (at least one, never all) to the held-out part.
    """
    targets = torch.as_tensor(targets).long()
    generator = torch.Generator().manual_seed(mix_seed(seed, 0x7A1))
    kept, held_out = [], []
    for label in torch.unique(targets).tolist():
        positions = torch.nonzero(targets == label).flatten()
        order = positions[torch.randperm(positions.numel(), generator=generator)]
        count = min(max(1, round(fraction * order.numel())), order.numel() - 1)
        held_out.append(order[:count])
        kept.append(order[count:])
    return torch.cat(kept).sort().values, torch.cat(held_out).sort().values


class IndexedSubset(torch.utils.data.Dataset):
    """Part of a dataset of dict items, re-indexed from 0.

    ``index`` in each item is the position inside the subset, so methods that
    keep per-sample memory (CRD) see a dataset of ``len(subset)`` samples.
    """

    def __init__(self, dataset, positions):
        self.dataset = dataset
        self.positions = [int(position) for position in positions]

    def __len__(self):
        return len(self.positions)

    def __getitem__(self, index):
        item = dict(self.dataset[self.positions[index]])
        item["index"] = index
        return item


def take(dataset, positions):
    """The samples of ``dataset`` at ``positions``, as a dataset of the same kind."""
    positions = torch.as_tensor(positions).long()
    if isinstance(dataset, ImageTensorDataset):
        return ImageTensorDataset(dataset.images.index_select(0, positions),
                                  dataset.targets.index_select(0, positions), dataset.transform)
    return IndexedSubset(dataset, positions)


def evaluation_view(train, test):
    """The training split read the way the test split is (no augmentation)."""
    if isinstance(train, ImageTensorDataset):
        return train     # augmentation belongs to the loader, not to the data
    if not hasattr(train, "transform") or not hasattr(test, "transform"):
        raise UserError("DATASET.VAL_FRACTION needs a dataset whose transforms can be "
                        "swapped for the test split's (in-memory or image-folder data)")
    view = copy.copy(train)
    view.transform = test.transform
    return view


def check_split_options(per_class, fraction, val_fraction):
    """UserError for values the three keys cannot take together."""
    if per_class < 0:
        raise UserError(f"DATASET.TRAIN_PER_CLASS must be 0 (all) or positive, got {per_class}")
    if not 0 < fraction <= 1:
        raise UserError(f"DATASET.TRAIN_FRACTION must lie in (0, 1], got {fraction}")
    if per_class and fraction != 1:
        raise UserError("set DATASET.TRAIN_PER_CLASS or DATASET.TRAIN_FRACTION, not both")
    if not 0 <= val_fraction < 1:
        raise UserError(f"DATASET.VAL_FRACTION must lie in [0, 1), got {val_fraction}")


def apply_split_options(data, per_class=0, fraction=1.0, val_fraction=0.0, seed=0):
    """Subset the training split, then hold out a validation split from it.

    Args:
        data: a :class:`~mdistill.data.DatasetSplits`.
        per_class, fraction: the training subset (see :func:`stratified_positions`);
            ``0`` and ``1.0`` keep everything.
        val_fraction: the share of each class of the (subset) training split
            moved to ``data.val``; 0 keeps no validation split.
        seed: ``DATASET.SUBSET_SEED``.

    Returns:
        A new :class:`DatasetSplits` (``train``, ``train_targets`` and ``val``
        replaced), or ``data`` itself when nothing is asked.

    Raises:
        UserError: invalid values, or a dataset whose transforms cannot be split.
    """
    check_split_options(per_class, fraction, val_fraction)
    if not per_class and fraction == 1 and not val_fraction:
        return data
    targets = data.train_targets
    if per_class or fraction != 1:
        positions = stratified_positions(targets, seed, per_class, fraction)
    else:
        positions = torch.arange(targets.numel())
    val = None
    if val_fraction:
        counts = torch.unique(targets[positions], return_counts=True)[1]
        if int(counts.min()) < 2:
            raise UserError("DATASET.VAL_FRACTION needs at least two training images of every "
                            "class; raise DATASET.TRAIN_PER_CLASS or DATASET.TRAIN_FRACTION")
        kept, held_out = split_positions(targets[positions], val_fraction, seed)
        val = take(evaluation_view(data.train, data.test), positions[held_out])
        positions = positions[kept]
    return dataclasses.replace(data, train=take(data.train, positions),
                               train_targets=targets[positions], val=val)
