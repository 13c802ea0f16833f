"""The Distiller base class: what every method declares to the one trainer."""
import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from ..config import CHOICES
from ..errors import UserError, unknown_choice


class Distiller(nn.Module):
    """A student trained against a frozen teacher.

    Subclasses implement :meth:`forward_train` and a ``from_config``
    classmethod that maps config keys to constructor keyword arguments.
    Everything that makes a method special is declared here and read by the
    trainer, which never names a method:

    * extra trainable modules: plain submodules (not the teacher) are
      optimised with the student and saved in the run checkpoint;
    * extra batch fields: :meth:`extra_batch_fields` (CRD's negatives);
    * a second optimizer and the phase that steps it: :meth:`auxiliary_optimizers`
      and :meth:`extra_phases` (a GAN discriminator); the trainer runs the phase
      after the student's update, schedules the optimizer and checkpoints it;
    * state committed only after an accepted step: :meth:`after_step` (CRD's
      memory banks), fed by what :meth:`forward_train` put aside with :meth:`stash`;
    * state that distributed training must not broadcast or reduce:
      :meth:`ddp_ignored_names` (memory banks, the discriminator);
    * a loss warm-up: :meth:`warmup_factor`;
    * training stages before the distillation itself (RepDistiller's
      initialisation of FSP, AB and FT): :meth:`stages`; the current one's
      name is :attr:`stage`;
    * per-step diagnostics: :meth:`pop_diagnostics`.

    Several teachers (:meth:`set_teachers`): ``self.teacher`` stays the one the
    method was built with (the feature teacher); methods with
    ``teacher_logits_only`` get the ensemble's logits from :meth:`teacher_forward`.

    The step protocol: ``forward_train`` only computes. It takes no optimizer
    step and writes no parameter, buffer or memory (BatchNorm's running
    statistics excepted: the trainer restores them when it skips a step), so a
    step the trainer rejects (a non-finite loss) leaves everything as it was.
    The trainer owns every backward and every optimizer step (the rule is
    SOLVER.TRAINER: one backward of the summed losses, or DOT's two).

    Example::

        @DISTILLERS.register("MINE")
        class Mine(Distiller):
            def __init__(self, student, teacher, weight=1.0):
                super().__init__(student, teacher)
                self.weight = weight

            @classmethod
            def from_config(cls, cfg, student, teacher, data_info=None):
                return cls(student, teacher, weight=cfg.MINE.WEIGHT)

            def forward_train(self, image, target, **batch):
                logits, _ = self.student(image)
                with torch.no_grad():
                    teacher_logits, _ = self.teacher(image)
                return logits, {"loss_ce": F.cross_entropy(logits, target),
                                "loss_mine": self.weight * (logits - teacher_logits).pow(2).mean()}

    Args:
        student: the model being trained; ``student(x)`` returns ``(logits, feats)``.
        teacher: the frozen model, or None for methods without one (with several
            teachers: the one whose features the method uses, see :meth:`set_teachers`).
    """

    #: False for methods that train the student alone (the teacher is not built).
    requires_teacher = True
    #: What the method reads of the teacher's outputs, a subset of :data:`OUTPUTS`.
    #: The framework serves exactly these and decides from them, before the first
    #: step, what combines: a method that reads only ``logits`` may take its teacher
    #: from the teacher cache or from several teachers. The default (everything) is
    #: the safe one for a method that does not say.
    teacher_reads = frozenset({"logits", "feats", "preact_feats", "pooled_feat"})
    #: What the method reads of the student's outputs (``preact_feats`` is refused
    #: for a model without real pre-activation maps).
    student_reads = frozenset({"logits", "feats", "pooled_feat"})

    def __init__(self, student, teacher=None):
        super().__init__()
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        # Every teacher of an ensemble (set_teachers); None with one teacher.
        self.teachers = None
        self.teacher_reduce = "mean_probs"
        self._teacher_index = None       # mean_loss: the teacher of the current pass
        self._diagnostics = {}
        self._stash = {}
        self.epoch = 0
        self.stage = "distill"
        #: A :class:`~mdistill.engine.teacher_cache.TeacherCache` the builder attaches
        #: (DISTILLER.TEACHER_CACHE) to methods with ``teacher_logits_only``; else None.
        self.teacher_cache = None
        self._cache_batch = None

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        """Build the method from ``cfg``; ``data_info`` has num_train, num_classes,
        train_targets (see :func:`mdistill.distillers.build_distiller`)."""
        return cls(student, teacher)

    # ------------------------------------------------------- what it reads
    @property
    def teacher_logits_only(self):
        """True when the method reads nothing of the teacher but its logits."""
        return set(self.teacher_reads) == {"logits"}

    def teacher_temperatures(self):
        """The fixed temperatures at which the method softens the teacher's logits.

        Several teachers averaged by probabilities (DISTILLER.TEACHER_REDUCE
        ``mean_probs``) are served at the one temperature this declares, so a
        method that softens at several (MLKD), at a learned one (CTKD), or reads
        the logits otherwise (standardized, raw, transformed) returns None or
        more than one, and ``mean_probs`` is refused for it before the first step.

        Returns:
            A tuple of temperatures, or None when the teacher's logits are not read
            as ``softmax(z / T)`` at fixed temperatures.
        """
        return None

    @torch.no_grad()
    def probe(self, image_shape, device=None):
        """Run the student and the (feature) teacher once on zeros in eval mode to
        learn their output shapes, leaving their modes and BatchNorm statistics as
        they were (see :func:`probe_features`).

        Args:
            image_shape: ``(channels, height, width)`` of the training images.

        Returns:
            ``((student_logits, student_feats), (teacher_logits, teacher_feats))``
            for a batch of 2; the teacher's pair is None without a teacher.
        """
        student = probe_features(self.student, image_shape, device)
        teacher = (probe_features(self.teacher, image_shape, device)
                   if self.teacher is not None else None)
        return student, teacher

    # ------------------------------------------------------------ training mode
    def train(self, mode=True):
        """Set train/eval mode on everything except the teachers, which stay in eval."""
        super().train(mode)
        for teacher in self.teacher_models():
            teacher.eval()
        return self

    def trainable_named_modules(self):
        """Top-level submodules trained by the student's optimizer (all but the teacher
        and the modules an auxiliary optimizer owns)."""
        skip = {"teacher", "teachers"} | set(self.auxiliary_module_names())
        return [(name, module) for name, module in self.named_children() if name not in skip]

    def get_learnable_parameters(self):
        """Parameters of the student and of the method's own modules."""
        return [param for _, module in self.trainable_named_modules()
                for param in module.parameters() if param.requires_grad]

    def get_extra_parameters(self):
        """Number of trainable parameters the method adds to the student's."""
        return sum(param.numel() for name, module in self.trainable_named_modules()
                   if name != "student" for param in module.parameters())

    # --------------------------------------------------------------- forward
    def forward_train(self, image, target, **batch):
        """One training forward.

        Returns:
            ``(student_logits, {"loss_name": weighted scalar loss, ...})``; the
            trainer sums the losses and logs each under ``train/<name>``.
        """
        raise NotImplementedError

    def forward_test(self, image):
        """Student logits for evaluation."""
        return self.student(image)[0]

    def forward(self, image, target=None, **batch):
        if not self.training:
            return self.forward_test(image)
        if self.ensemble_active() and self.teacher_reduce == "mean_loss":
            return self._forward_per_teacher(image, target, **batch)
        if self.teacher_cache is None or "crop_offset" not in batch:
            return self.forward_train(image, target, **batch)
        # The batch's sample indices and views name its teacher logits in the cache.
        self._cache_batch = dict(batch, image=image)
        try:
            return self.forward_train(image, target, **batch)
        finally:
            self._cache_batch = None

    def teacher_forward(self, image):
        """The teacher's ``(logits, feats)`` without autograd.

        With a teacher cache attached, the training batch's own ``image`` gets
        its logits from the cache (views it lacks are computed and stored) and
        empty ``feats``; any other tensor (a second view, a slice) goes to the
        teacher.

        With several teachers (:meth:`set_teachers`) and a method with
        ``teacher_logits_only`` (the cache is then not used): ``mean_probs``
        gives the logits ``T * log(mean_k softmax(z_k / T))`` at ``T =``
        :meth:`ensemble_temperature`, whose softmax at T is the teachers'
        averaged softened prediction (and the feature teacher's feats);
        ``mean_loss`` gives teacher k's outputs in the k-th pass of
        :meth:`forward`. Other methods get the feature teacher's outputs.
        """
        if self.ensemble_active():
            return self._ensemble_forward(image)
        batch = self._cache_batch
        with torch.no_grad():
            if batch is not None and image is batch["image"]:
                return self.teacher_cache.logits(self.teacher, image, batch), {}
            return self.teacher(image)

    # ---------------------------------------------------------------- teachers
    def set_teachers(self, teachers, reduce="mean_probs"):
        """Distil from several frozen teachers.

        ``self.teacher``, the model the method was built with, must be one of
        ``teachers``: methods that use features keep using it alone. Methods
        with ``teacher_logits_only`` distil from all of them, by ``reduce``:

        * ``mean_probs``: the averaged softened predictions (:meth:`teacher_forward`);
        * ``mean_loss``: :meth:`forward_train` runs once per teacher (the
          student's forward once, its outputs reused) and the distillation
          losses are averaged; ``loss_ce`` is the first pass's, and what the
          method stashes or logs comes from the last pass.

        Every teacher is frozen, in eval mode, left out of the checkpoint, the
        optimizer and DDP's synchronisation, as a single teacher is.

        Args:
            teachers: the models, in DISTILLER.TEACHERS order.
            reduce: ``mean_probs`` | ``mean_loss``.

        Raises:
            UserError: ``reduce`` is unknown, or ``mean_loss`` for a method
                that uses more of the teacher than its logits.
        """
        if reduce not in TEACHER_REDUCTIONS:
            raise unknown_choice("value for DISTILLER.TEACHER_REDUCE:", reduce, TEACHER_REDUCTIONS)
        if reduce == "mean_loss" and not self.teacher_logits_only:
            raise UserError(f"DISTILLER.TEACHER_REDUCE mean_loss averages per-teacher losses of "
                            f"methods that use only the teachers' logits; "
                            f"{type(self).__name__} uses features, which come from "
                            f"DISTILLER.FEATURE_TEACHER alone (use mean_probs)")
        if not any(teacher is self.teacher for teacher in teachers):
            raise ValueError("set_teachers: the distiller's teacher must be one of the teachers")
        for teacher in teachers:
            teacher.eval()
            teacher.requires_grad_(False)
        self.teachers = nn.ModuleList(teachers)
        self.teacher_reduce = reduce

    def teacher_models(self):
        """Every teacher: the ensemble's, or the single teacher (none without one)."""
        if self.teachers is not None:
            return list(self.teachers)
        return [] if self.teacher is None else [self.teacher]

    def ensemble_active(self):
        """True when the method distils from several teachers' logits."""
        return self.teachers is not None and len(self.teachers) > 1 and self.teacher_logits_only

    def ensemble_temperature(self):
        """The temperature T at which ``mean_probs`` averages the teachers' softmax.

        A method should return the temperature at which it softens the
        teacher's logits; the default takes a number in ``self.temperature``
        (KD) or ``self.tau`` (DIST), else 1.
        """
        for name in ("temperature", "tau"):
            value = getattr(self, name, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        return 1.0

    @torch.no_grad()
    def _ensemble_forward(self, image):
        if self._teacher_index is not None:
            return self.teachers[self._teacher_index](image)
        outputs = [teacher(image) for teacher in self.teachers]
        feats = next(feats for teacher, (_, feats) in zip(self.teachers, outputs)
                     if teacher is self.teacher)
        return average_softened_logits([logits for logits, _ in outputs],
                                       self.ensemble_temperature()), feats

    def _forward_per_teacher(self, image, target, **batch):
        """``mean_loss``: one :meth:`forward_train` per teacher, losses averaged."""
        passes = []
        with _reuse_outputs(self.student):
            try:
                for index in range(len(self.teachers)):
                    self._teacher_index = index
                    passes.append(self.forward_train(image, target, **batch))
            finally:
                self._teacher_index = None
        logits, first = passes[0]
        return logits, {name: value if name == "loss_ce" else
                        sum(losses[name] for _, losses in passes) / len(passes)
                        for name, value in first.items()}

    # ---------------------------------------------------------- declarations
    def extra_batch_fields(self):
        """``{name: fn(index, target) -> tensor}`` the data loader adds to each
        training batch; passed to :meth:`forward_train` as keyword arguments."""
        return {}

    def auxiliary_module_names(self):
        """Names of the submodules that :meth:`extra_phases` train with their own
        optimizers (not the student's); derived from those declarations."""
        return [phase.module for phase in self.extra_phases()]

    def auxiliary_optimizers(self):
        """``{module name: optimizer}`` of :meth:`extra_phases`, derived from them.

        The trainer steps them in the phases, never the method; it schedules their
        learning rate with the student's schedule (from their own base lr) and
        saves and restores their state.
        """
        return {phase.module: phase.optimizer for phase in self.extra_phases()}

    def ddp_ignored_names(self):
        """Parameter and buffer names DistributedDataParallel must leave alone.

        The teachers are never synchronised, nor the modules of :meth:`extra_phases`
        (the trainer averages their gradients itself); subclasses add state they
        keep in step across processes themselves (memory banks).
        """
        frozen = [("teacher", self.teacher)] if self.teacher is not None else []
        frozen += [(f"teachers.{i}", teacher) for i, teacher in enumerate(self.teachers or [])]
        frozen += [(name, getattr(self, name)) for name in self.auxiliary_module_names()]
        return [f"{prefix}.{name}" for prefix, module in frozen
                for name, _ in [*module.named_parameters(), *module.named_buffers()]]

    def extra_phases(self):
        """The method's own modules trained by their own optimizers, and the updates
        the trainer runs for them after the student's, for accepted steps only.

        This one declaration says everything about such a module: the student's
        optimizer leaves it out (:meth:`auxiliary_module_names`), its optimizer is
        scheduled and checkpointed (:meth:`auxiliary_optimizers`), and DDP leaves
        it alone (:meth:`ddp_ignored_names`).

        Returns:
            A list of :class:`Phase` (ADVKD's discriminator), run in order.
        """
        return []

    def after_step(self):
        """Commit the step's state changes (CRD's memory banks) from :attr:`stashed`.

        Called by the trainer after the student's update and the extra phases,
        only when the step was accepted; never for a skipped step.
        """

    def stash(self, **values):
        """Put aside tensors of this forward for :meth:`after_step` or a phase (not saved)."""
        self._stash.update(values)

    @property
    def stashed(self):
        """What the last :meth:`forward_train` put aside with :meth:`stash`."""
        return self._stash

    def clear_stash(self):
        """Called by the trainer when a step ends, taken or skipped."""
        self._stash = {}

    def stages(self, epochs):
        """The stages of training, in order (see :class:`Stage`).

        Args:
            epochs: SOLVER.EPOCHS, the length of the distillation stage.

        Returns:
            By default one stage, ``distill``, over every learnable parameter.
        """
        return [Stage("distill", epochs)]

    def on_stage_start(self, name):
        """Called by the trainer when a stage begins (and on resume inside it)."""
        self.stage = name

    def on_epoch_start(self, epoch):
        """Called by the trainer before each epoch, with the epoch counted from 1
        within the current stage, e.g. for warm-ups."""
        self.epoch = epoch

    def warmup_factor(self, warmup_epochs):
        """``min(epoch / warmup_epochs, 1)`` with the 1-based epoch, as mdistiller
        scales DKD's and ReviewKD's losses; 1 when ``warmup_epochs`` <= 0."""
        if warmup_epochs <= 0:
            return 1.0
        return min(self.epoch / warmup_epochs, 1.0)

    def log_diagnostic(self, name, value):
        """Record a scalar for TensorBoard under ``<method>/<name>``; a tensor stays on
        its device until :meth:`pop_diagnostics` (no host sync inside a step)."""
        self._diagnostics[name] = value.detach() if torch.is_tensor(value) else value

    def pop_diagnostics(self):
        """Return (as floats) and clear the diagnostics recorded since the last call."""
        diagnostics, self._diagnostics = self._diagnostics, {}
        return {name: float(value) for name, value in diagnostics.items()}

    def state_dict_to_save(self):
        """Everything to checkpoint except the teachers (they never change)."""
        return {key: value for key, value in self.state_dict().items()
                if not key.startswith(TEACHER_PREFIXES)}

    def load_saved_state(self, state):
        """Load a dict written by :meth:`state_dict_to_save`."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [key for key in missing if not key.startswith(TEACHER_PREFIXES)]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint does not match the distiller: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")


#: DISTILLER.TEACHER_REDUCE: how logit methods combine several teachers.
TEACHER_REDUCTIONS = CHOICES["DISTILLER.TEACHER_REDUCE"]
#: State-dict prefixes of the frozen teachers (never saved).
TEACHER_PREFIXES = ("teacher.", "teachers.")


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


@contextlib.contextmanager
def _reuse_outputs(model):
    """Within: ``model`` called again on the same input tensor returns its first
    outputs (one forward, one graph, BatchNorm statistics moved once). A
    compiled model, or a call with extra arguments, runs every time."""
    if getattr(model, "_compiled_call_impl", None) is not None:
        yield
        return
    original, seen = model.forward, []

    def forward(image, *args, **kwargs):
        if args or kwargs:
            return original(image, *args, **kwargs)
        for known, outputs in seen:
            if known is image:
                return outputs
        outputs = original(image)
        seen.append((image, outputs))
        return outputs
    model.forward = forward
    try:
        yield
    finally:
        del model.forward


@dataclass
class Phase:
    """A module of the method's own, trained by its own optimizer in an update
    after the student's (see :meth:`Distiller.extra_phases`).

    Args:
        module: the attribute name of the submodule it trains ("discriminator").
        optimizer: the optimizer over that module's parameters.
        loss: ``loss() -> scalar tensor`` computed from :attr:`Distiller.stashed`;
            the trainer zeroes the optimizer's gradients, back-propagates it,
            averages the gradients over processes and steps the optimizer.
        steps: how many times to repeat it per student step (0: the module is
            still the method's own, but not trained).
    """
    module: str
    optimizer: torch.optim.Optimizer
    loss: Callable[[], torch.Tensor]
    steps: int = 1


@dataclass
class Stage:
    """A part of training with its own epochs, parameters and losses.

    The trainer runs a method's stages in order (global epochs count over all
    of them), builds a fresh optimizer of the update rule at each stage's start,
    tells the distiller the stage's name (``forward_train`` returns that
    stage's losses), checkpoints the stage (resume works inside any stage),
    logs it (``train/stage`` in TensorBoard) and keeps "best" for the last stage.

    Args:
        name: the stage's name ("init", "distill"); the distiller sees it as ``stage``.
        epochs: its length in epochs.
        parameters: ``() -> parameters`` the stage trains; None: every learnable one.
        lr: the stage's base learning rate; None: SOLVER.LR.
        schedule: follow SOLVER.LR_SCHEDULER over the stage's epochs (False: constant).
        eval_modules: names of the distiller's submodules kept in eval mode
            during the stage (RepDistiller's initialisation runs the student so).
    """
    name: str
    epochs: int
    parameters: Optional[Callable[[], list]] = None
    lr: Optional[float] = None
    schedule: bool = True
    eval_modules: Sequence[str] = ()


def kd_loss(student_logits, teacher_logits, temperature):
    """Hinton's KD loss: KL(softmax(t/T) || softmax(s/T)) summed over classes,
    averaged over the batch, times T^2; computed in fp32."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return kl * temperature ** 2


def standardize_logits(logits, eps=1e-7):
    """Logit standardization (Sun et al., CVPR 2024): each row's z-score
    ``(z - mean) / (std + eps)``, with the unbiased std as in the authors' code; fp32."""
    logits = logits.float()
    return (logits - logits.mean(dim=1, keepdim=True)) / (logits.std(dim=1, keepdim=True) + eps)


def standardized_if(enabled, *logits):
    """``logits`` standardized (:func:`standardize_logits`) when ``enabled``, else as given:
    the ``<METHOD>.LOGIT_STAND`` switch of KD, DKD and MLKD."""
    return tuple(map(standardize_logits, logits)) if enabled else logits


def match_spatial_size(student_feature, teacher_feature):
    """Average-pool the larger of two ``[B, C, H, W]`` maps to the smaller one's
    height and width (how mdistiller pairs stages of different resolutions)."""
    if student_feature.shape[2] > teacher_feature.shape[2]:
        student_feature = F.adaptive_avg_pool2d(student_feature, teacher_feature.shape[2:])
    elif teacher_feature.shape[2] > student_feature.shape[2]:
        teacher_feature = F.adaptive_avg_pool2d(teacher_feature, student_feature.shape[2:])
    return student_feature, teacher_feature


@torch.no_grad()
def probe_features(model, image_shape, device=None):
    """Run ``model`` once on zeros in eval mode to learn its feature shapes.

    The model's train/eval mode and BN statistics are left as they were
    (mdistiller probed in train mode, which moved the teacher's BN statistics).

    Returns:
        ``(logits, feats)`` for a batch of 2.
    """
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = device or (param.device if param is not None else "cpu")
        return model(torch.zeros(2, *image_shape, device=device))
    finally:
        model.train(was_training)
