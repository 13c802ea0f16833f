"""WTTM: Zheng & Yang, "Knowledge Distillation Based on Transformed Teacher
Matching" (ICLR 2024).

Facts from the authors' code (zkxufo/TTM ``distiller_zoo/wttm.py``,
``helper/loops.py``, ``train_student.py``): the teacher's softmax is raised to
the power gamma (``--ttm_l``) and renormalised, ``q = p_t^gamma / U`` with
``U = sum_j p_t^gamma``; the student keeps its plain softmax (no temperature);
the loss is ``mean_i U_i * KL(q_i || p_s,i)``, added to ``r * CE`` with weight
``b``. Since ``q = softmax(gamma * z_t)``, TTM is KD with the student's
temperature dropped (``gamma = 1 / T``); WTTM's weight ``U`` grows with the
teacher's uncertainty.
"""
import torch.nn.functional as F

from ..registry import DISTILLERS
from .base import Distiller


def wttm_loss(student_logits, teacher_logits, gamma):
    """``mean_i U_i KL(q_i || softmax(s_i))`` with ``q = p_t^gamma / U``, in fp32.

    Computed in log space (``log q = gamma log p_t - log U``), so a confident
    teacher gives no ``0 * log 0``.
    """
    log_student = F.log_softmax(student_logits.float(), dim=1)
    powered = gamma * F.log_softmax(teacher_logits.float(), dim=1)
    log_norm = powered.logsumexp(dim=1, keepdim=True)
    log_transformed = powered - log_norm
    kl = F.kl_div(log_student, log_transformed, reduction="none", log_target=True).sum(dim=1)
    return (log_norm.squeeze(1).exp() * kl).mean()


@DISTILLERS.register("WTTM")
class WTTM(Distiller):
    """Cross-entropy plus KL to the power-transformed teacher, weighted per sample.

    ``loss_ce = ce_weight * CE`` and ``loss_kd = kd_weight *`` :func:`wttm_loss`.

    Args:
        student, teacher: the models.
        gamma: the power of the teacher's probabilities (the authors' ``--ttm_l``).
        ce_weight, kd_weight: weights of the two terms.
    """

    teacher_reads = frozenset({"logits"})
    student_reads = frozenset({"logits"})
    reads_hard_labels = False

    def __init__(self, student, teacher, gamma=0.2, ce_weight=1.0, kd_weight=4.0):
        super().__init__(student, teacher)
        self.gamma = gamma
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        return cls(student, teacher, gamma=cfg.WTTM.GAMMA, ce_weight=cfg.WTTM.LOSS.CE_WEIGHT,
                   kd_weight=cfg.WTTM.LOSS.KD_WEIGHT)

    def teacher_temperatures(self):
        # The weight U is a sum of the raw prediction's powers: averaging several
        # teachers' softened predictions would not give it.
        return None

    def forward_train(self, image, target, **batch):
        logits, _ = self.student(image)
        teacher_logits, _ = self.teacher_forward(image)
        return logits, {
            "loss_ce": self.ce_weight * F.cross_entropy(logits.float(), target),
            "loss_kd": self.kd_weight * wttm_loss(logits, teacher_logits, self.gamma),
        }
