"""SP: Tung & Mori, "Similarity-Preserving Knowledge Distillation" (ICCV 2019)."""
import torch
import torch.nn.functional as F

from ..registry import DISTILLERS
from .base import Distiller


def batch_similarity(feature):
    """The ``[B, B]`` Gram matrix of the flattened samples, each row L2-normalised."""
    flat = feature.flatten(1)
    return F.normalize(flat @ flat.t(), dim=1)


def sp_loss(student_feature, teacher_feature):
    """Squared Frobenius distance of the two similarity matrices divided by ``B^2``, in fp32.

    Args:
        student_feature, teacher_feature: ``[B, ...]`` activations (shapes may differ).

    Returns:
        A scalar tensor; no gradient reaches ``teacher_feature``.
    """
    batch = student_feature.shape[0]
    difference = (batch_similarity(teacher_feature.float().detach())
                  - batch_similarity(student_feature.float()))
    return difference.pow(2).sum() / batch ** 2


@DISTILLERS.register("SP")
class SP(Distiller):
    """Cross-entropy plus similarity preservation on the last feature map (``feats[-1]``).

    Args:
        student, teacher: the models.
        ce_weight, feat_weight: weights of the two terms.
    """

    teacher_reads = frozenset({"feats"})
    student_reads = frozenset({"logits", "feats"})
    reads_hard_labels = False

    def __init__(self, student, teacher, ce_weight=1.0, feat_weight=3000.0):
        super().__init__(student, teacher)
        self.ce_weight = ce_weight
        self.feat_weight = feat_weight

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        return cls(student, teacher, ce_weight=cfg.SP.LOSS.CE_WEIGHT,
                   feat_weight=cfg.SP.LOSS.FEAT_WEIGHT)

    def forward_train(self, image, target, **batch):
        logits, feats = self.student(image)
        _, teacher_feats = self.teacher_forward(image)
        # fp32: Gram matrices of half-precision maps overflow.
        with torch.autocast(image.device.type, enabled=False):
            transfer = sp_loss(feats["feats"][-1], teacher_feats["feats"][-1])
        return logits, {"loss_ce": self.ce_weight * F.cross_entropy(logits.float(), target),
                        "loss_feat": self.feat_weight * transfer}
