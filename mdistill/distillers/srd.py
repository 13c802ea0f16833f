"""SRD: Miles & Mikolajczyk, "Understanding the Role of the Projector in Knowledge
Distillation" (AAAI 2024), the simple recipe of the authors' ImageNet code
(roymiles/Simple-Recipe-Distillation ``imagenet/torchdistill/losses/single.py``
``OurDistillationLoss``, config ``imagenet/configs/ilsvrc2012/ours/res3418.yaml``;
torchdistill's ``SRDLoss`` and ``SRDModelWrapper`` hold the same terms).

* the pooled features ``z`` (the classifier's input) of both models; the
  student's goes through a linear projector (with bias) to the teacher's width;
* both are batch-standardized, each dimension by the batch's mean and biased
  variance, ``(x - mean) / sqrt(var + eps)`` with ``eps = 1e-4`` (the authors'
  ``BatchNorm1d(affine=False)``, which their loss module runs in training mode);
* ``loss_feat = feat_weight * log(sum |s - t|^exponent)`` over the whole batch,
  with the authors' exponent 4 and weight 2;
* ``loss_kd``: KL(softmax(t/T) || softmax(s/T)) summed over classes, averaged
  over the batch, times T^2, at the authors' T = 1;
* ``loss_ce``: the cross-entropy, weight 1.

The standardization keeps no running statistics: the authors' never use them
(the teacher's side included; torchdistill's wrapper puts the teacher's
normalisation in eval mode, where its untouched running statistics make it
nearly the identity, a difference we do not follow).
"""
import torch
from torch import nn
import torch.nn.functional as F

from ..registry import DISTILLERS
from .base import Distiller, kd_loss


def batch_standardize(features, eps=1e-4):
    """Each column of ``[B, D]`` features standardized by the batch's mean and biased
    variance, ``(x - mean) / sqrt(var + eps)`` (BatchNorm1d in training, no affine)."""
    features = features.float()
    mean = features.mean(dim=0, keepdim=True)
    variance = features.var(dim=0, unbiased=False, keepdim=True)
    return (features - mean) / torch.sqrt(variance + eps)


def srd_feature_loss(projected_student, teacher_features, exponent=4.0, eps=1e-4):
    """``log(sum |std(s) - std(t)|^exponent)`` of two ``[B, D]`` batches (:func:`batch_standardize`)."""
    difference = batch_standardize(projected_student, eps) - batch_standardize(teacher_features, eps)
    return torch.log(difference.abs().pow(exponent).sum())


@DISTILLERS.register("SRD")
class SRD(Distiller):
    """Cross-entropy, KD, and the log of the summed powered distance between the
    batch-standardized projected student and teacher features.

    Args:
        student, teacher: the models.
        temperature: softmax temperature of the KD term (scaled by T^2).
        exponent: the power of the feature distance.
        eps: the standardization's variance floor.
        ce_weight, kd_weight, feat_weight: weights of the three terms.
        image_shape: input shape used to probe the pooled features' widths.
    """

    teacher_reads = frozenset({"logits", "pooled_feat"})
    student_reads = frozenset({"logits", "pooled_feat"})
    reads_hard_labels = False

    def __init__(self, student, teacher, temperature=1.0, exponent=4.0, eps=1e-4, ce_weight=1.0,
                 kd_weight=1.0, feat_weight=2.0, image_shape=(3, 32, 32)):
        super().__init__(student, teacher)
        (_, student_feats), (_, teacher_feats) = self.probe(image_shape)
        student_pooled, teacher_pooled = student_feats["pooled_feat"], teacher_feats["pooled_feat"]
        self.projector = nn.Linear(student_pooled.shape[1], teacher_pooled.shape[1])
        self.projector.to(student_pooled.device)
        self.temperature = temperature
        self.exponent = exponent
        self.eps = eps
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.feat_weight = feat_weight

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        size = getattr(data_info, "image_size", 32)
        return cls(student, teacher, temperature=cfg.SRD.TEMPERATURE, exponent=cfg.SRD.EXPONENT,
                   eps=cfg.SRD.EPS, ce_weight=cfg.SRD.LOSS.CE_WEIGHT,
                   kd_weight=cfg.SRD.LOSS.KD_WEIGHT, feat_weight=cfg.SRD.LOSS.FEAT_WEIGHT,
                   image_shape=(3, size, size))

    def teacher_temperatures(self):
        return (float(self.temperature),)

    def forward_train(self, image, target, **batch):
        logits, feats = self.student(image)
        teacher_logits, teacher_feats = self.teacher_forward(image)
        projected = self.projector(feats["pooled_feat"])
        loss_feat = srd_feature_loss(projected, teacher_feats["pooled_feat"], self.exponent,
                                     self.eps)
        return logits, {"loss_ce": self.ce_weight * F.cross_entropy(logits.float(), target),
                        "loss_kd": self.kd_weight * kd_loss(logits, teacher_logits,
                                                            self.temperature),
                        "loss_feat": self.feat_weight * loss_feat}
