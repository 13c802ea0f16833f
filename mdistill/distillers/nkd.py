"""NKD: Yang et al., "From Knowledge Distillation to Self-Knowledge Distillation:
A Unified Approach with Normalized Loss and Customized Soft Labels" (ICCV 2023).

Facts from the authors' code (yzd-v/cls_KD ``mmcls/distillation/losses/nkd.py``):
the target term uses the plain softmax (no temperature) and is averaged
over the batch; the non-target term is a cross-entropy between the
teacher's and the student's distributions over the non-target classes,
renormalised at the temperature, times ``gamma * T^2``. The NKD loss is
added, unweighted, to the student's cross-entropy. Defaults of ``nkd.py``:
T 1, gamma 1.5 (their CIFAR-100 config uses T 3, gamma 3.5).
"""
import torch
import torch.nn.functional as F

from ..registry import DISTILLERS
from .base import Distiller


def nkd_loss(student_logits, teacher_logits, target, temperature=1.0, gamma=1.5):
    """NKD's normalized KD loss, computed in fp32.

    Returns:
        ``(target_term, non_target_term)``: ``-mean_i t_i log s_i`` over the
        target-class probabilities, and ``-gamma T^2 mean_i sum_j T_ij log S_ij``
        over the non-target classes renormalised at temperature T.
    """
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    index = target.view(-1, 1)
    log_student = F.log_softmax(student_logits, dim=1).gather(1, index)
    teacher = F.softmax(teacher_logits, dim=1).gather(1, index)
    target_term = -(teacher * log_student).mean()

    count, classes = student_logits.shape
    others = torch.ones_like(student_logits, dtype=torch.bool).scatter_(1, index, False)
    student_others = student_logits[others].view(count, classes - 1)
    teacher_others = teacher_logits[others].view(count, classes - 1)
    log_student_others = F.log_softmax(student_others / temperature, dim=1)
    teacher_others = F.softmax(teacher_others / temperature, dim=1)
    non_target = -(teacher_others * log_student_others).sum(dim=1).mean()
    return target_term, gamma * temperature ** 2 * non_target


@DISTILLERS.register("NKD")
class NKD(Distiller):
    """Cross-entropy plus NKD's target and normalized non-target terms.

    Args:
        student, teacher: the models.
        temperature: temperature T of the non-target term (scaled by T^2).
        gamma: weight of the non-target term.
        ce_weight: weight of the cross-entropy on the labels.
        kd_weight: weight of both NKD terms (1 in the authors' code).
    """

    teacher_logits_only = True

    def __init__(self, student, teacher, temperature=1.0, gamma=1.5, ce_weight=1.0,
                 kd_weight=1.0):
        super().__init__(student, teacher)
        self.temperature = temperature
        self.gamma = gamma
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        return cls(student, teacher, temperature=cfg.NKD.TEMPERATURE, gamma=cfg.NKD.GAMMA,
                   ce_weight=cfg.NKD.LOSS.CE_WEIGHT, kd_weight=cfg.NKD.LOSS.KD_WEIGHT)

    def forward_train(self, image, target, **batch):
        logits, _ = self.student(image)
        teacher_logits, _ = self.teacher_forward(image)
        target_term, non_target = nkd_loss(logits, teacher_logits, target, self.temperature,
                                           self.gamma)
        return logits, {"loss_ce": self.ce_weight * F.cross_entropy(logits.float(), target),
                        "loss_target": self.kd_weight * target_term,
                        "loss_non_target": self.kd_weight * non_target}
