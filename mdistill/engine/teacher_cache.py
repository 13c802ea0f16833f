"""An exact cache of a frozen teacher's logits, per training sample and view.

Why: with CIFAR-style augmentation (a crop at one of 9 x 9 offsets of the
zero-padded image, and a horizontal flip) a sample has only 162 possible
views, and a frozen teacher answers each of them the same way every time.
Over a 240-epoch run a sample is seen about 125 distinct ways, and every
seed and every logit method of a table asks the teacher the same questions
again. The cache keeps the answers, so the teacher's forward, the larger part
of a step, is done once per view instead of once per step.

What it stores: one file per key under DISTILLER.TEACHER_CACHE. The key is
everything the logits depend on: the teacher's weights (a hash of its state
dict) and code (a hash of the source of its modules' classes), the training
images (a hash of their bytes), the augmentation (padding, normalisation,
memory format), the precision (AMP and the logits' dtype), the machine
(processor or GPU model) and the libraries (torch, torchvision and timm
versions). Another key
is another file, so a mismatch starts a new file and never reads a wrong one.

The file is a header followed by two fixed-size arrays, memory-mapped: a
checksum per (sample, view) entry (0: empty) and the logits of each entry,
in their own dtype, so a hit returns the very bits the teacher computed.
Space is reserved sparsely: only entries written take disk space.

Concurrency and crashes: writers take an exclusive ``fcntl`` lock and write
an entry's logits before its checksum; a reader takes no lock and accepts an
entry only if its checksum matches its logits. So two runs may fill one file
at the same time, and a crash (of the process or of the machine) mid-write
loses at most the entries being written: a torn or half-persisted entry
fails its checksum and is computed again.

Exactness: every teacher forward the cache runs has the shape of a training
batch. At the start of each epoch (:meth:`TeacherCache.prefill`) the views
the epoch will ask for and the file lacks are computed in chunks of the
per-process batch size (the last chunk padded by repeating rows), so every
step then finds its logits stored; a batch that still misses one (another
run's torn entry) is computed whole, as without the cache. A sample's logits
do not depend on the other samples of its forward (tested on the CPU), but
they may depend on the forward's size: for a few rows oneDNN and MKL take
other code paths (PyTorch runs a single-sample 3x3 convolution through its
native kernel; MKL's matrix product sums in another order below about 12
rows with 2 threads), which give other bits. The batch size is therefore
part of the key, and in deterministic CPU mode a run with a cold, warm or
partly warm cache ends with exactly the student weights of a run without it
(``tests/test_teacher_cache.py``). The exception is an epoch's last batch
when it is smaller than the others and small enough for those code paths:
the live teacher computes it at its own size, the cache at the batch size.
"""
import fcntl
import hashlib
import inspect
import json
import os
import sys
from importlib import metadata

import numpy as np
import torch

from ..data import ImageTensorDataset
from ..data.loaders import CROP_PADDING
from ..errors import UserError
from .trainer import AMP_DTYPES

#: Bumped when the file layout or the way entries are computed changes.
FORMAT = 1
MAGIC = b"mdistill teacher cache\n"
HEADER_BYTES = 4096
# Checksums are sums of the entry's bits with these weights, modulo a prime below 2**31.
_PRIME = 2147483629
# Raw integer storage of each logits dtype (same item size; numpy has no bfloat16).
_RAW = {torch.float32: (torch.int32, np.int32, 0xFFFFFFFF),
        torch.bfloat16: (torch.int16, np.int16, 0xFFFF),
        torch.float16: (torch.int16, np.int16, 0xFFFF)}


