"""CC: Peng et al., "Correlation Congruence for Knowledge Distillation" (ICCV 2019),
as benchmarked in RepDistiller (HobbitLong/RepDistiller ``distiller_zoo/CC.py``,
``train_student.py``).

RepDistiller's CC (code the paper's authors sent, its README says) embeds
both models' pooled features with a trainable linear map each (to 128
dimensions) and penalises, for each pair of neighbouring samples in the
batch, the product of their embedding differences:
``mean_i sum_k |e_s - e_t|[i, k] * |e_s - e_t|[i + 1, k]``. Its CIFAR-100
script weights it 0.02 next to a cross-entropy of weight 1.
"""
import torch.nn.functional as F
from torch import nn

from ..registry import DISTILLERS
from .base import Distiller


def correlation_congruence_loss(student_embedding, teacher_embedding):
    """``mean_i sum_k d[i, k] d[i + 1, k]`` with ``d = |e_s - e_t|``, in fp32."""
    delta = (student_embedding.float() - teacher_embedding.float()).abs()
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


@DISTILLERS.register("CC")
class CC(Distiller):
    """Cross-entropy plus RepDistiller's correlation congruence loss.

    Args:
        student, teacher: the models.
        feat_dim: width of the two linear embeddings (both trained with the student).
        ce_weight, feat_weight: weights of the two terms.
        image_shape: input shape used to probe the pooled feature widths.
    """

    teacher_reads = frozenset({"pooled_feat"})
    student_reads = frozenset({"logits", "pooled_feat"})
    reads_hard_labels = False

    def __init__(self, student, teacher, feat_dim=128, ce_weight=1.0, feat_weight=0.02,
                 image_shape=(3, 32, 32)):
        super().__init__(student, teacher)
        (_, student_feats), (_, teacher_feats) = self.probe(image_shape)
        self.embed_student = nn.Linear(student_feats["pooled_feat"].shape[1], feat_dim)
        self.embed_teacher = nn.Linear(teacher_feats["pooled_feat"].shape[1], feat_dim)
        self.ce_weight = ce_weight
        self.feat_weight = feat_weight

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        size = getattr(data_info, "image_size", 32)
        return cls(student, teacher, feat_dim=cfg.CC.FEAT_DIM, ce_weight=cfg.CC.LOSS.CE_WEIGHT,
                   feat_weight=cfg.CC.LOSS.FEAT_WEIGHT, image_shape=(3, size, size))

    def forward_train(self, image, target, **batch):
        logits, feats = self.student(image)
        _, teacher_feats = self.teacher_forward(image)
        loss = correlation_congruence_loss(self.embed_student(feats["pooled_feat"]),
                                           self.embed_teacher(teacher_feats["pooled_feat"]))
        return logits, {"loss_ce": self.ce_weight * F.cross_entropy(logits.float(), target),
                        "loss_feat": self.feat_weight * loss}
