"""ICKD: Liu et al., "Exploring Inter-Channel Correlation for Diversity-preserved
Knowledge Distillation" (ICCV 2021).

Facts from the authors' code (ADLab-AutoDrive/ICKD ``Cifar100/distiller_zoo/ICKD.py``,
``Cifar100/train_student.py``, ``Cifar100/README.md``; torchdistill's
``ChSimLoss`` in ``torchdistill/losses/mid_level.py`` is the same loss): the
student's last stage map goes through an embedding, a bias-free 1x1 conv and a
BatchNorm to the teacher's width, trained with the student; for each sample the
``C x C`` Gram matrix ``F F^T`` of the flattened map is computed, each of its
rows L2-normalised, and the squared Frobenius distance between the student's
and the teacher's summed over the batch and divided by ``C x batch``
(torchdistill divides by ``C x batch^2``, its ImageNet setting). The loss is
``r CE + a KD + b ICKD``: the README's "ICKD-C (Ours)" is ``-r 1 -a 1 -b 2.5``
with KD at T 4, "ICKD-C (w/o KL)" ``-a 0``.
"""
import torch
from torch import nn
import torch.nn.functional as F

from ..registry import DISTILLERS
from .base import Distiller, kd_loss


def channel_correlation_loss(student_map, teacher_map):
    """ICKD's loss between two maps of equal width, in fp32.

    Args:
        student_map, teacher_map: ``[B, C, H, W]`` (their heights and widths may differ).

    Returns:
        ``sum_b ||N(G_s,b) - N(G_t,b)||_F^2 / (C * B)`` with ``G = F F^T`` over the
        flattened cells and ``N`` the L2 normalisation of each row.
    """
    batch, channels = student_map.shape[:2]

    def correlation(feature_map):
        flat = feature_map.float().flatten(2)
        return F.normalize(torch.bmm(flat, flat.transpose(1, 2)), dim=2)

    with torch.autocast(student_map.device.type, enabled=False):   # the Gram products in fp32
        difference = correlation(student_map) - correlation(teacher_map)
    return difference.pow(2).sum() / (channels * batch)


@DISTILLERS.register("ICKD")
class ICKD(Distiller):
    """Cross-entropy, optional KD, and the inter-channel correlation loss.

    ``loss_ce = ce_weight * CE``, ``loss_kd = kd_weight * KD(T)`` (left out when
    ``kd_weight`` is 0) and ``loss_feat = feat_weight *``
    :func:`channel_correlation_loss` of ``embed(student feats[-1])`` and the
    teacher's ``feats[-1]``. The embedding trains with the student.

    Args:
        student, teacher: the models.
        ce_weight, kd_weight, feat_weight: weights of the three terms.
        temperature: KD's temperature.
        image_shape: ``(C, H, W)`` of the training images, to probe the widths.
    """

    # Without the KD term an instance reads only the teacher's maps.
    teacher_reads = frozenset({"logits", "feats"})
    student_reads = frozenset({"logits", "feats"})
    reads_hard_labels = False

    def __init__(self, student, teacher, ce_weight=1.0, kd_weight=1.0, feat_weight=2.5,
                 temperature=4.0, image_shape=(3, 32, 32)):
        super().__init__(student, teacher)
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.feat_weight = feat_weight
        self.temperature = temperature
        (_, student_feats), (_, teacher_feats) = self.probe(image_shape)
        student_map, teacher_map = student_feats["feats"][-1], teacher_feats["feats"][-1]
        self.embed = nn.Sequential(
            nn.Conv2d(student_map.shape[1], teacher_map.shape[1], 1, bias=False),
            nn.BatchNorm2d(teacher_map.shape[1])).to(student_map.device)
        self.teacher_reads = frozenset({"logits", "feats"} if kd_weight else {"feats"})
        self.student_reads = frozenset({"logits", "feats"})

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        size = getattr(data_info, "image_size", 32)
        return cls(student, teacher, ce_weight=cfg.ICKD.LOSS.CE_WEIGHT,
                   kd_weight=cfg.ICKD.LOSS.KD_WEIGHT, feat_weight=cfg.ICKD.LOSS.FEAT_WEIGHT,
                   temperature=cfg.ICKD.TEMPERATURE, image_shape=(3, size, size))

    def teacher_temperatures(self):
        return (float(self.temperature),) if self.kd_weight else None

    def forward_train(self, image, target, **batch):
        logits, feats = self.student(image)
        teacher_logits, teacher_feats = self.teacher_forward(image)
        losses = {"loss_ce": self.ce_weight * F.cross_entropy(logits.float(), target)}
        if self.kd_weight:
            losses["loss_kd"] = self.kd_weight * kd_loss(logits, teacher_logits, self.temperature)
        losses["loss_feat"] = self.feat_weight * channel_correlation_loss(
            self.embed(feats["feats"][-1]), teacher_feats["feats"][-1])
        return logits, losses