class TeacherCache:
    """The teacher's logits per ``(sample index, view)``, kept in a file.

    A view is a crop offset ``(row, column)`` in ``0 .. span - 1`` and a flip
    bit. Use :func:`build_teacher_cache` to open the cache of an experiment;
    the distiller calls :meth:`logits` from ``teacher_forward``.

    Args:
        folder: where the cache files live (created if missing).
        key: a JSON-serialisable dict of everything the logits depend on.
        num_samples: training samples (the sample index's range).
        span: crop offsets per axis (9 for 4-pixel padding).
        num_classes: logits per entry.
        dtype: the logits' dtype (float32, bfloat16 or float16).
    """

    def __init__(self, folder, key, num_samples, span, num_classes, dtype):
        if dtype not in _RAW:
            raise UserError(f"DISTILLER.TEACHER_CACHE: cannot store logits of dtype {dtype}")
        self.num_samples, self.span, self.num_classes = num_samples, span, num_classes
        self.num_views = span * span * 2
        self.dtype = dtype
        raw_torch, raw_numpy, self._mask = _RAW[dtype]
        self.header = {"format": FORMAT, "key": key, "num_samples": num_samples,
                       "num_views": self.num_views, "num_classes": num_classes,
                       "dtype": str(dtype)}
        text = json.dumps(self.header, sort_keys=True)
        digest = hashlib.sha256(text.encode()).hexdigest()[:24]
        entries = num_samples * self.num_views
        check_bytes = _round_up(entries * 4, 4096)
        self.file_bytes = HEADER_BYTES + check_bytes + entries * num_classes * raw_numpy().itemsize
        try:
            os.makedirs(folder, exist_ok=True)
            self.path = os.path.join(folder, f"teacher-{digest}.bin")
            if not os.path.exists(self.path):
                self._create(text)
            self._check_header(text)
            self._fd = os.open(self.path, os.O_RDWR)
            checks = np.memmap(self.path, dtype=np.int32, mode="r+", offset=HEADER_BYTES,
                               shape=(entries,))
            logits = np.memmap(self.path, dtype=raw_numpy, mode="r+",
                               offset=HEADER_BYTES + check_bytes, shape=(entries, num_classes))
        except OSError as error:
            raise UserError(f"DISTILLER.TEACHER_CACHE {folder}: cannot use the cache file "
                            f"({error.strerror or error})") from None
        self._maps = (checks, logits)
        self._checks = torch.from_numpy(checks)
        self._logits = torch.from_numpy(logits)           # raw bits, viewed as dtype on read
        generator = torch.Generator().manual_seed(FORMAT)
        self._weights = torch.randint(1, 1 << 16, (num_classes,), generator=generator)
        self._raw_dtype = raw_torch
        self.reset_counts()

    # ------------------------------------------------------------------ file
    def _create(self, text):
        """Write the header and reserve the arrays (sparsely) in a temporary file,
        then give it its name without replacing a file another run made meanwhile."""
        temporary = f"{self.path}.tmp{os.getpid()}"
        header = MAGIC + text.encode() + b"\n"
        if len(header) > HEADER_BYTES:
            raise UserError("DISTILLER.TEACHER_CACHE: the cache key is too long")
        try:
            with open(temporary, "wb") as handle:
                handle.write(header.ljust(HEADER_BYTES, b"\0"))
                handle.truncate(self.file_bytes)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(temporary, self.path)       # fails if the name exists: no clobbering
            except FileExistsError:
                pass
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)

    def _check_header(self, text):
        with open(self.path, "rb") as handle:
            header = handle.read(HEADER_BYTES)
            size = os.fstat(handle.fileno()).st_size
        expected = MAGIC + text.encode() + b"\n"
        if not header.startswith(expected) or size != self.file_bytes:
            raise UserError(f"DISTILLER.TEACHER_CACHE: {self.path} is not the cache it is "
                            f"named for (damaged or truncated); delete it")

    def close(self):
        """Flush the written entries to disk and release the file."""
        if self._fd is None:
            return
        for array in self._maps:
            array.flush()
        os.close(self._fd)
        self._fd = None

    # ------------------------------------------------------------- entries
    def entry_ids(self, index, crop_offset, flip):
        """Flat entry numbers of samples ``index`` seen through ``(crop_offset, flip)``."""
        index, crop_offset, flip = index.cpu(), crop_offset.cpu(), flip.cpu()
        view = (crop_offset[:, 0] * self.span + crop_offset[:, 1]) * 2 + flip.long()
        return index.long() * self.num_views + view

    def _checksums(self, raw):
        values = raw.long() & self._mask
        return ((values * self._weights).sum(dim=1) % _PRIME).bitwise_or(1).int()

    def read(self, ids):
        """``(logits [N, C] of the cache dtype, hit [N] bool)``; rows that miss are garbage."""
        raw = self._logits.index_select(0, ids)
        hit = self._checks.index_select(0, ids) == self._checksums(raw)
        return raw.view(self.dtype), hit

    def write(self, ids, logits):
        """Store ``logits`` (``[N, C]``, the cache dtype) for entries ``ids``."""
        raw = logits.detach().to("cpu", self.dtype).contiguous().view(self._raw_dtype)
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            self._logits[ids] = raw                    # the logits first, their checksum last
            self._checks[ids] = self._checksums(raw)
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        self.written += int(ids.numel())

    # --------------------------------------------------------------- lookup
    def logits(self, teacher, image, batch):
        """The teacher's logits for a training batch, from the cache if it has them all.

        Args:
            teacher: the frozen teacher; ``teacher(x)[0]`` are logits.
            image: the batch's images, as the loader delivered them.
            batch: the batch's ``index``, ``crop_offset`` and ``flip`` fields.

        Returns:
            ``[B, C]`` logits on ``image``'s device, bit for bit what the
            teacher computes on this batch (see the module docstring).
        """
        ids = self.entry_ids(batch["index"], batch["crop_offset"], batch["flip"])
        cached, hit = self.read(ids)
        self.step_views += ids.numel()
        if bool(hit.all()):
            return cached.to(image.device, non_blocking=True)
        # A miss: the whole batch, as the live teacher computes it (see the module docstring).
        fresh = teacher(image)[0]
        self.step_misses += int((~hit).sum())
        self.teacher_rows += ids.numel()
        self.write(ids[~hit], fresh[(~hit).to(fresh.device)])
        return fresh

    def prefill(self, teacher, loader, autocast):
        """Compute and store, ahead, the views the loader's epoch has still to deliver
        and the file lacks, in forwards of the loader's batch size.

        Args:
            teacher: the frozen teacher.
            loader: a :class:`~mdistill.data.DeviceLoader` at the epoch (and position)
                about to be iterated.
            autocast: ``() -> context`` of the training forward (the run's AMP).
        """
        views = loader.planned_views()
        ids = self.entry_ids(views["index"], views["crop_offset"], views["flip"])
        _, hit = self.read(ids)
        missing = (~hit).nonzero().flatten()
        # A view planned twice (a sample repeated to fill the last shard) is computed once.
        unique_ids, inverse = torch.unique(ids[missing], return_inverse=True)
        first = torch.full((unique_ids.numel(),), missing.numel()).scatter_reduce(
            0, inverse, torch.arange(missing.numel()), "amin")
        missing = missing[first]
        self.planned += ids.numel()
        self.stored_hits += int(hit.sum())
        size = loader.batch_size
        for chunk in missing.split(size) if missing.numel() else ():
            # The last chunk padded by repeating its rows: every forward has ``size`` rows.
            rows = chunk.repeat(-(-size // chunk.numel()))[:size].to(views["index"].device)
            images = loader.render_views(views["index"][rows], views["crop_offset"][rows],
                                         views["flip"][rows])
            with torch.no_grad(), autocast():
                logits = teacher(images)[0]
            self.write(ids[chunk], logits[:chunk.numel()])
            self.teacher_rows += size
            self.computed += chunk.numel()

    # ---------------------------------------------------------------- report
    def reset_counts(self):
        """Start counting afresh (each epoch): views planned by :meth:`prefill`, those
        already stored and those computed, views looked up by steps and their misses,
        and the rows the teacher ran on."""
        self.planned = self.stored_hits = self.computed = 0
        self.step_views = self.step_misses = self.teacher_rows = self.written = 0

    def stored_entries(self):
        """Entries filled so far (by any run sharing the file)."""
        return int(self._checks.count_nonzero())

    def disk_bytes(self):
        """Bytes the file takes on disk (it is sparse: entries not written take none)."""
        stat = os.stat(self.path)
        return getattr(stat, "st_blocks", 0) * 512 or stat.st_size

    def epoch_report(self):
        """``(text, stats)`` of the work since :meth:`reset_counts`, then resets them."""
        stats = {"planned": self.planned, "hits": self.stored_hits, "computed": self.computed,
                 "hit_rate": self.stored_hits / max(self.planned, 1),
                 "step_views": self.step_views, "step_misses": self.step_misses,
                 "teacher_rows": self.teacher_rows, "stored": self.stored_entries(),
                 "capacity": self.num_samples * self.num_views,
                 "disk_mb": self.disk_bytes() / 2 ** 20}
        text = (f"teacher cache: {100 * stats['hit_rate']:.1f}% hits ({self.stored_hits:,} of "
                f"the epoch's {self.planned:,} views stored; the teacher ran on "
                f"{self.teacher_rows:,} rows), {stats['stored']:,} of {stats['capacity']:,} "
                f"views stored, {stats['disk_mb']:.1f} MB")
        self.reset_counts()
        return text, stats


def remembered(folder, key, compute):
    """``compute()``'s JSON-serialisable result, kept in ``folder`` under ``key`` (a
    JSON-serialisable description of everything the result depends on) and
    returned from there by later runs with the same key; a file that cannot be
    read or written is computed again (the result is the same, only slower)."""
    text = json.dumps(key, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:24]
    path = os.path.join(folder, f"teacher-test-{digest}.json")
    try:
        with open(path) as handle:
            saved = json.load(handle)
        if saved.get("key") == json.loads(text):
            return saved["result"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    result = compute()
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(folder, exist_ok=True)
        with open(temporary, "w") as handle:
            json.dump({"key": json.loads(text), "result": result}, handle)
        os.replace(temporary, path)
    except OSError:
        pass                # not remembered: computed again next time
    return result


def teacher_test_key(cfg, teacher, name, data, device):
    """What a teacher's test-set evaluation depends on: its weights and code, the
    test images and labels and how they are fed (normalisation, batch, resize,
    memory format),
    and the machine (other hardware or versions may round differently)."""
    test = data.test
    return {"teacher": {"arch": name, "weights": teacher_fingerprint(teacher),
                        "code": code_fingerprint(teacher)},
            "test": {"images": data_fingerprint(test.images),
                     "targets": data_fingerprint(torch.as_tensor(test.targets)),
                     "shape": list(test.images.shape), "mean": list(data.mean),
                     "std": list(data.std),
                     "batch_size": cfg.DATASET.TEST.BATCH_SIZE, "resize": cfg.DATASET.RESIZE,
                     "channels_last": cfg.SOLVER.CHANNELS_LAST},
            "machine": {"device": machine_name(device), "torch": torch.__version__,
                        "torchvision": installed_version("torchvision"),
                        "timm": installed_version("timm")}}


def _round_up(value, multiple):
    return -(-value // multiple) * multiple


# ---------------------------------------------------------------------- key
def _hash_tensor(hasher, tensor):
    tensor = tensor.detach().cpu().contiguous()
    hasher.update(f"{tensor.dtype} {tuple(tensor.shape)}\n".encode())
    hasher.update(tensor.view(-1).view(torch.uint8).numpy() if tensor.numel() else b"")


def teacher_fingerprint(teacher):
    """SHA-256 of the teacher's state dict: names, dtypes, shapes and bytes."""
    hasher = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        hasher.update(name.encode() + b"\n")
        _hash_tensor(hasher, tensor)
    return hasher.hexdigest()


def code_fingerprint(model):
    """SHA-256 of the code of every class among ``model.modules()``.

    Each class counts by its qualified name and the source of the module file
    that defines it (a helper function beside the class can change its
    forward too), or the class's own source, or its name alone where no source
    can be read (a class defined interactively or compiled).
    """
    hasher = hashlib.sha256()
    classes = {type(module) for module in model.modules()}
    for cls in sorted(classes, key=lambda cls: (cls.__module__, cls.__qualname__)):
        source = ""
        for owner in (sys.modules.get(cls.__module__), cls):
            try:
                source = inspect.getsource(owner)
                break
            except (OSError, TypeError):
                continue
        hasher.update(f"{cls.__module__}.{cls.__qualname__}\n".encode())
        hasher.update(hashlib.sha256(source.encode()).digest())
    return hasher.hexdigest()


def installed_version(package):
    """The installed version of ``package`` (a distribution name), or None."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def data_fingerprint(images):
    """SHA-256 of the training images (uint8 ``[N, 3, H, W]``), in dataset order."""
    hasher = hashlib.sha256()
    _hash_tensor(hasher, images)
    return hasher.hexdigest()


def machine_name(device):
    """The processor or GPU model: other hardware may round differently."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


@torch.no_grad()
def probe_logits(teacher, image_shape, device, amp_dtype, channels_last):
    """``(num_classes, dtype)`` of the teacher's logits under the run's autocast."""
    image = torch.zeros(2, *image_shape, device=device)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                        enabled=amp_dtype is not None):
        logits = teacher(image)[0]
    return logits.shape[1], logits.dtype


def build_teacher_cache(cfg, distiller, data, train_loader, device):
    """Open the teacher cache DISTILLER.TEACHER_CACHE asks for, if it can serve this run.

    Returns:
        ``(cache or None, note)``: the note says whether the cache is on (its
        file and size) or why the live teacher is used; empty when the cache
        was not asked for.
    """
    folder = cfg.DISTILLER.TEACHER_CACHE
    if not folder:
        return None, ""
    if distiller.teacher is None:
        return None, f"teacher cache: off (method {cfg.DISTILLER.TYPE} has no teacher)"
    if len(distiller.teacher_models()) > 1:
        return None, "teacher cache: off (several teachers; the live teachers are used)"
    if not distiller.teacher_logits_only:
        return None, (f"teacher cache: off (method {cfg.DISTILLER.TYPE} uses more of the "
                      f"teacher than its logits; the live teacher is used)")
    span = getattr(train_loader, "crop_span", 0)
    if not span or not isinstance(data.train, ImageTensorDataset):
        return None, ("teacher cache: off (the training augmentation is not CIFAR-style "
                      "discrete crops and flips; the live teacher is used)")
    images = data.train.images
    num_classes, dtype = probe_logits(distiller.teacher, tuple(images.shape[1:]), device,
                                      AMP_DTYPES[cfg.SOLVER.AMP], cfg.SOLVER.CHANNELS_LAST)
    key = {"teacher": {"arch": cfg.DISTILLER.TEACHER,
                       "weights": teacher_fingerprint(distiller.teacher),
                       # Another version of the model's code may compute other logits.
                       "code": code_fingerprint(distiller.teacher)},
           "data": {"images": data_fingerprint(images), "shape": list(images.shape)},
           "augmentation": {"crop_padding": CROP_PADDING, "mean": list(data.mean),
                            "std": list(data.std), "channels_last": cfg.SOLVER.CHANNELS_LAST},
           "precision": {"amp": cfg.SOLVER.AMP},
           "machine": {"device": machine_name(device), "torch": torch.__version__,
                       "torchvision": installed_version("torchvision"),
                       "timm": installed_version("timm")},
           # Logits may depend on the forward's size (see the module docstring).
           "batch_size": train_loader.batch_size}
    cache = TeacherCache(folder, key, len(images), span, num_classes, dtype)
    note = (f"teacher cache: on, {cache.path} ({cache.stored_entries():,} of "
            f"{cache.num_samples * cache.num_views:,} views stored, "
            f"{cache.disk_bytes() / 2 ** 20:.1f} MB)")
    return cache, note
