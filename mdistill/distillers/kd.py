"""KD: Hinton et al., "Distilling the Knowledge in a Neural Network" (2015)."""
import torch.nn.functional as F

from ..registry import DISTILLERS
from .base import Distiller, kd_loss, standardized_if


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
    """

    teacher_logits_only = True

    def __init__(self, student, teacher, temperature=4.0, ce_weight=0.1, kd_weight=0.9,
                 logit_stand=False):
        super().__init__(student, teacher)
        self.logit_stand = logit_stand
        self.temperature = temperature
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        return cls(student, teacher, temperature=cfg.KD.TEMPERATURE,
                   ce_weight=cfg.KD.LOSS.CE_WEIGHT, kd_weight=cfg.KD.LOSS.KD_WEIGHT,
                   logit_stand=cfg.KD.LOGIT_STAND)

    def forward_train(self, image, target, **batch):
        logits, _ = self.student(image)
        teacher_logits, _ = self.teacher_forward(image)
        student_kd, teacher_kd = standardized_if(self.logit_stand, logits, teacher_logits)
        return logits, {
            "loss_ce": self.ce_weight * F.cross_entropy(logits.float(), target),
            "loss_kd": self.kd_weight * kd_loss(student_kd, teacher_kd, self.temperature),
        }
