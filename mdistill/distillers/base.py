"""The Distiller base class: what every method declares to the one trainer."""
import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from ..models import probe_outputs
from .teachers import LiveTeacher, build_teacher_source


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

    The teacher side is one object, a :class:`~mdistill.distillers.teachers.TeacherSource`
    (one live teacher, cached logits, several teachers averaging probabilities or
    losses) that the builder attaches (:meth:`set_teacher_source`) after checking
    it can serve what the method declares it reads (:attr:`teacher_reads`,
    :meth:`teacher_temperatures`). A method asks :meth:`teacher_forward`;
    ``self.teacher`` is the teacher whose features are served (for probing shapes).

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
    #: What the method reads of the teacher's outputs, a subset of what models give
    #: (:data:`mdistill.models.MODEL_OUTPUTS`, and ``dist_logits`` of a distillation token).
    #: The framework serves exactly these and decides from them, before the first
    #: step, what combines: a method that reads only ``logits`` may take its teacher
    #: from the teacher cache or from several teachers. The default (everything) is
    #: the safe one for a method that does not say.
    teacher_reads = frozenset({"logits", "feats", "preact_feats", "pooled_feat"})
    #: What the method reads of the student's outputs (``preact_feats`` is refused
    #: for a model without real pre-activation maps).
    student_reads = frozenset({"logits", "feats", "pooled_feat"})
    #: Config sections of switches the method honours besides its own (``("SDD",)``
    #: for KD, DKD and NKD): a switch turned on (``<SECTION>.ENABLE``) for a method
    #: that does not list it is refused before the first step.
    option_sections = ()
    #: Whether the method reads the labels beyond its cross-entropy (DKD's target
    #: mask, NKD's target term, CRD's positives). A method that does not (False)
    #: may be given soft targets: Mixup, CutMix and label smoothing (engine/recipe.py)
    #: hand it ``target`` as class probabilities ``[B, classes]``, which
    #: ``F.cross_entropy`` takes; the others are refused them before the first step.
    reads_hard_labels = True

    def __init__(self, student, teacher=None):
        super().__init__()
        self.student = student
        # A student with a distillation token trains both heads on the labels (the
        # mean of their logits, timm's default) unless the method reads the
        # distillation head's own logits and trains it (DeiT).
        if callable(getattr(student, "set_distilled_training", None)):
            student.set_distilled_training("dist_logits" in self.student_reads)
        # A plain attribute, not a submodule: the teachers stay outside the state
        # dict, the optimizers, train()/eval() and DistributedDataParallel.
        self.teacher_source = LiveTeacher([teacher]) if teacher is not None else None
        self._batch = None
        self._diagnostics = {}
        self._stash = {}
        self.epoch = 0
        self.stage = "distill"

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
    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), .half() reach the teachers as they would a submodule.
        for teacher in self.teacher_models():
            teacher._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def trainable_named_modules(self):
        """Top-level submodules trained by the student's optimizer (all but the
        modules an auxiliary optimizer owns)."""
        skip = set(self.auxiliary_module_names())
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
        # The batch's sample indices and views name its teacher logits in the cache.
        self._batch = dict(batch, image=image)
        try:
            if self.teacher_source is None or self.teacher_source.passes == 1:
                return self.forward_train(image, target, **batch)
            return self._forward_per_teacher(image, target, **batch)
        finally:
            self._batch = None

    def teacher_forward(self, image, batch_statistics=False):
        """The teacher's ``(logits, feats)`` without autograd, from the teacher source.

        The source decides where they come from (one teacher, the cache, several
        teachers); the method reads only what it declared in :attr:`teacher_reads`.

        Args:
            image: the training batch's images or another view of them.
            batch_statistics: the teacher's BatchNorms normalise with this batch's
                statistics, their running ones untouched (OFD, as its authors run it).
        """
        return self.teacher_source(image, self._batch, batch_statistics)

    # ---------------------------------------------------------------- teachers
    @property
    def teacher(self):
        """The teacher whose feature maps are served (the only one with one teacher)."""
        return self.teacher_source.feature_teacher if self.teacher_source is not None else None

    def set_teacher_source(self, source):
        """Serve the teacher's outputs from ``source`` (a
        :class:`~mdistill.distillers.teachers.TeacherSource`)."""
        self.teacher_source = source

    def set_teachers(self, teachers, reduce="mean_probs", feature_index=None):
        """Distil from several frozen teachers, combined by ``reduce`` (``mean_probs``
        or ``mean_loss``; see :mod:`mdistill.distillers.teachers`).

        ``feature_index`` defaults to the position of ``self.teacher`` among them.

        Raises:
            UserError: the method cannot use several teachers that way.
        """
        if feature_index is None:
            feature_index = next((index for index, teacher in enumerate(teachers)
                                  if teacher is self.teacher), 0)
        batch_rows = self.teacher_source.batch_rows if self.teacher_source is not None else 0
        self.set_teacher_source(build_teacher_source(self, list(teachers), reduce, feature_index,
                                                     batch_rows=batch_rows))

    def teacher_models(self):
        """Every teacher (none without one)."""
        return list(self.teacher_source.models) if self.teacher_source is not None else []

    @property
    def teacher_cache(self):
        """The teacher cache serving the logits, or None."""
        return self.teacher_source.cache if self.teacher_source is not None else None

    def _forward_per_teacher(self, image, target, **batch):
        """``mean_loss``: one :meth:`forward_train` per teacher, losses averaged;
        ``loss_ce`` is the first pass's."""
        passes = []
        with _reuse_outputs(self.student):
            try:
                for index in range(self.teacher_source.passes):
                    self.teacher_source.select(index)
                    passes.append(self.forward_train(image, target, **batch))
            finally:
                self.teacher_source.select(None)
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

        The teachers are not submodules; the modules of :meth:`extra_phases` are
        left alone (the trainer averages their gradients itself); subclasses add state they
        keep in step across processes themselves (memory banks).
        """
        own = [(name, getattr(self, name)) for name in self.auxiliary_module_names()]
        return [f"{prefix}.{name}" for prefix, module in own
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
        """Everything to checkpoint (the teachers are not part of it: they never change)."""
        return self.state_dict()

    def load_saved_state(self, state):
        """Load a dict written by :meth:`state_dict_to_save`."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        unexpected = [key for key in unexpected if not key.startswith(TEACHER_PREFIXES)]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint does not match the distiller: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")


#: State-dict prefixes of teachers in checkpoints of earlier versions (ignored).
TEACHER_PREFIXES = ("teacher.", "teachers.")


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
        task_loss: whether the stage's losses include the task loss ``loss_ce``
            (an initialisation stage that matches features alone has none, and
            an update rule that needs it, DOT, is refused before the first step).
    """
    name: str
    epochs: int
    parameters: Optional[Callable[[], list]] = None
    lr: Optional[float] = None
    schedule: bool = True
    eval_modules: Sequence[str] = ()
    task_loss: bool = True


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


#: Run a model once on zeros in eval mode to learn its output shapes, leaving its
#: mode and BatchNorm statistics as they were (:func:`mdistill.models.probe_outputs`).
probe_features = probe_outputs
