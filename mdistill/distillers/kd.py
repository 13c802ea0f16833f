"""KD: Hinton et al., "Distilling the Knowledge in a Neural Network" (2015)."""
import torch.nn.functional as F

from ..registry import DISTILLERS
from .base import Distiller, kd_loss, standardized_if
from .sdd import scale_decoupling_from_config


def kd_loss_per_sample(student_logits, teacher_logits, temperature):
    """KD's loss of every row: KL(softmax(t/T) || softmax(s/T)) summed over classes,
    times T^2, in fp32 (:func:`~mdistill.distillers.base.kd_loss` is its mean)."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_student, log_teacher, reduction="none", log_target=True).sum(dim=1)
    return kl * temperature ** 2


@DISTILLERS.register("KD")
class KD(Distiller):
    """Cross-entropy on the labels plus the temperature-softened KL to the teacher.

    Args:
        student, teacher: the models.
        temperature: softmax temperature T (the KL is scaled by T^2).
        ce_weight, kd_weight: weights of the two terms.
        logit_stand: standardize both models' logits per sample first (Sun et al.
            2024, "Logit Standardization in KD"); ``temperature`` is then their
            base temperature (2 or 3) and ``kd_weight`` 9.
        scale_decoupling: a :class:`~mdistill.distillers.sdd.ScaleDecoupling`
            (SDD, Wei et al. 2024): the KL on every pooled region of the two
            models' last maps, complementary regions weighted; None: plain KD.
    """

    teacher_reads = frozenset({"logits"})
    student_reads = frozenset({"logits"})
    reads_hard_labels = False
    option_sections = ("SDD",)

    def __init__(self, student, teacher, temperature=4.0, ce_weight=0.1, kd_weight=0.9,
                 logit_stand=False, scale_decoupling=None):
        super().__init__(student, teacher)
        self.logit_stand = logit_stand
        self.temperature = temperature
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.scale_decoupling = scale_decoupling
        if scale_decoupling is not None:
            self.teacher_reads = scale_decoupling.teacher_reads
            self.student_reads = scale_decoupling.student_reads
            self.reads_hard_labels = True     # its regions are weighted by the label

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        return cls(student, teacher, temperature=cfg.KD.TEMPERATURE,
                   ce_weight=cfg.KD.LOSS.CE_WEIGHT, kd_weight=cfg.KD.LOSS.KD_WEIGHT,
                   logit_stand=cfg.KD.LOGIT_STAND,
                   scale_decoupling=scale_decoupling_from_config(cfg, student, teacher,
                                                                 data_info))

    def teacher_temperatures(self):
        # Standardized logits are not the teacher's softmax at a temperature.
        return None if self.logit_stand else (float(self.temperature),)

    def forward_train(self, image, target, **batch):
        logits, feats = self.student(image)
        teacher_logits, teacher_feats = self.teacher_forward(image)
        loss_ce = self.ce_weight * F.cross_entropy(logits.float(), target)
        if self.scale_decoupling is None:
            student_kd, teacher_kd = standardized_if(self.logit_stand, logits, teacher_logits)
            return logits, {"loss_ce": loss_ce, "loss_kd": self.kd_weight * kd_loss(
                student_kd, teacher_kd, self.temperature)}
        student_rows, teacher_rows, _, weights = self.scale_decoupling.rows(
            self.student, feats, self.teacher, teacher_feats, target)
        student_kd, teacher_kd = standardized_if(self.logit_stand, student_rows, teacher_rows)
        per_row = kd_loss_per_sample(student_kd, teacher_kd, self.temperature)
        return logits, {"loss_ce": loss_ce, "loss_kd": self.kd_weight * (weights * per_row).mean()}
