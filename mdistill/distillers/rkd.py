"""RKD: Park et al., "Relational Knowledge Distillation" (CVPR 2019)."""
import torch
import torch.nn.functional as F

from ..registry import DISTILLERS
from .base import Distiller


def pairwise_distances(embedding, squared=False, eps=1e-12):
    """Euclidean distances between all rows ``[B, B]``, with a zero diagonal.

    Squared distances are clamped at ``eps`` before the square root, whose
    gradient is infinite at 0.
    """
    squares = embedding.pow(2).sum(dim=1)
    product = embedding @ embedding.t()
    distances = (squares.unsqueeze(0) + squares.unsqueeze(1) - 2 * product).clamp(min=eps)
    if not squared:
        distances = distances.sqrt()
    distances = distances.clone()
    distances[range(len(embedding)), range(len(embedding))] = 0
    return distances


def rkd_distance_loss(student, teacher, squared=False, eps=1e-12):
    """Smooth-L1 between the distance matrices, each divided by its mean nonzero entry.

    Args:
        student, teacher: ``[B, D]`` embeddings (widths may differ).

    Returns:
        A scalar tensor; no gradient reaches ``teacher``.
    """
    with torch.no_grad():
        t_distances = pairwise_distances(teacher, squared, eps)
        t_distances = t_distances / t_distances[t_distances > 0].mean()
    s_distances = pairwise_distances(student, squared, eps)
    s_distances = s_distances / s_distances[s_distances > 0].mean()
    return F.smooth_l1_loss(s_distances, t_distances)


def triplet_angles(embedding):
    """Cosines ``<e_ij, e_kj>`` of the angle at ``x_j`` for every triplet, flattened
    (``e_ij = (x_i - x_j) / |x_i - x_j|``; 0 where two points coincide)."""
    differences = F.normalize(embedding.unsqueeze(0) - embedding.unsqueeze(1), p=2, dim=2)
    return torch.bmm(differences, differences.transpose(1, 2)).view(-1)


def rkd_angle_loss(student, teacher):
    """Smooth-L1 between the triplet-angle cosines of the two embeddings."""
    with torch.no_grad():
        t_angles = triplet_angles(teacher)
    return F.smooth_l1_loss(triplet_angles(student), t_angles)


@DISTILLERS.register("RKD")
class RKD(Distiller):
    """Cross-entropy plus distance- and angle-wise relations of the pooled features.

    ``loss_ce = ce_weight * CE`` and ``loss_feat = feat_weight *
    (distance_weight * distance loss + angle_weight * angle loss)``, as
    mdistiller, computed in fp32.

    Args:
        student, teacher: the models.
        distance_weight, angle_weight: weights inside the relational loss.
        ce_weight, feat_weight: weights of cross-entropy and the relational loss.
        squared: use squared distances.
        eps: clamp of the squared distances.
    """

    teacher_reads = frozenset({"pooled_feat"})
    student_reads = frozenset({"logits", "pooled_feat"})
    reads_hard_labels = False

    def __init__(self, student, teacher, distance_weight=25.0, angle_weight=50.0, ce_weight=1.0,
                 feat_weight=1.0, squared=False, eps=1e-12):
        super().__init__(student, teacher)
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight
        self.ce_weight = ce_weight
        self.feat_weight = feat_weight
        self.squared = squared
        self.eps = eps

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        return cls(student, teacher, distance_weight=cfg.RKD.DISTANCE_WEIGHT,
                   angle_weight=cfg.RKD.ANGLE_WEIGHT, ce_weight=cfg.RKD.LOSS.CE_WEIGHT,
                   feat_weight=cfg.RKD.LOSS.FEAT_WEIGHT, squared=cfg.RKD.PDIST.SQUARED,
                   eps=cfg.RKD.PDIST.EPSILON)

    def forward_train(self, image, target, **batch):
        logits, feats = self.student(image)
        _, teacher_feats = self.teacher_forward(image)
        # fp32: under autocast the Gram matrix would be fp16, and |a|^2 + |b|^2 - 2ab
        # cancels catastrophically for close points.
        with torch.autocast(image.device.type, enabled=False):
            student = feats["pooled_feat"].float()
            teacher = teacher_feats["pooled_feat"].float()
            distance = rkd_distance_loss(student, teacher, self.squared, self.eps)
            angle = rkd_angle_loss(student, teacher)
        relational = self.distance_weight * distance + self.angle_weight * angle
        return logits, {"loss_ce": self.ce_weight * F.cross_entropy(logits.float(), target),
                        "loss_feat": self.feat_weight * relational}
