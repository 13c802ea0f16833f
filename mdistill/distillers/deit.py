"""DeiT's distillation through a token: Touvron et al., "Training data-efficient
image transformers & distillation through attention" (ICML 2021;
facebookresearch/deit ``losses.py``).

The student carries a distillation token with its own head (timm's
``deit_*_distilled_*``): the class head learns the labels, the distillation head
the teacher, and at test time the two heads' logits are averaged.
"""
import torch.nn.functional as F

from ..errors import UserError
from ..registry import DISTILLERS
from .base import Distiller

MODES = ("hard", "soft")


def deit_hard_loss(distillation_logits, teacher_logits):
    """Cross-entropy of the distillation head against the teacher's argmax (fp32)."""
    return F.cross_entropy(distillation_logits.float(), teacher_logits.argmax(dim=1))


def deit_soft_loss(distillation_logits, teacher_logits, tau):
    """KL(softmax(t/tau) || softmax(s/tau)) times tau^2, summed and divided by the
    number of logits (batch x classes), as DeiT's ``DistillationLoss`` (fp32)."""
    log_student = F.log_softmax(distillation_logits.float() / tau, dim=1)
    log_teacher = F.log_softmax(teacher_logits.float() / tau, dim=1)
    kl = F.kl_div(log_student, log_teacher, reduction="sum", log_target=True)
    return kl * tau ** 2 / distillation_logits.numel()


@DISTILLERS.register("DEIT")
class DeiT(Distiller):
    """``(1 - alpha)`` CE of the class head on the labels plus ``alpha`` times the
    distillation head's loss against the teacher (``hard``: its argmax; ``soft``:
    the KL at ``tau``); evaluated on the mean of the two heads' logits.

    Args:
        student: a model with a distillation token (``feats["dist_logits"]``).
        teacher: the teacher.
        mode: ``hard`` or ``soft``.
        alpha: weight of the distillation term (the class head gets ``1 - alpha``).
        tau: the soft mode's temperature.

    Raises:
        UserError: an unknown mode.
    """

    teacher_reads = frozenset({"logits"})
    student_reads = frozenset({"logits", "dist_logits"})
    #: Only the class head's cross-entropy reads the labels (DeiT trains with Mixup,
    #: CutMix and label smoothing).
    reads_hard_labels = False

    def __init__(self, student, teacher, mode="hard", alpha=0.5, tau=1.0):
        super().__init__(student, teacher)
        # A student without a distillation token is refused by the builder before
        # this runs: it checks student_reads against what the model provides.
        if mode not in MODES:
            raise UserError(f"DEIT.MODE {mode!r} is not one of {', '.join(MODES)}")
        self.mode = mode
        self.alpha = alpha
        self.tau = tau

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        return cls(student, teacher, mode=cfg.DEIT.MODE, alpha=cfg.DEIT.ALPHA, tau=cfg.DEIT.TAU)

    def teacher_temperatures(self):
        # Hard distillation reads the argmax of the raw logits, not a softmax.
        return (float(self.tau),) if self.mode == "soft" else None

    def forward_train(self, image, target, **batch):
        logits, feats = self.student(image)
        teacher_logits, _ = self.teacher_forward(image)
        distillation_logits = feats["dist_logits"]
        if self.mode == "hard":
            loss = deit_hard_loss(distillation_logits, teacher_logits)
        else:
            loss = deit_soft_loss(distillation_logits, teacher_logits, self.tau)
        return logits, {"loss_ce": (1 - self.alpha) * F.cross_entropy(logits.float(), target),
                        "loss_kd": self.alpha * loss}

