"""Positive and negative sample indices for contrastive objectives (CRD)."""
import torch

from ..errors import UserError, unknown_choice
from .base import check_positive, mix_seed

MODES = ("exact", "relax")
# Uniform integers below `count` are taken as (a draw below 2**62) mod count:
# the modulo bias is at most count / 2**62, nothing for any dataset size.
_DRAW_RANGE = 2 ** 62


class ContrastiveSampler:
    """Draws, for each sample of a batch, one positive and K negative indices.

    Column 0 is the positive: the sample itself (``"exact"``) or a uniformly
    random sample of the same class (``"relax"``). Columns 1..K are negatives
    drawn uniformly, with replacement, from the samples of every *other*
    class, as CRD/RepDistiller do.

    The draw is vectorised: training indices are sorted by class, so the
    samples of another class are every sorted slot outside the class's block
    ``[begin, begin + count)``; a uniform slot among the ``N - count`` others
    is shifted past the block.

    Draws are reproducible: each call seeds its generator from
    ``(seed, rank, epoch, calls this epoch)``. A data loader given this object
    as an extra field calls :meth:`set_epoch` and saves :meth:`state_dict`
    with its own position, so a resumed run draws the same negatives.

    Example::

        sampler = ContrastiveSampler(data.train_targets, num_negatives=16384)
        loader = build_train_loader(data.train, 64, device, mean=data.mean, std=data.std,
                                    extra_fields={"contrastive_index": sampler})

    Args:
        train_targets: the label of every training sample, ``[N]``.
        num_negatives: K, negatives per sample.
        mode: ``"exact"`` or ``"relax"``.
        seed: the random seed.
        rank: the process's rank, so processes draw different negatives.

    Raises:
        UserError: an unknown mode, or labels of a single class (no negatives).
    """

    def __init__(self, train_targets, num_negatives, mode="exact", seed=0, rank=0):
        if mode not in MODES:
            raise unknown_choice("contrastive sampling mode", mode, MODES)
        check_positive("the number of negatives", num_negatives)
        targets = torch.as_tensor(train_targets).long().cpu()
        if targets.dim() != 1 or targets.numel() == 0 or bool((targets < 0).any()):
            raise ValueError("train_targets must be a non-empty 1-D tensor of labels >= 0")
        counts = torch.bincount(targets)
        if int(counts.max()) == targets.numel():
            raise UserError("contrastive sampling needs training labels of at least two classes")
        self.num_negatives = num_negatives
        self.mode = mode
        self.seed = seed
        self.rank = rank
        self.num_samples = targets.numel()
        self._cpu_tables = {
            "targets": targets,
            "by_class": torch.sort(targets, stable=True).indices,   # indices sorted by class
            "begin": torch.cumsum(counts, 0) - counts,              # each class's block
            "count": counts,
        }
        self._tables = {}
        self._generators = {}
        self.epoch = 0
        self.calls = 0

    def set_epoch(self, epoch):
        """Start the draws of ``epoch``."""
        self.epoch = int(epoch)
        self.calls = 0

    def state_dict(self):
        return {"epoch": self.epoch, "calls": self.calls}

    def load_state_dict(self, state):
        self.epoch = int(state["epoch"])
        self.calls = int(state["calls"])

    def _on(self, device):
        if device not in self._tables:
            self._tables[device] = {name: table.to(device)
                                    for name, table in self._cpu_tables.items()}
            self._generators[device] = torch.Generator(device=device)
        return self._tables[device], self._generators[device]

    def __call__(self, index, target=None):
        """Indices ``[B, K + 1]`` (positive first) for the samples ``index``.

        Args:
            index: ``LongTensor [B]`` of training-sample indices; the result is
                on its device.
            target: accepted for the extra-field interface; the labels come
                from ``train_targets``.
        """
        tables, generator = self._on(index.device)
        generator.manual_seed(mix_seed(self.seed, self.rank, self.epoch, self.calls))
        self.calls += 1
        classes = tables["targets"][index]
        begin = tables["begin"][classes].unsqueeze(1)
        count = tables["count"][classes].unsqueeze(1)
        # One draw per column; column 0 becomes the positive below, which
        # spares a concatenation of the large [B, K] result.
        draws = torch.randint(0, _DRAW_RANGE, (index.numel(), self.num_negatives + 1),
                              generator=generator, device=index.device)
        if self.mode == "relax":
            positive_slot = begin + draws[:, :1] % count      # before draws change below
        slots = draws.remainder_(self.num_samples - count)
        slots = torch.where(slots >= begin, slots + count, slots)   # skip the own class
        if self.mode == "relax":
            slots[:, :1] = positive_slot
        result = tables["by_class"].index_select(0, slots.view(-1)).view_as(slots)
        if self.mode == "exact":
            result[:, 0] = index
        return result

    def __repr__(self):
        return (f"ContrastiveSampler(mode={self.mode!r}, num_negatives={self.num_negatives}, "
                f"num_samples={self.num_samples})")
