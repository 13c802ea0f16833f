"""Where a method's teacher outputs come from: one object, built by the builder.

A method asks ``self.teacher_forward(image)`` for ``(logits, feats)`` and
never learns where they come from. The answer is a :class:`TeacherSource`:

* :class:`LiveTeacher`: one frozen teacher, run on the batch;
* :class:`CachedTeacher`: one teacher whose logits for the training batch's
  own views come from the teacher cache (DISTILLER.TEACHER_CACHE);
* :class:`ProbabilityEnsemble`: several teachers whose softened predictions
  are averaged at the one temperature the method declares (``mean_probs``);
* :class:`LossEnsemble`: several teachers, one pass of the method per teacher,
  the losses averaged (``mean_loss``).

Which one serves a run is decided before the first step, from what the method
declares (:attr:`~mdistill.distillers.base.Distiller.teacher_reads`,
:meth:`~mdistill.distillers.base.Distiller.teacher_temperatures`): see
:func:`check_teacher_source`. A combination that cannot be served is refused
there with one line naming the keys, never served approximately.

The teachers are plain attributes of the source, not submodules of the
distiller: they are outside its state dict, its optimizers, its train/eval
switches and DistributedDataParallel by construction.

Every teacher forward has the shape of a full training batch: a smaller batch
(an epoch's last) is padded by repeating its rows and the padding dropped,
because a forward's size may change a row's bits on the CPU (oneDNN and MKL
take other paths for a few rows) and the teacher cache computes full batches.
So a run with a cold, warm or no cache computes the same logits.
"""
import math

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from ..config import CHOICES
from ..errors import UserError, unknown_choice
from ..utils.batchnorm import batch_statistics as batch_statistics_of

#: DISTILLER.TEACHER_REDUCE: how several teachers are combined.
TEACHER_REDUCTIONS = CHOICES["DISTILLER.TEACHER_REDUCE"]


def freeze(teacher):
    """Eval mode and no gradients: a teacher never trains."""
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def pad_rows(image, rows):
    """``image`` with its rows repeated cyclically up to ``rows`` (unchanged if it has
    as many or more): the padding :meth:`TeacherCache.prefill` uses."""
    count = image.shape[0]
    if rows <= count or count == 0:
        return image
    index = torch.arange(rows, device=image.device) % count
    padded = image.index_select(0, index)
    if image.is_contiguous(memory_format=torch.channels_last) and image.dim() == 4:
        padded = padded.contiguous(memory_format=torch.channels_last)
    return padded


def _first_rows(outputs, count):
    """``(logits, feats)`` of a padded forward cut back to its first ``count`` rows
    (every tensor inside; containers keep their types)."""
    return tree_map(lambda value: value[:count] if torch.is_tensor(value) else value, outputs)


def average_softened_logits(teacher_logits, temperature):
    """Logits whose softmax at ``temperature`` is the mean of the teachers'.

    ``T * log(mean_k softmax(z_k / T))``, in fp32: a loss that softens these
    logits at T sees the ensemble's averaged prediction.

    Args:
        teacher_logits: a list of ``[B, C]`` logits, one per teacher.
        temperature: T.
    """
    stacked = torch.stack([logits.float() for logits in teacher_logits])
    log_probs = F.log_softmax(stacked / temperature, dim=-1)
    return temperature * (torch.logsumexp(log_probs, dim=0) - math.log(len(teacher_logits)))


