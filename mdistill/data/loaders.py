"""Loaders that yield dict batches already on the device.

In-memory datasets (:class:`ImageTensorDataset`) take the fast path, a
:class:`DeviceLoader`: the uint8 images move to the device once and each
batch is gathered, cropped, flipped and normalised there with a handful of
vectorised tensor ops, with no per-sample Python work, no worker processes
and no host-to-device copy per step. That keeps the loader's cost per batch
far below a training step even on a 2-core CPU.

Other datasets (ImageNet's folders) go through a standard ``DataLoader``
with worker processes, wrapped in a :class:`TorchLoader` with the same
interface.

Every random draw comes from generators seeded by ``(seed, epoch[, rank])``,
so an epoch can be replayed, and resumed from the middle, exactly.
"""
import itertools
import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from ..errors import UserError
from .base import ImageTensorDataset, check_positive, mix_seed
from .randaugment import ImageView

#: Zero padding of the random crop (torchvision's RandomCrop(32, padding=4)).
CROP_PADDING = 4


def build_train_loader(dataset, batch_size, device, *, augment=True, hflip=True, mean, std,
                       seed=0, rank=0, world_size=1, extra_fields=None, channels_last=False,
                       num_workers=2, drop_last=False):
    """The training loader: shuffled per epoch, sharded over processes.

    Args:
        dataset: an :class:`ImageTensorDataset` (fast device path) or a torch
            Dataset of ``{"image", "target", "index"}`` dicts.
        batch_size: the per-process batch size.
        device: where batches are delivered.
        augment: random crop (4-pixel zero padding) and horizontal flip; in-memory
            datasets only (a torch Dataset applies its own transforms).
        hflip: include the horizontal flip in the augmentation (off for data
            whose classes are not mirror-symmetric, such as digits).
        mean, std: per-channel normalisation in ``[0, 1]`` pixel units.
        seed: seeds the shuffle and the augmentation (with the epoch).
        rank, world_size: this process and the number of processes; every
            rank runs the same number of steps.
        extra_fields: ``{name: fn(index, target) -> tensor}`` added to each batch.
        channels_last: deliver images in channels-last memory format.
        num_workers: worker processes (torch Datasets only).
        drop_last: drop the last incomplete batch.

    Returns:
        A :class:`DeviceLoader` or :class:`TorchLoader`.
    """
    options = dict(mean=mean, std=std, train=True, seed=seed, rank=rank, world_size=world_size,
                   extra_fields=extra_fields, channels_last=channels_last, drop_last=drop_last)
    if isinstance(dataset, ImageTensorDataset):
        return DeviceLoader(dataset, batch_size, device, augment=augment, hflip=hflip, **options)
    return TorchLoader(dataset, batch_size, device, num_workers=num_workers, **options)


def build_test_loader(dataset, batch_size, device, *, mean, std, rank=0, world_size=1,
                      channels_last=False, num_workers=2):
    """The evaluation loader: fixed order, no augmentation.

    With ``world_size > 1`` each rank reads a disjoint contiguous block of the
    test set, without padding, so metrics summed over ranks count every test
    sample exactly once (ranks may run one batch more or less than others).

    Args: as :func:`build_train_loader`.
    """
    options = dict(mean=mean, std=std, train=False, rank=rank, world_size=world_size,
                   channels_last=channels_last)
    if isinstance(dataset, ImageTensorDataset):
        return DeviceLoader(dataset, batch_size, device, augment=False, **options)
    return TorchLoader(dataset, batch_size, device, num_workers=num_workers, **options)


def _shard_bounds(num_samples, rank, world_size):
    """The contiguous block ``[begin, end)`` of an unpadded evaluation shard."""
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size


