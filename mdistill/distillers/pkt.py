"""PKT: Passalis & Tefas, "Learning Deep Representations with Probabilistic
Knowledge Transfer" (ECCV 2018)."""
import torch
import torch.nn.functional as F

from ..registry import DISTILLERS
from .base import Distiller


def cosine_conditional_probabilities(embedding, eps=1e-7):
    """``P[i, j]``: the cosine similarity of rows i and j mapped to [0, 1], divided
    by its row's sum (a kernel density estimate conditioned on sample i)."""
    unit = embedding / (embedding.norm(dim=1, keepdim=True) + eps)
    unit = torch.where(torch.isnan(unit), torch.zeros_like(unit), unit)
    similarity = (unit @ unit.t() + 1.0) / 2.0
    return similarity / similarity.sum(dim=1, keepdim=True)


def pkt_loss(student, teacher, eps=1e-7):
    """KL divergence between the teacher's and the student's conditional
    probabilities, averaged over all ``B * B`` entries (mdistiller's reduction), in fp32.

    Args:
        student, teacher: ``[B, D]`` embeddings (widths may differ).

    Returns:
        A scalar tensor; no gradient reaches ``teacher``.
    """
    p_student = cosine_conditional_probabilities(student.float(), eps)
    p_teacher = cosine_conditional_probabilities(teacher.float().detach(), eps)
    return (p_teacher * torch.log((p_teacher + eps) / (p_student + eps))).mean()


@DISTILLERS.register("PKT")
class PKT(Distiller):
    """Cross-entropy plus probabilistic knowledge transfer on ``pooled_feat``.

    Args:
        student, teacher: the models.
        ce_weight, feat_weight: weights of the two terms.
    """

    teacher_reads = frozenset({"pooled_feat"})
    student_reads = frozenset({"logits", "pooled_feat"})
    reads_hard_labels = False

    def __init__(self, student, teacher, ce_weight=1.0, feat_weight=30000.0):
        super().__init__(student, teacher)
        self.ce_weight = ce_weight
        self.feat_weight = feat_weight

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        return cls(student, teacher, ce_weight=cfg.PKT.LOSS.CE_WEIGHT,
                   feat_weight=cfg.PKT.LOSS.FEAT_WEIGHT)

    def forward_train(self, image, target, **batch):
        logits, feats = self.student(image)
        _, teacher_feats = self.teacher_forward(image)
        # fp32: the probabilities are near 1/B and their differences are tiny.
        with torch.autocast(image.device.type, enabled=False):
            transfer = pkt_loss(feats["pooled_feat"], teacher_feats["pooled_feat"])
        return logits, {"loss_ce": self.ce_weight * F.cross_entropy(logits.float(), target),
                        "loss_feat": self.feat_weight * transfer}
