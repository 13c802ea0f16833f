"""SKD: Jeong, Lee & Choi, "Streamlined Knowledge Distillation" (CVPR 2026), as
torchdistill implements its two terms (yoshitomo-matsubara/torchdistill
``torchdistill/losses/mid_level.py`` ``SKDInstanceLoss`` and ``SKDDirectionLoss``,
sample config ``configs/sample/ilsvrc2012/skd/``; the authors' code is
HyunJunSik/StreamLined ``Distiller/SKD.py``).

* instance term: KL(softmax(t/T) || softmax(s/T)) summed over classes and
  averaged over the batch, without a T^2 factor, at T = 4;
* direction term: the ``[B, B]`` Gram matrices of the L2-normalised logits of
  each model, their difference ``D``; the covariance ``Sigma`` of D's columns
  over its rows (unbiased), regularised ``Sigma' = Sigma + lambda I`` with the
  Tikhonov factor lambda = 0.1; the loss is the mean over samples of the
  Mahalanobis norm ``sqrt(D_i Sigma'^-1 D_i^T)``;
* torchdistill's sample config weights both terms 1 and has no cross-entropy
  (``loss_ce`` weight 0 here by default).

The authors' own code differs from torchdistill's (and the paper's equations)
in ways we do not follow: its Gram matrices are divided by the number of
classes, its KL carries T^2, and both terms are scaled by the fraction of
samples (of classes) kept by MLKD's median confidence masks, next to a
cross-entropy weighted 0.1 (0.5 for resnet32x4 -> resnet8x4).
"""
import torch
import torch.nn.functional as F

from ..registry import DISTILLERS
from .base import Distiller


def instance_loss(student_logits, teacher_logits, temperature=4.0):
    """KL(softmax(t/T) || softmax(s/T)) summed over classes, averaged over the batch
    (no T^2); fp32."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)


def direction_loss(student_logits, teacher_logits, tikhonov=0.1):
    """The mean Mahalanobis norm of the rows of the difference of the two models'
    Gram matrices of L2-normalised logits, under the rows' covariance plus
    ``tikhonov`` times the identity; fp32.

    Args:
        student_logits, teacher_logits: ``[B, C]`` logits (B >= 2).
        tikhonov: lambda, added to the covariance's diagonal.
    """
    student = F.normalize(student_logits.float(), dim=1)
    teacher = F.normalize(teacher_logits.float(), dim=1)
    difference = student @ student.t() - teacher @ teacher.t()
    covariance = torch.cov(difference.t())
    covariance = covariance + tikhonov * torch.eye(len(covariance), device=covariance.device)
    factor = torch.linalg.cholesky(covariance)
    solved = torch.cholesky_solve(difference.t(), factor)      # Sigma'^-1 D^T
    return torch.sqrt((difference * solved.t()).sum(dim=1)).mean()


@DISTILLERS.register("SKD")
class SKD(Distiller):
    """SKD's instance-wise KL and direction-wise Mahalanobis terms on the logits,
    with an optional cross-entropy.

    Args:
        student, teacher: the models.
        temperature: softmax temperature T of the instance term.
        tikhonov: lambda added to the direction term's covariance.
        ce_weight, instance_weight, direction_weight: weights of the three terms.
    """

    teacher_reads = frozenset({"logits"})
    student_reads = frozenset({"logits"})
    reads_hard_labels = False

    def __init__(self, student, teacher, temperature=4.0, tikhonov=0.1, ce_weight=0.0,
                 instance_weight=1.0, direction_weight=1.0):
        super().__init__(student, teacher)
        self.temperature = temperature
        self.tikhonov = tikhonov
        self.ce_weight = ce_weight
        self.instance_weight = instance_weight
        self.direction_weight = direction_weight

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        return cls(student, teacher, temperature=cfg.SKD.TEMPERATURE, tikhonov=cfg.SKD.TIKHONOV,
                   ce_weight=cfg.SKD.LOSS.CE_WEIGHT, instance_weight=cfg.SKD.LOSS.INSTANCE_WEIGHT,
                   direction_weight=cfg.SKD.LOSS.DIRECTION_WEIGHT)

    def teacher_temperatures(self):
        # The direction term reads the raw logits, not a softened prediction.
        return None

    def forward_train(self, image, target, **batch):
        logits, _ = self.student(image)
        teacher_logits, _ = self.teacher_forward(image)
        return logits, {
            "loss_ce": self.ce_weight * F.cross_entropy(logits.float(), target),
            "loss_instance": self.instance_weight * instance_loss(logits, teacher_logits,
                                                                  self.temperature),
            "loss_direction": self.direction_weight * direction_loss(logits, teacher_logits,
                                                                     self.tikhonov),
        }