class _EpochLoader:
    """What both loaders share: epoch and position state, normalisation, extra fields."""

    def __init__(self, batch_size, device, *, mean, std, train, seed, rank, world_size,
                 extra_fields, channels_last, drop_last):
        check_positive("batch_size", batch_size)
        check_positive("world_size", world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        mean = torch.as_tensor(mean, dtype=torch.float32)
        std = torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != (3,) or std.shape != (3,) or bool((std <= 0).any()):
            raise ValueError(f"mean and std need 3 values each, std positive; got {mean}, {std}")
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.train = train
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.extra_fields = dict(extra_fields or {})
        #: Extra fields that are other augmented views of the images (MLKD's strong view).
        self.image_views = {name: self.extra_fields.pop(name) for name in list(self.extra_fields)
                      if isinstance(self.extra_fields[name], ImageView)}
        self.channels_last = channels_last
        self.drop_last = drop_last and train
        # (x / 255 - mean) / std as one fused multiply-add: x * scale + shift.
        self._scale_uint8 = (1.0 / (255.0 * std)).view(1, 3, 1, 1).to(self.device)
        self._scale_unit = (1.0 / std).view(1, 3, 1, 1).to(self.device)
        self._shift = (-mean / std).view(1, 3, 1, 1).to(self.device)
        self.epoch = 0
        self.position = 0

    def _count_batches(self, num_samples):
        if self.drop_last:
            return num_samples // self.batch_size
        return math.ceil(num_samples / self.batch_size)

    def set_epoch(self, epoch):
        """Select the epoch whose shuffle and augmentation the next iteration
        replays, from its first batch. Forwarded to extra fields that have a
        ``set_epoch``."""
        self.epoch = int(epoch)
        self.position = 0
        for fn in self.extra_fields.values():
            if callable(getattr(fn, "set_epoch", None)):
                fn.set_epoch(self.epoch)

    def state_dict(self):
        """``{"epoch", "position"}`` (batches already delivered this epoch), the
        sharding it refers to, and the state of extra fields that keep one."""
        return {"epoch": self.epoch, "position": self.position,
                "batch_size": self.batch_size, "world_size": self.world_size,
                "extra_fields": {name: fn.state_dict() for name, fn in self.extra_fields.items()
                                 if callable(getattr(fn, "state_dict", None))}}

    def load_state_dict(self, state):
        """Continue where :meth:`state_dict` was taken: the next iteration yields
        the remaining batches of that epoch."""
        if (state["batch_size"], state["world_size"]) != (self.batch_size, self.world_size):
            raise UserError(
                f"cannot resume mid-epoch with a different per-process batch size or number "
                f"of processes (saved {state['batch_size']} x {state['world_size']}, now "
                f"{self.batch_size} x {self.world_size}); resume from an end-of-epoch checkpoint")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        for name, fn in self.extra_fields.items():
            saved = state.get("extra_fields", {}).get(name)
            if saved is not None and callable(getattr(fn, "load_state_dict", None)):
                fn.load_state_dict(saved)

    def _normalize(self, images):
        """uint8 images (0..255) or float images (0..1) -> normalised float32."""
        scale = self._scale_uint8 if images.dtype == torch.uint8 else self._scale_unit
        images = torch.addcmul(self._shift, images.float(), scale)
        if self.channels_last:
            # After the float conversion: on CPU, reordering uint8 is the slower one.
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def _add_extra_fields(self, batch):
        for name, fn in self.extra_fields.items():
            batch[name] = fn(batch["index"], batch["target"])
        return batch


class DeviceLoader(_EpochLoader):
    """Batches of an in-memory dataset, augmented on the device.

    The whole uint8 dataset is moved to ``device`` once. For an epoch, one
    permutation (seeded by ``(seed, epoch)``, the same on every rank) is
    split into DistributedSampler-style shards: padded by wrapping to a
    multiple of ``world_size``, then rank-strided. All crop offsets and flip
    bits of the rank's epoch are drawn up front (seeded by
    ``(seed, epoch, rank)``), so resuming at batch ``n`` costs nothing.

    Batches are dicts: ``image`` (float32, normalised), ``target`` (long),
    ``index`` (long, the sample's position in the dataset), plus the extra fields.
    Augmented batches also say which view each sample is: ``crop_offset``
    (long ``[B, 2]``, the row and column of the crop's corner in the padded
    image, ``0 .. 2 * CROP_PADDING``) and ``flip`` (bool ``[B]``), so that a
    sample's view can be named (the teacher cache keys logits by it).

    Iterating starts at :attr:`position` (0 after :meth:`set_epoch`, ``n``
    after loading a state taken after ``n`` batches) and returns to 0 once
    the epoch is finished. The evaluation mode (``train=False``) always
    yields its whole shard, in order.

    Args: see :func:`build_train_loader`; ``train`` selects the training
    (shuffled, padded shards) or evaluation (fixed order, disjoint unpadded
    blocks) behaviour.
    """

    def __init__(self, dataset, batch_size, device, *, mean, std, train=True, augment=True,
                 hflip=True, seed=0, rank=0, world_size=1, extra_fields=None,
                 channels_last=False, drop_last=False):
        super().__init__(batch_size, device, mean=mean, std=std, train=train, seed=seed,
                         rank=rank, world_size=world_size, extra_fields=extra_fields,
                         channels_last=channels_last, drop_last=drop_last)
        self.augment = augment and train
        self.hflip = hflip
        #: Crop offsets per axis when batches carry ``crop_offset`` and ``flip``; 0 if not.
        self.crop_span = 2 * CROP_PADDING + 1 if self.augment else 0
        self.images = dataset.images.to(self.device)
        self.targets = dataset.targets.to(self.device)
        self.dataset_size = len(dataset)
        if train:
            self.num_samples = math.ceil(self.dataset_size / world_size)
            self._block_begin = None
        else:
            begin, end = _shard_bounds(self.dataset_size, rank, world_size)
            self.num_samples = end - begin
            self._block_begin = begin
        height, width = self.images.shape[2:]
        self._rows = torch.arange(height, device=self.device)
        self._cols = torch.arange(width, device=self.device)
        self._reversed_cols = self._cols.flip(0)
        self._plan_epoch = None

    def __len__(self):
        return self._count_batches(self.num_samples)

    def _prepare(self):
        """Draw this epoch's order, crop offsets and flips (once per epoch)."""
        if self._plan_epoch == self.epoch:
            return
        if not self.train:
            begin = self._block_begin
            order = torch.arange(begin, begin + self.num_samples)
        else:
            # Drawn on the CPU: the same epoch gives the same batches on any device.
            generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.dataset_size, generator=generator)
            padding = self.num_samples * self.world_size - self.dataset_size
            if padding:
                repeats = math.ceil(padding / self.dataset_size)
                order = torch.cat([order, order.repeat(repeats)[:padding]])
            order = order[self.rank::self.world_size]
        self._order = order.to(self.device)
        if self.augment:
            generator = torch.Generator().manual_seed(
                mix_seed(self.seed, self.epoch, self.rank, 1))
            span = 2 * CROP_PADDING + 1
            self._offsets = torch.randint(0, span, (2, self.num_samples),
                                          generator=generator).to(self.device)
            self._flips = torch.randint(0, 2, (self.num_samples,),
                                        generator=generator).bool().to(self.device)
            if not self.hflip:
                self._flips.zero_()
        # Each extra view draws its own choices for the epoch from its own stream.
        self._view_plans = {
            name: {key: value.to(self.device) for key, value in view.plan(
                self.num_samples, torch.Generator().manual_seed(
                    mix_seed(self.seed, self.epoch, self.rank, 2 + number)),
                crop_span=2 * CROP_PADDING + 1, hflip=self.hflip).items()}
            for number, (name, view) in enumerate(self.image_views.items())} if self.train else {}
        self._plan_epoch = self.epoch

    def planned_views(self):
        """The samples and views of the batches this epoch has still to deliver
        (from :attr:`position`), in order: ``{"index", "crop_offset", "flip"}``.
        Augmented training loaders only (the teacher cache computes ahead with it)."""
        self._prepare()
        begin = self.position * self.batch_size
        end = min(len(self) * self.batch_size, self.num_samples)
        return {"index": self._order[begin:end], "crop_offset": self._offsets[:, begin:end].t(),
                "flip": self._flips[begin:end]}

    def render_views(self, index, crop_offset, flip):
        """The normalised images of samples ``index`` seen through ``(crop_offset,
        flip)``, bit for bit as a batch delivers them."""
        images = self._crop_and_flip(self.images.index_select(0, index), crop_offset.t(), flip)
        return self._normalize(images)

    def __iter__(self):
        self._prepare()
        start = self.position if self.train else 0
        for step in range(start, len(self)):
            if self.train:
                # Counted before the batch is handed out: a checkpoint taken
                # while it is in use resumes after it.
                self.position = step + 1
            yield self._batch(step)
        if self.train:
            self.position = 0

    def _batch(self, step):
        begin = step * self.batch_size
        end = min(begin + self.batch_size, self.num_samples)
        index = self._order[begin:end]
        if self.train:
            images = self.images.index_select(0, index)
            target = self.targets.index_select(0, index)
        else:   # a contiguous block: views, no copy
            first = self._block_begin + begin
            images = self.images[first:first + end - begin]
            target = self.targets[first:first + end - begin]
        views = {}
        if self.augment:
            offsets, flips = self._offsets[:, begin:end], self._flips[begin:end]
            images = self._crop_and_flip(images, offsets, flips)
            views = {"crop_offset": offsets.t(), "flip": flips}
        batch = {"image": self._normalize(images), "target": target, "index": index, **views}
        for name, view in self.image_views.items():
            plan = {key: value[begin:end] for key, value in self._view_plans[name].items()}
            batch[name] = self._normalize(view.render(self.images.index_select(0, index), plan,
                                                      self._crop_and_flip))
        return self._add_extra_fields(batch)

    def _crop_and_flip(self, images, offsets, flips):
        """Per-sample random crop of the zero-padded image, then a horizontal flip.

        The same result as torchvision's ``RandomCrop(size, padding=4)`` and
        ``RandomHorizontalFlip()`` on each PIL image: the padding is zeros in
        uint8 space, before normalisation. One ``gather`` for the whole batch.
        """
        count, channels, height, width = images.shape
        padded = F.pad(images, (CROP_PADDING,) * 4)
        padded_width = width + 2 * CROP_PADDING
        rows = offsets[0, :, None] + self._rows                               # [B, H]
        cols = offsets[1, :, None] + torch.where(flips[:, None], self._reversed_cols,
                                                 self._cols)                  # [B, W]
        flat = (rows[:, :, None] * padded_width + cols[:, None, :]).view(count, 1, -1)
        pixels = padded.view(count, channels, -1).gather(2, flat.expand(-1, channels, -1))
        return pixels.view(count, channels, height, width)


