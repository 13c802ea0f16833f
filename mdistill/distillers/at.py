"""AT: Zagoruyko & Komodakis, "Paying More Attention to Attention" (ICLR 2017)."""
import torch
import torch.nn.functional as F

from ..models import pair_model_stages
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
    """Cross-entropy plus attention transfer on every paired stage.

    ``loss_ce = ce_weight * CE`` and ``loss_feat = feat_weight * sum over
    paired stages of at_loss``. Stages pair by what the models declare
    (:func:`~mdistill.models.pair_stages`): stems are left out, the others pair
    from the deepest backwards, and the shallowest stages of the model with
    more are left out. For mdistiller's CIFAR pairs (equal stage counts) this is
    its ``feats[1:]`` pairing.

    Args:
        student, teacher: the models.
        p: exponent of the attention map.
        ce_weight, feat_weight: weights of the two terms.
        image_shape: ``(C, H, W)`` of the inputs, at which the stages are probed.
    """

    teacher_reads = frozenset({"feats"})
    student_reads = frozenset({"logits", "feats"})
    reads_hard_labels = False

    def __init__(self, student, teacher, p=2, ce_weight=1.0, feat_weight=1000.0,
                 image_shape=(3, 32, 32)):
        super().__init__(student, teacher)
        self.p = p
        self.ce_weight = ce_weight
        self.feat_weight = feat_weight
        (_, student_feats), (_, teacher_feats) = self.probe(image_shape)
        self.stage_pairs = pair_model_stages(student, teacher, image_shape,
                                             student_feats, teacher_feats)

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        size = getattr(data_info, "image_size", 32)
        return cls(student, teacher, p=cfg.AT.P, ce_weight=cfg.AT.LOSS.CE_WEIGHT,
                   feat_weight=cfg.AT.LOSS.FEAT_WEIGHT, image_shape=(3, size, size))

    def forward_train(self, image, target, **batch):
        logits, feats = self.student(image)
        _, teacher_feats = self.teacher_forward(image)
        student_maps, teacher_maps = feats["feats"], teacher_feats["feats"]
        pairs = [(student_maps[s], teacher_maps[t]) for s, t in self.stage_pairs]
        # fp32 throughout: squares of fp16 activations overflow and their
        # normalised differences underflow.
        with torch.autocast(image.device.type, enabled=False):
            transfer = sum((at_loss(student, teacher, self.p) for student, teacher in pairs),
                           torch.zeros((), device=image.device))
        return logits, {"loss_ce": self.ce_weight * F.cross_entropy(logits.float(), target),
                        "loss_feat": self.feat_weight * transfer}
