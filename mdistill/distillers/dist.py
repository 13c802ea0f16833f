"""DIST: Huang et al., "Knowledge Distillation from A Stronger Teacher" (NeurIPS 2022).

Facts from the authors' code (hunto/DIST_KD, hunto/image_classification_sota
``lib/models/losses/dist_kd.py``): the Pearson correlation is the cosine
similarity of mean-centred rows with ``eps = 1e-8`` added to the norm
product; CIFAR-100 uses tau 4, beta = gamma = 1 and a distillation weight of
2 next to a cross-entropy weight of 1; ImageNet uses tau 1 with the same
weights (``configs/strategies/distill/resnet_dist.yaml``: ``kd_loss_weight: 2``).
"""
import torch.nn.functional as F

from ..registry import DISTILLERS
from .base import Distiller


def pearson_correlation(a, b, eps=1e-8):
    """Row-wise Pearson correlation of two ``[N, D]`` tensors (centred cosine)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(student_logits, teacher_logits, tau=1.0, beta=1.0, gamma=1.0):
    """DIST's relation loss, computed in fp32.

    With ``y = softmax(z / tau)``: the inter-class term is ``1 -`` the mean over
    samples of the Pearson correlation between the student's and the teacher's
    prediction rows, the intra-class term the same over classes (columns).

    Returns:
        ``tau^2 * (beta * inter + gamma * intra)``.
    """
    student = F.softmax(student_logits.float() / tau, dim=1)
    teacher = F.softmax(teacher_logits.float() / tau, dim=1)
    inter = 1 - pearson_correlation(student, teacher).mean()
    intra = 1 - pearson_correlation(student.t(), teacher.t()).mean()
    return tau ** 2 * (beta * inter + gamma * intra)


@DISTILLERS.register("DIST")
class DIST(Distiller):
    """Cross-entropy plus DIST's inter- and intra-class correlation loss.

    Args:
        student, teacher: the models.
        tau: softmax temperature (the loss is scaled by tau^2).
        beta, gamma: weights of the inter-class (per sample) and intra-class
            (per class) relation terms.
        ce_weight, kd_weight: weights of the cross-entropy and the DIST loss.
    """

    teacher_reads = frozenset({"logits"})
    student_reads = frozenset({"logits"})
    reads_hard_labels = False

    def __init__(self, student, teacher, tau=4.0, beta=1.0, gamma=1.0, ce_weight=1.0,
                 kd_weight=2.0):
        super().__init__(student, teacher)
        self.tau = tau
        self.beta = beta
        self.gamma = gamma
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        return cls(student, teacher, tau=cfg.DIST.TAU, beta=cfg.DIST.BETA, gamma=cfg.DIST.GAMMA,
                   ce_weight=cfg.DIST.LOSS.CE_WEIGHT, kd_weight=cfg.DIST.LOSS.KD_WEIGHT)

    def teacher_temperatures(self):
        return (float(self.tau),)

    def forward_train(self, image, target, **batch):
        logits, _ = self.student(image)
        teacher_logits, _ = self.teacher_forward(image)
        loss = dist_loss(logits, teacher_logits, self.tau, self.beta, self.gamma)
        return logits, {"loss_ce": self.ce_weight * F.cross_entropy(logits.float(), target),
                        "loss_kd": self.kd_weight * loss}
