"""NST: Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity
Transfer" (2017)."""
import torch
import torch.nn.functional as F

from ..registry import DISTILLERS
from .base import Distiller, match_spatial_size


def polynomial_kernel_mean(a, b):
    """Mean over the batch and every channel pair of ``(<a_i, b_j>)^2``, the
    degree-2 polynomial kernel (c = 0) between channel vectors ``[B, C, N]``."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


def nst_loss(student_feature, teacher_feature):
    """Squared MMD with a polynomial kernel between the two maps' channels.

    Each channel's spatial map is flattened and L2-normalised; the channels
    are the samples of two distributions (their counts may differ). The
    larger map is average-pooled to the smaller one's size first. Computed in fp32.

    Args:
        student_feature, teacher_feature: ``[B, C, H, W]`` maps.

    Returns:
        A scalar tensor; no gradient reaches ``teacher_feature``.
    """
    student_feature, teacher_feature = match_spatial_size(student_feature.float(),
                                                          teacher_feature.float())
    student = F.normalize(student_feature.flatten(2), dim=2)
    teacher = F.normalize(teacher_feature.flatten(2), dim=2).detach()
    return (polynomial_kernel_mean(teacher, teacher) + polynomial_kernel_mean(student, student)
            - 2 * polynomial_kernel_mean(student, teacher))


@DISTILLERS.register("NST")
class NST(Distiller):
    """Cross-entropy plus neuron selectivity transfer on every stage (``feats[1:]``).

    ``loss_ce = ce_weight * CE`` and ``loss_feat = feat_weight * sum over
    stages of nst_loss``; stages are paired from the first, extra ones left out.

    Args:
        student, teacher: the models.
        ce_weight, feat_weight: weights of the two terms.
    """

    def __init__(self, student, teacher, ce_weight=1.0, feat_weight=50.0):
        super().__init__(student, teacher)
        self.ce_weight = ce_weight
        self.feat_weight = feat_weight

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        return cls(student, teacher, ce_weight=cfg.NST.LOSS.CE_WEIGHT,
                   feat_weight=cfg.NST.LOSS.FEAT_WEIGHT)

    def forward_train(self, image, target, **batch):
        logits, feats = self.student(image)
        _, teacher_feats = self.teacher_forward(image)
        pairs = zip(feats["feats"][1:], teacher_feats["feats"][1:])
        # fp32: the squared kernel of half-precision dot products loses the small MMD.
        with torch.autocast(image.device.type, enabled=False):
            transfer = sum((nst_loss(student, teacher) for student, teacher in pairs),
                           torch.zeros((), device=image.device))
        return logits, {"loss_ce": self.ce_weight * F.cross_entropy(logits.float(), target),
                        "loss_feat": self.feat_weight * transfer}
