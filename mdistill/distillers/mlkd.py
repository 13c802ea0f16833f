"""MLKD: Jin et al., "Multi-Level Logit Distillation" (CVPR 2023).

What the authors' code computes (Jin-Ying/Multi-Level-Logit-Distillation,
``mdistiller/distillers/KD_ours.py``), reproduced term by term:

* two views of each image: the loader's weak one and a strong one (an
  independent crop and flip, RandAugment with 2 ops, Cutout; see
  :mod:`mdistill.data.randaugment`), each through the student and the teacher;
* ``loss_ce``: ``ce_weight * (CE(weak) + CE(strong))``;
* ``loss_kd``: KD at the temperatures ``(T, 3, 5, 2, 6)`` on the weak view,
  each scaled by the confidence mask, plus KD at ``T, 3, 5`` on the strong
  view and, again, at ``2, 6`` on the weak view (unmasked);
* ``loss_cc``: class-level alignment at the five temperatures on the weak
  view: ``sum((P_t^T P_t - P_s^T P_s)^2) / C`` with ``P`` the ``[B, C]``
  predictions, scaled by the class mask;
* ``loss_bc``: batch-level alignment, ``sum((P_t P_t^T - P_s P_s^T)^2) / B``,
  at the five temperatures on the weak view, scaled by the confidence mask;
* every distillation term times ``kd_weight``.

The masks follow the code, not the paper's description: the per-sample
losses are reduced to their batch mean before ``(loss * mask).mean()``, so
the confidence mask (samples whose top teacher probability on the weak view
is at most the batch median) scales each term by the fraction of samples it
keeps, and the class mask (classes whose summed teacher probability is at
most the median) by the fraction of classes it keeps. The class- and
batch-level terms of the strong view are computed there but never added to
the loss, so they are left out here.

Logit standardization (Sun et al. 2024, ``MLKD.LOGIT_STAND``) standardizes
the logits of the KD terms only, as their ``MLKD.py`` does.
"""
import torch
import torch.nn.functional as F

from ..data.randaugment import RandAugmentView
from ..errors import UserError
from ..registry import DISTILLERS
from .base import Distiller, kd_loss, standardized_if

#: The temperatures the authors use next to the configured one, in their order.
EXTRA_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)


def class_correlation_loss(student_logits, teacher_logits, temperature):
    """``sum((P_t^T P_t - P_s^T P_s)^2) / C`` of the ``[B, C]`` softened predictions."""
    student = F.softmax(student_logits.float() / temperature, dim=1)
    teacher = F.softmax(teacher_logits.float() / temperature, dim=1)
    difference = teacher.t() @ teacher - student.t() @ student
    return difference.pow(2).sum() / student.shape[1]


def batch_correlation_loss(student_logits, teacher_logits, temperature):
    """``sum((P_t P_t^T - P_s P_s^T)^2) / B`` of the ``[B, C]`` softened predictions."""
    student = F.softmax(student_logits.float() / temperature, dim=1)
    teacher = F.softmax(teacher_logits.float() / temperature, dim=1)
    difference = teacher @ teacher.t() - student @ student.t()
    return difference.pow(2).sum() / student.shape[0]


def at_most_median(values):
    """``values <= median`` with numpy's percentile-50 (linear interpolation)."""
    return values <= torch.quantile(values, 0.5)


class TwoViews:
    """For methods that distil on a weak and a strong view of each image (MLKD,
    CRLD): the strong view is a declared batch field the loader renders
    (``image_strong``, RandAugment with ``self.augment_ops`` ops and Cutout), and
    :meth:`both_views` runs both views through the student and the teacher."""

    def extra_batch_fields(self):
        return {"image_strong": RandAugmentView(self.augment_ops)}

    def both_views(self, image, image_strong):
        """``(student weak, student strong, teacher weak, teacher strong)`` logits."""
        if image_strong is None:
            raise UserError(f"{type(self).__name__} needs the strong view 'image_strong' in "
                            f"each batch (its extra_batch_fields); build the loader with them")
        return (self.student(image)[0], self.student(image_strong)[0],
                self.teacher_forward(image)[0], self.teacher_forward(image_strong)[0])


@DISTILLERS.register("MLKD")
class MLKD(TwoViews, Distiller):
    """Multi-level logit distillation on a weak and a strong view.

    Args:
        student, teacher: the models.
        temperature: the first of the five temperatures (the others are
            :data:`EXTRA_TEMPERATURES`).
        ce_weight, kd_weight: weight of the two cross-entropies and of every
            distillation term.
        logit_stand: standardize the logits of the KD terms (Sun et al. 2024);
            ``temperature`` is then their base temperature.
        augment_ops: RandAugment ops per image of the strong view.
    """

    teacher_reads = frozenset({"logits"})
    student_reads = frozenset({"logits"})

    def __init__(self, student, teacher, temperature=4.0, ce_weight=0.1, kd_weight=0.9,
                 logit_stand=False, augment_ops=2):
        super().__init__(student, teacher)
        self.temperatures = (temperature,) + EXTRA_TEMPERATURES
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.logit_stand = logit_stand
        self.augment_ops = augment_ops

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        return cls(student, teacher, temperature=cfg.MLKD.TEMPERATURE,
                   ce_weight=cfg.MLKD.LOSS.CE_WEIGHT, kd_weight=cfg.MLKD.LOSS.KD_WEIGHT,
                   logit_stand=cfg.MLKD.LOGIT_STAND, augment_ops=cfg.MLKD.AUGMENT_OPS)

    def teacher_temperatures(self):
        # Standardized logits are not the teacher's logits softened.
        return None if self.logit_stand else self.temperatures

    def forward_train(self, image, target, image_strong=None, **batch):
        weak, strong, teacher_weak, teacher_strong = self.both_views(image, image_strong)

        probabilities = F.softmax(teacher_weak.float(), dim=1)
        sample_fraction = at_most_median(probabilities.amax(dim=1)).float().mean()
        class_fraction = at_most_median(probabilities.sum(dim=0)).float().mean()

        kd_weak, kd_teacher_weak, kd_strong, kd_teacher_strong = standardized_if(
            self.logit_stand, weak, teacher_weak, strong, teacher_strong)
        # The "strong" sum of the authors' code: T, 3, 5 on the strong view, 2, 6 on the weak.
        loss_kd = (sample_fraction * sum(kd_loss(kd_weak, kd_teacher_weak, t)
                                         for t in self.temperatures)
                   + sum(kd_loss(kd_strong, kd_teacher_strong, t) for t in self.temperatures[:3])
                   + sum(kd_loss(kd_weak, kd_teacher_weak, t) for t in self.temperatures[3:]))
        loss_cc = class_fraction * sum(class_correlation_loss(weak, teacher_weak, t)
                                       for t in self.temperatures)
        loss_bc = sample_fraction * sum(batch_correlation_loss(weak, teacher_weak, t)
                                        for t in self.temperatures)
        loss_ce = F.cross_entropy(weak.float(), target) + F.cross_entropy(strong.float(), target)
        return weak, {"loss_ce": self.ce_weight * loss_ce,
                      "loss_kd": self.kd_weight * loss_kd,
                      "loss_cc": self.kd_weight * loss_cc,
                      "loss_bc": self.kd_weight * loss_bc}