class TeacherSource:
    """The frozen teachers of a run and how their outputs reach the method.

    Args:
        teachers: the models, in DISTILLER.TEACHERS order (one for a single teacher).
        feature_index: the teacher whose feature maps are served (DISTILLER.FEATURE_TEACHER).
        batch_rows: the training batch's rows per process: smaller forwards are
            padded to it (see the module docstring); 0 pads nothing.
    """

    #: One pass of the method per step; :class:`LossEnsemble` has one per teacher.
    passes = 1

    def __init__(self, teachers, feature_index=0, batch_rows=0):
        self.models = [freeze(teacher) for teacher in teachers]
        self.feature_index = feature_index
        self.batch_rows = batch_rows

    @property
    def feature_teacher(self):
        """The teacher whose feature maps are served."""
        return self.models[self.feature_index]

    def run(self, teacher, image, batch_statistics=False):
        """``teacher(image)`` without autograd, padded to a training batch's rows.

        ``batch_statistics``: the teacher's BatchNorms normalise with the batch's
        statistics (their running ones untouched), as OFD's authors run it; the
        batch is then not padded, since padding would change its statistics.
        """
        with torch.no_grad():
            if batch_statistics:
                with batch_statistics_of(teacher):
                    return teacher(image)
            count = image.shape[0]
            if count >= self.batch_rows:
                return teacher(image)
            return _first_rows(teacher(pad_rows(image, self.batch_rows)), count)

    def __call__(self, image, batch=None, batch_statistics=False):
        """The teacher's ``(logits, feats)`` for ``image``.

        Args:
            image: a batch of images (the training batch's or another view).
            batch: the training batch's fields (``index``, ``crop_offset``,
                ``flip``, ``image``) or None.
            batch_statistics: see :meth:`run`.
        """
        return self.run(self.feature_teacher, image, batch_statistics)

    def select(self, index):
        """Make teacher ``index`` the one served (the passes of :class:`LossEnsemble`)."""

    def before_epoch(self, loader, autocast):
        """Work ahead of an epoch (the cache's prefill)."""

    def epoch_report(self):
        """``(text, stats)`` of the epoch's work, or None."""
        return None

    @property
    def cache(self):
        """The :class:`~mdistill.engine.teacher_cache.TeacherCache`, or None."""
        return None

    def describe(self):
        """One line for the run's log."""
        return "one teacher"


class LiveTeacher(TeacherSource):
    """One teacher, run on every batch."""


class CachedTeacher(TeacherSource):
    """One teacher whose logits for the training batch's own views come from
    the teacher cache; other tensors (a second view, a slice) go to the teacher.
    Serves logits only: feats are empty.

    Args:
        teacher: the model.
        cache: an open :class:`~mdistill.engine.teacher_cache.TeacherCache`.
        batch_rows: as :class:`TeacherSource`.
    """

    def __init__(self, teacher, cache, batch_rows=0):
        super().__init__([teacher], 0, batch_rows)
        self._cache = cache

    @property
    def cache(self):
        return self._cache

    def __call__(self, image, batch=None, batch_statistics=False):
        teacher = self.feature_teacher
        if batch is None or batch.get("image") is not image or "crop_offset" not in batch:
            return self.run(teacher, image, batch_statistics)
        with torch.no_grad():
            return self._cache.logits(lambda views: self.run(teacher, views), image, batch), {}

    def before_epoch(self, loader, autocast):
        self._cache.prefill(self.feature_teacher, loader, autocast)

    def epoch_report(self):
        return self._cache.epoch_report()

    def describe(self):
        return f"one teacher, logits from the cache {self._cache.path}"


class ProbabilityEnsemble(TeacherSource):
    """Several teachers whose predictions softened at ``temperature`` are averaged:
    the logits served are ``T * log(mean_k softmax(z_k / T))``
    (:func:`average_softened_logits`); the feats are the feature teacher's.

    Args:
        teachers, feature_index, batch_rows: as :class:`TeacherSource`.
        temperature: the one temperature at which the method softens the
            teacher's logits (its :meth:`teacher_temperatures`).
    """

    def __init__(self, teachers, feature_index=0, batch_rows=0, temperature=1.0):
        super().__init__(teachers, feature_index, batch_rows)
        self.temperature = float(temperature)

    def __call__(self, image, batch=None, batch_statistics=False):
        outputs = [self.run(teacher, image, batch_statistics) for teacher in self.models]
        logits = average_softened_logits([logits for logits, _ in outputs], self.temperature)
        return logits, outputs[self.feature_index][1]

    def describe(self):
        return (f"{len(self.models)} teachers, softened predictions averaged at "
                f"T={self.temperature:g} (mean_probs)")


