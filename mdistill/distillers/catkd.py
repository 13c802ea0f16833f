"""CAT-KD: Guo et al., "Class Attention Transfer Based Knowledge Distillation"
(CVPR 2023).

Facts from the authors' code (GzyAftermath/CAT-KD ``mdistiller/distillers/CAT_KD.py``,
``tools/train.py``, ``configs/cifar100/CAT_KD/*.yaml``): the models are rebuilt
so that their classifier's weights act as a bias-free 1x1 convolution on the
last pre-pool map, giving one class activation map (CAM) per class; the
student's and the teacher's CAMs are average-pooled to ``CAM_RESOLUTION``
squared cells, optionally L2-normalised over the cells (``IF_NORMALIZE``), and
compared by MSE (mean over every element) with weight beta
(``CAT_loss_weight``), added to the cross-entropy.

Here the models stay as they are: the CAMs are computed from the map each
model pools into its classifier (:class:`~mdistill.distillers.sdd.MapClassifier`),
pooled first and then projected by the classifier's weight, which is the same
(pooling and the projection are both linear). The student keeps its
classifier's bias for its logits; the authors' rebuilt student has none.
"""
import torch
import torch.nn.functional as F

from ..registry import DISTILLERS
from .base import Distiller
from .sdd import MapClassifier


def class_activation_maps(feature_map, weight, resolution):
    """The classifier ``weight`` (``[classes, C]``) applied at every cell of
    ``feature_map`` average-pooled to ``resolution`` squared cells, in fp32.

    Returns:
        ``[B, classes, resolution, resolution]``.
    """
    with torch.autocast(feature_map.device.type, enabled=False):
        pooled = F.adaptive_avg_pool2d(feature_map.float(), resolution)
        return torch.einsum("kc,bchw->bkhw", weight.float(), pooled)


def cat_loss(student_cams, teacher_cams, normalize):
    """MSE between the two CAMs, each L2-normalised over its cells when ``normalize``."""
    if normalize:
        student_cams = F.normalize(student_cams, dim=(2, 3))
        teacher_cams = F.normalize(teacher_cams, dim=(2, 3))
    return F.mse_loss(student_cams, teacher_cams)


@DISTILLERS.register("CATKD")
class CATKD(Distiller):
    """Cross-entropy plus the MSE between pooled class activation maps.

    ``loss_ce = ce_weight * CE`` and ``loss_cat = cat_weight * MSE(CAM_s, CAM_t)``.

    Args:
        student, teacher: the models (zoo models whose last map is pooled
            straight into a linear classifier).
        ce_weight: weight of the cross-entropy.
        cat_weight: beta, the weight of the CAT loss.
        resolution: side of the pooled CAMs.
        normalize: L2-normalise each pooled CAM before the MSE.
        image_shape: ``(C, H, W)`` of the training images, to probe the models.

    Raises:
        UserError: a model whose classifier input cannot be found (see
            :class:`~mdistill.distillers.sdd.MapClassifier`).
    """

    # The map each model pools (WRN's instances read relu(preact_feats[-1]) instead).
    teacher_reads = frozenset({"feats"})
    student_reads = frozenset({"logits", "feats"})
    reads_hard_labels = False

    def __init__(self, student, teacher, ce_weight=1.0, cat_weight=400.0, resolution=2,
                 normalize=True, image_shape=(3, 32, 32)):
        super().__init__(student, teacher)
        self.ce_weight = ce_weight
        self.cat_weight = cat_weight
        self.resolution = resolution
        self.normalize = normalize
        self.student_map = MapClassifier.locate(student, image_shape, "CAT-KD")
        self.teacher_map = MapClassifier.locate(teacher, image_shape, "CAT-KD")
        self.teacher_reads = self.teacher_map.reads
        self.student_reads = frozenset({"logits"}) | self.student_map.reads

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        size = getattr(data_info, "image_size", 32)
        return cls(student, teacher, ce_weight=cfg.CAT_KD.LOSS.CE_WEIGHT,
                   cat_weight=cfg.CAT_KD.LOSS.CAT_loss_weight,
                   resolution=cfg.CAT_KD.LOSS.CAM_RESOLUTION,
                   normalize=cfg.CAT_KD.IF_NORMALIZE, image_shape=(3, size, size))

    def forward_train(self, image, target, **batch):
        logits, feats = self.student(image)
        _, teacher_feats = self.teacher_forward(image)
        student_cams = class_activation_maps(self.student_map.feature_map(feats),
                                             self.student_map.linear(self.student).weight,
                                             self.resolution)
        with torch.no_grad():
            teacher_cams = class_activation_maps(
                self.teacher_map.feature_map(teacher_feats),
                self.teacher_map.linear(self.teacher).weight, self.resolution)
        return logits, {
            "loss_ce": self.ce_weight * F.cross_entropy(logits.float(), target),
            "loss_cat": self.cat_weight * cat_loss(student_cams, teacher_cams, self.normalize),
        }
