"""NKD: Yang et al., "From Knowledge Distillation to Self-Knowledge Distillation:
A Unified Approach with Normalized Loss and Customized Soft Labels" (ICCV 2023).

Facts from the authors' code (yzd-v/cls_KD ``mmcls/distillation/losses/nkd.py``):
the target term uses the plain softmax (no temperature) and is averaged
over the batch; the non-target term is a cross-entropy between the
teacher's and the student's distributions over the non-target classes,
renormalised at the temperature, times ``gamma * T^2``. The NKD loss is
added, unweighted, to the student's cross-entropy. Defaults of ``nkd.py``:
T 1, gamma 1.5 (their CIFAR-100 config uses T 3, gamma 3.5). NKD has no
warm-up; SDD's SD-NKD (Wei et al. 2024) ramps it up over 20 epochs.
"""
import torch
import torch.nn.functional as F

from ..registry import DISTILLERS
from .base import Distiller
from .sdd import scale_decoupling_from_config


def nkd_loss(student_logits, teacher_logits, target, temperature=1.0, gamma=1.5,
             reduction="mean"):
    """NKD's normalized KD loss, computed in fp32.

    Args:
        reduction: ``"mean"`` over the batch, or ``"none"``: one value per row (SDD).

    Returns:
        ``(target_term, non_target_term)``: ``-mean_i t_i log s_i`` over the
        target-class probabilities, and ``-gamma T^2 mean_i sum_j T_ij log S_ij``
        over the non-target classes renormalised at temperature T.
    """
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    index = target.view(-1, 1)
    log_student = F.log_softmax(student_logits, dim=1).gather(1, index)
    teacher = F.softmax(teacher_logits, dim=1).gather(1, index)
    target_term = -(teacher * log_student).squeeze(1)

    count, classes = student_logits.shape
    others = torch.ones_like(student_logits, dtype=torch.bool).scatter_(1, index, False)
    student_others = student_logits[others].view(count, classes - 1)
    teacher_others = teacher_logits[others].view(count, classes - 1)
    log_student_others = F.log_softmax(student_others / temperature, dim=1)
    teacher_others = F.softmax(teacher_others / temperature, dim=1)
    non_target = -gamma * temperature ** 2 * (teacher_others * log_student_others).sum(dim=1)
    if reduction == "mean":
        return target_term.mean(), non_target.mean()
    return target_term, non_target


@DISTILLERS.register("NKD")
class NKD(Distiller):
    """Cross-entropy plus NKD's target and normalized non-target terms.

    Args:
        student, teacher: the models.
        temperature: temperature T of the non-target term (scaled by T^2).
        gamma: weight of the non-target term.
        ce_weight: weight of the cross-entropy on the labels.
        kd_weight: weight of both NKD terms (1 in the authors' code).
        warmup: epochs over which both NKD terms ramp up to full weight
            (``min(epoch / warmup, 1)``; 0: none, as NKD's authors).
        scale_decoupling: a :class:`~mdistill.distillers.sdd.ScaleDecoupling`
            (SDD, Wei et al. 2024): NKD on every pooled region of the two models'
            last maps, complementary regions weighted; None: plain NKD.
    """

    teacher_reads = frozenset({"logits"})
    student_reads = frozenset({"logits"})
    option_sections = ("SDD",)

    def __init__(self, student, teacher, temperature=1.0, gamma=1.5, ce_weight=1.0,
                 kd_weight=1.0, warmup=0, scale_decoupling=None):
        super().__init__(student, teacher)
        self.temperature = temperature
        self.gamma = gamma
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.warmup = warmup
        self.scale_decoupling = scale_decoupling
        if scale_decoupling is not None:
            self.teacher_reads = scale_decoupling.teacher_reads
            self.student_reads = scale_decoupling.student_reads

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        return cls(student, teacher, temperature=cfg.NKD.TEMPERATURE, gamma=cfg.NKD.GAMMA,
                   ce_weight=cfg.NKD.LOSS.CE_WEIGHT, kd_weight=cfg.NKD.LOSS.KD_WEIGHT,
                   warmup=cfg.NKD.WARMUP,
                   scale_decoupling=scale_decoupling_from_config(cfg, student, teacher,
                                                                 data_info))

    def teacher_temperatures(self):
        # The target term reads the teacher's softmax at 1, the non-target one at T.
        return tuple(sorted({1.0, float(self.temperature)}))

    def forward_train(self, image, target, **batch):
        logits, feats = self.student(image)
        teacher_logits, teacher_feats = self.teacher_forward(image)
        if self.scale_decoupling is None:
            target_term, non_target = nkd_loss(logits, teacher_logits, target,
                                               self.temperature, self.gamma)
        else:
            student_rows, teacher_rows, target_rows, weights = self.scale_decoupling.rows(
                self.student, feats, self.teacher, teacher_feats, target)
            per_target, per_non_target = nkd_loss(student_rows, teacher_rows, target_rows,
                                                  self.temperature, self.gamma, reduction="none")
            target_term = (weights * per_target).mean()
            non_target = (weights * per_non_target).mean()
        weight = self.kd_weight * self.warmup_factor(self.warmup)
        return logits, {"loss_ce": self.ce_weight * F.cross_entropy(logits.float(), target),
                        "loss_target": weight * target_term,
                        "loss_non_target": weight * non_target}