class _BlockSampler(Sampler):
    """This rank's contiguous, unpadded block of ``range(num_samples)``."""

    def __init__(self, num_samples, rank, world_size):
        self.begin, self.end = _shard_bounds(num_samples, rank, world_size)

    def __iter__(self):
        return iter(range(self.begin, self.end))

    def __len__(self):
        return self.end - self.begin


class _ResumableSampler(Sampler):
    """Wraps a sampler and skips its first ``skip`` indices (mid-epoch resume)."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.skip = 0

    def set_epoch(self, epoch):
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self):
        return len(self.sampler)


class TorchLoader(_EpochLoader):
    """A ``torch.utils.data.DataLoader`` with the :class:`DeviceLoader` interface.

    Training shuffles with a DistributedSampler (also for one process, so the
    order depends only on ``(seed, epoch)``); evaluation reads a contiguous
    unpadded block per rank. Batches move to the device (``non_blocking``
    from pinned memory on CUDA) and uint8 images are normalised there.
    Resuming mid-epoch skips the delivered batches' indices in the sampler;
    the workers' augmentation draws are not replayed exactly.
    """

    def __init__(self, dataset, batch_size, device, *, mean, std, train=True, seed=0, rank=0,
                 world_size=1, extra_fields=None, channels_last=False, num_workers=2,
                 drop_last=False):
        super().__init__(batch_size, device, mean=mean, std=std, train=train, seed=seed,
                         rank=rank, world_size=world_size, extra_fields=extra_fields,
                         channels_last=channels_last, drop_last=drop_last)
        if self.image_views:
            raise UserError(f"the extra view(s) {', '.join(self.image_views)} (e.g. MLKD's strong "
                            f"view) need an in-memory dataset (cifar100, digits, synthetic), "
                            f"not a folder dataset")
        if train:
            inner = DistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                       shuffle=True, seed=seed)
        else:
            inner = _BlockSampler(len(dataset), rank, world_size)
        self.sampler = _ResumableSampler(inner)
        self.loader = DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=num_workers > 0,
            drop_last=self.drop_last,
            generator=torch.Generator().manual_seed(mix_seed(seed, rank)))

    def __len__(self):
        return self._count_batches(len(self.sampler))

    def set_epoch(self, epoch):
        super().set_epoch(epoch)
        self.sampler.set_epoch(self.epoch)

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.sampler.set_epoch(self.epoch)

    def __iter__(self):
        start = self.position if self.train else 0
        self.sampler.skip = start * self.batch_size
        for step, batch in enumerate(self.loader, start):
            if self.train:
                self.position = step + 1
            yield self._to_device(batch)
        self.sampler.skip = 0
        if self.train:
            self.position = 0

    def _to_device(self, batch):
        moved = {name: value.to(self.device, non_blocking=True) if torch.is_tensor(value)
                 else value for name, value in batch.items()}
        moved["image"] = self._normalize(moved["image"])
        moved["target"] = moved["target"].long()
        moved["index"] = moved["index"].long()
        return self._add_extra_fields(moved)
