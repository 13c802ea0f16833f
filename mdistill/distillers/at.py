"""AT: Zagoruyko & Komodakis, "Paying More Attention to Attention" (ICLR 2017)."""
import torch
import torch.nn.functional as F

from ..registry import DISTILLERS
from .base import Distiller


def attention_map(feature, p):
    """Mean over channels of ``f ** p``, flattened and L2-normalised per sample.

    As mdistiller, ``f ** p`` without an absolute value: the same for the
    default even ``p``.
    """
    return F.normalize(feature.float().pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(student_feature, teacher_feature, p):
    """Mean squared difference of the two attention maps, in fp32.

    When the spatial sizes differ the larger feature map is average-pooled
    to the smaller one's size before its attention map is taken.

    Args:
        student_feature, teacher_feature: ``[B, C, H, W]`` maps (channels may differ).
        p: the exponent.

    Returns:
        A scalar tensor.
    """
    student_feature, teacher_feature = student_feature.float(), teacher_feature.float()
    s_size, t_size = student_feature.shape[2], teacher_feature.shape[2]
    if s_size > t_size:
        student_feature = F.adaptive_avg_pool2d(student_feature, teacher_feature.shape[2:])
    elif t_size > s_size:
        teacher_feature = F.adaptive_avg_pool2d(teacher_feature, student_feature.shape[2:])
    return (attention_map(student_feature, p) - attention_map(teacher_feature, p)).pow(2).mean()


@DISTILLERS.register("AT")
class AT(Distiller):
    """Cross-entropy plus attention transfer on every stage (``feats[1:]``).

    ``loss_ce = ce_weight * CE`` and ``loss_feat = feat_weight * sum over
    stages of at_loss``; when one model has more stages, the extra ones are
    left out (stages are paired from the first).

    Args:
        student, teacher: the models.
        p: exponent of the attention map.
        ce_weight, feat_weight: weights of the two terms.
    """

    def __init__(self, student, teacher, p=2, ce_weight=1.0, feat_weight=1000.0):
        super().__init__(student, teacher)
        self.p = p
        self.ce_weight = ce_weight
        self.feat_weight = feat_weight

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        return cls(student, teacher, p=cfg.AT.P, ce_weight=cfg.AT.LOSS.CE_WEIGHT,
                   feat_weight=cfg.AT.LOSS.FEAT_WEIGHT)

    def forward_train(self, image, target, **batch):
        logits, feats = self.student(image)
        _, teacher_feats = self.teacher_forward(image)
        pairs = list(zip(feats["feats"][1:], teacher_feats["feats"][1:]))
        # fp32 throughout: squares of fp16 activations overflow and their
        # normalised differences underflow.
        with torch.autocast(image.device.type, enabled=False):
            transfer = sum((at_loss(student, teacher, self.p) for student, teacher in pairs),
                           torch.zeros((), device=image.device))
        return logits, {"loss_ce": self.ce_weight * F.cross_entropy(logits.float(), target),
                        "loss_feat": self.feat_weight * transfer}
