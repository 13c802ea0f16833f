"""OFD: Heo et al., "A Comprehensive Overhaul of Feature Distillation" (ICCV 2019)."""
import math

import torch
from torch import nn
import torch.nn.functional as F

from ..errors import UserError, unknown_choice
from ..registry import DISTILLERS
from .base import Distiller

#: OFD.TEACHER_BN: the statistics the teacher's BatchNorms normalise with.
TEACHER_BN = ("batch", "eval")


def connector(student_channels, teacher_channels, kernel_size=1):
    """Conv (no bias) and BN from the student's width to the teacher's, with
    He-normal weights (fan-out), BN scale 1 and shift 0."""
    conv = nn.Conv2d(student_channels, teacher_channels, kernel_size,
                     padding=(kernel_size - 1) // 2, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (kernel_size * kernel_size
                                                       * teacher_channels)))
    return nn.Sequential(conv, nn.BatchNorm2d(teacher_channels))


def bn_margin(weight, bias):
    """Per channel, the expected value of the negative responses of ``x ~ N(bias,
    weight^2)`` (the BN's output model): ``E[x | x < 0] = m - s phi(m/s) / Phi(-m/s)``
    with ``s = |weight|``, ``m = bias``; ``-3 s`` where ``P(x < 0) <= 0.001``.

    Computed in float64; returns float32.
    """
    scale, mean = weight.detach().double().abs(), bias.detach().double()
    ratio = mean / scale
    negative = torch.special.ndtr(-ratio)
    density = torch.exp(-ratio ** 2 / 2) / math.sqrt(2 * math.pi)
    margin = torch.where(negative > 0.001, mean - scale * density / negative, -3 * scale)
    return margin.float()


def ofd_feature_loss(student, teacher, margin):
    """The partial L2 distance, in fp32, summed over channels and positions and
    averaged over the batch.

    A position counts ``(s - t)^2`` where the teacher is positive, or where it is
    negative above the margin ``m`` and the student is above it; and ``(s - m)^2``
    where the teacher is at or below the margin and the student above the margin.
    Elsewhere (the student below a teacher's negative response) it counts nothing.

    Args:
        student, teacher: ``[B, C, H, W]`` pre-ReLU maps.
        margin: ``[C]`` (or broadcastable) margins.
    """
    student, teacher = student.float(), teacher.float()
    margin = margin.float().view(1, -1, 1, 1)
    to_margin = (student > margin) & (teacher <= margin)
    to_teacher = (teacher > 0) | ((student > teacher) & (teacher > margin))
    loss = ((student - margin) ** 2 * to_margin + (student - teacher) ** 2 * to_teacher)
    return loss.sum() / student.shape[0]


@DISTILLERS.register("OFD")
class OFD(Distiller):
    """Cross-entropy plus the overhaul feature distillation loss.

    The student's pre-ReLU stage maps (``preact_feats[1:]``) go through a
    connector (conv-BN) each and meet the teacher's (average-pooled to the
    student's size) in :func:`ofd_feature_loss`, with per-channel margins from
    the shifts and scales of the BNs before the teacher's ReLUs
    (``teacher.bn_before_relu()``). When one model has more stages, the
    deepest ones of the other are paired; stage i of n counts ``1 / 2^(n-1-i)``.
    The connectors train with the student.

    The teacher's BatchNorms normalise with the training batch's statistics by
    default (``teacher_bn="batch"``), as the authors' code and mdistiller run the
    teacher (in train mode): the margins model each BN's output as
    ``N(shift, scale^2)`` per channel, which is exactly what a BN gives with its
    batch's statistics, and the published numbers were measured so. Unlike
    train mode, the teacher's running statistics are left untouched
    (:func:`~mdistill.utils.batchnorm.batch_statistics`), so its evaluation
    and every other reader of the teacher see the weights it was saved with.
    ``teacher_bn="eval"`` uses the running statistics instead, as every other
    method's teacher.

    Args:
        student, teacher: the models; the teacher needs ``bn_before_relu()``.
        ce_weight, feat_weight: weights of the two terms.
        kernel_size: the connectors' kernel size.
        image_shape: ``(C, H, W)`` of the inputs, used to probe the stage widths.
        teacher_bn: ``batch`` | ``eval`` (OFD.TEACHER_BN).
    """

    teacher_reads = frozenset({"preact_feats", "bn_stats"})
    student_reads = frozenset({"logits", "preact_feats"})
    reads_hard_labels = False

    def __init__(self, student, teacher, ce_weight=1.0, feat_weight=0.001, kernel_size=1,
                 image_shape=(3, 32, 32), teacher_bn="batch"):
        super().__init__(student, teacher)
        self.ce_weight = ce_weight
        self.feat_weight = feat_weight
        if teacher_bn not in TEACHER_BN:
            raise unknown_choice("value for OFD.TEACHER_BN:", teacher_bn, TEACHER_BN)
        self.teacher_bn = teacher_bn
        if not hasattr(teacher, "bn_before_relu"):
            raise UserError(f"OFD needs a teacher with bn_before_relu(); "
                            f"{type(teacher).__name__} has none")
        (_, student_feats), (_, teacher_feats) = self.probe(image_shape)
        student_maps = student_feats["preact_feats"][1:]
        teacher_maps = teacher_feats["preact_feats"][1:]
        self.num_stages = min(len(student_maps), len(teacher_maps))
        student_maps = student_maps[-self.num_stages:]
        teacher_maps = teacher_maps[-self.num_stages:]
        records = teacher.bn_before_relu()[1:][-self.num_stages:]
        self.connectors = nn.ModuleList(
            connector(s.shape[1], t.shape[1], kernel_size)
            for s, t in zip(student_maps, teacher_maps)).to(teacher_maps[0].device)
        for index, (record, teacher_map) in enumerate(zip(records, teacher_maps)):
            margin = torch.zeros(teacher_map.shape[1], device=teacher_map.device)
            margin[record.channels] = bn_margin(record.bn.weight, record.bn.bias)
            # Derived from the teacher, so not saved: rebuilt with the distiller.
            self.register_buffer(f"margin{index}", margin, persistent=False)

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        size = getattr(data_info, "image_size", 32)
        return cls(student, teacher, ce_weight=cfg.OFD.LOSS.CE_WEIGHT,
                   feat_weight=cfg.OFD.LOSS.FEAT_WEIGHT,
                   kernel_size=cfg.OFD.CONNECTOR.KERNEL_SIZE, image_shape=(3, size, size),
                   teacher_bn=cfg.OFD.TEACHER_BN)

    def margins(self):
        return [getattr(self, f"margin{index}") for index in range(self.num_stages)]

    def forward_train(self, image, target, **batch):
        logits, feats = self.student(image)
        _, teacher_feats = self.teacher_forward(image,
                                                batch_statistics=self.teacher_bn == "batch")
        student_maps = feats["preact_feats"][1:][-self.num_stages:]
        teacher_maps = teacher_feats["preact_feats"][1:][-self.num_stages:]
        loss = 0.0
        for index, (connect, student_map, teacher_map, margin) in enumerate(
                zip(self.connectors, student_maps, teacher_maps, self.margins())):
            mapped = connect(student_map)
            teacher_map = F.adaptive_avg_pool2d(teacher_map, mapped.shape[-2:])
            loss = loss + ofd_feature_loss(mapped, teacher_map, margin) / 2 ** (
                self.num_stages - 1 - index)
        return logits, {"loss_ce": self.ce_weight * F.cross_entropy(logits.float(), target),
                        "loss_kd": self.feat_weight * loss}