class LossEnsemble(TeacherSource):
    """Several teachers; the method runs once per teacher (the student's forward
    once, its outputs reused) and the distillation losses are averaged."""

    def __init__(self, teachers, feature_index=0, batch_rows=0):
        super().__init__(teachers, feature_index, batch_rows)
        self.passes = len(self.models)
        self.current = feature_index

    def select(self, index):
        self.current = self.feature_index if index is None else index

    def __call__(self, image, batch=None, batch_statistics=False):
        return self.run(self.models[self.current], image, batch_statistics)

    def describe(self):
        return f"{len(self.models)} teachers, one pass each, losses averaged (mean_loss)"


def check_teacher_source(method, reduce, num_teachers, has_phases):
    """Refuse, before the first step, several teachers a method cannot use.

    Args:
        method: the built distiller (its declarations are read).
        reduce: DISTILLER.TEACHER_REDUCE.
        num_teachers: how many teachers DISTILLER.TEACHERS names (1 without).
        has_phases: whether the method trains modules of its own in extra phases.

    Returns:
        The temperature ``mean_probs`` averages at (None otherwise).

    Raises:
        UserError: one line naming the keys and the method.
    """
    if reduce not in TEACHER_REDUCTIONS:
        raise unknown_choice("value for DISTILLER.TEACHER_REDUCE:", reduce, TEACHER_REDUCTIONS)
    if num_teachers <= 1:
        return None
    name, reads = type(method).__name__, set(method.teacher_reads)
    if "logits" not in reads:
        raise UserError(f"DISTILLER.TEACHERS: {name} reads the teacher's "
                        f"{', '.join(sorted(reads))} and no logits, so one teacher serves it; "
                        f"set DISTILLER.TEACHER (several teachers serve methods that read logits)")
    if reduce == "mean_loss":
        if reads != {"logits"}:
            raise UserError(f"DISTILLER.TEACHER_REDUCE mean_loss averages per-teacher losses of "
                            f"methods that read only the teachers' logits; {name} also reads "
                            f"{', '.join(sorted(reads - {'logits'}))} (use mean_probs)")
        if has_phases:
            raise UserError(f"DISTILLER.TEACHER_REDUCE mean_loss: {name} trains a module of its "
                            f"own on what one pass saw, so several passes cannot be averaged "
                            f"(use mean_probs, or DISTILLER.TEACHER)")
        return None
    temperatures = method.teacher_temperatures()
    if not temperatures or len(set(temperatures)) != 1:
        how = (f"at the temperatures {', '.join(f'{t:g}' for t in temperatures)}"
               if temperatures else "otherwise than softened at one fixed temperature")
        raise UserError(f"DISTILLER.TEACHER_REDUCE mean_probs averages the teachers' predictions "
                        f"at one temperature; {name} reads the teacher's logits {how}: use "
                        f"mean_loss" + ("" if reads == {"logits"} and not has_phases
                                        else " with a method that reads only logits"))
    return float(temperatures[0])


def build_teacher_source(method, teachers, reduce="mean_probs", feature_index=0,
                         cache=None, batch_rows=0):
    """The :class:`TeacherSource` that serves ``method``, or a UserError.

    Args:
        method: the built distiller.
        teachers: the frozen models (a list; one for a single teacher).
        reduce: DISTILLER.TEACHER_REDUCE (used with several teachers).
        feature_index: DISTILLER.FEATURE_TEACHER.
        cache: an open teacher cache for a single teacher, or None.
        batch_rows: the per-process training batch size.
    """
    temperature = check_teacher_source(method, reduce, len(teachers),
                                       bool(method.extra_phases()))
    if len(teachers) == 1:
        if cache is not None:
            return CachedTeacher(teachers[0], cache, batch_rows)
        return LiveTeacher(teachers, 0, batch_rows)
    if reduce == "mean_loss":
        return LossEnsemble(teachers, feature_index, batch_rows)
    return ProbabilityEnsemble(teachers, feature_index, batch_rows, temperature)
