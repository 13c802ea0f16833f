"""VID: Ahn et al., "Variational Information Distillation for Knowledge Transfer"
(CVPR 2019)."""
import math

import torch
from torch import nn
import torch.nn.functional as F

from ..models import pair_model_stages
from ..registry import DISTILLERS
from .base import Distiller, match_spatial_size


def vid_regressor(in_channels, out_channels):
    """The mean predictor: three 1x1 convolutions without bias, ReLU between them."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.ReLU(),
                         nn.Conv2d(out_channels, out_channels, 1, bias=False), nn.ReLU(),
                         nn.Conv2d(out_channels, out_channels, 1, bias=False))


def vid_loss(predicted_mean, teacher_feature, log_scale, eps=1e-5):
    """Gaussian negative log-likelihood of the teacher's map, up to a constant, in fp32.

    ``0.5 * ((mu - t)^2 / var + log var)`` averaged over every element, with
    the per-channel variance ``var = softplus(log_scale) + eps``.

    Args:
        predicted_mean, teacher_feature: ``[B, C, H, W]`` maps of one size.
        log_scale: ``[C]`` the variance's parameter before the softplus.
    """
    variance = (F.softplus(log_scale.float()) + eps).view(1, -1, 1, 1)
    error = (predicted_mean.float() - teacher_feature.float().detach()).pow(2)
    return 0.5 * (error / variance + variance.log()).mean()


@DISTILLERS.register("VID")
class VID(Distiller):
    """Cross-entropy plus variational information distillation on every paired stage.

    Stages pair by what the models declare (:func:`~mdistill.models.pair_stages`:
    stems left out, the others paired from the deepest backwards, which for
    mdistiller's CIFAR pairs is its ``feats[1:]`` pairing). For each pair, a
    regressor maps the student's map (average-pooled to the teacher's size
    when larger, or the teacher's pooled to the student's) to the mean of a
    Gaussian over the teacher's map, with a learned per-channel variance.
    The regressors and the variances train with the student (mdistiller
    kept the variances in a plain list, so they were never trained).

    Args:
        student, teacher: the models.
        ce_weight, feat_weight: weights of the two terms.
        init_pred_var: the variances' initial value.
        eps: floor added to the variances.
        image_shape: ``(C, H, W)`` of the inputs, used to probe the stages.
    """

    teacher_reads = frozenset({"feats"})
    student_reads = frozenset({"logits", "feats"})
    reads_hard_labels = False

    def __init__(self, student, teacher, ce_weight=1.0, feat_weight=1.0, init_pred_var=5.0,
                 eps=1e-5, image_shape=(3, 32, 32)):
        super().__init__(student, teacher)
        self.ce_weight = ce_weight
        self.feat_weight = feat_weight
        self.eps = eps
        (_, student_feats), (_, teacher_feats) = self.probe(image_shape)
        self.stage_pairs = pair_model_stages(student, teacher, image_shape,
                                             student_feats, teacher_feats)
        pairs = [(student_feats["feats"][s], teacher_feats["feats"][t])
                 for s, t in self.stage_pairs]
        self.regressors = nn.ModuleList(vid_regressor(s.shape[1], t.shape[1]) for s, t in pairs)
        # softplus(log_scale) + eps == init_pred_var at the start.
        start = math.log(math.expm1(init_pred_var - eps))
        self.log_scales = nn.ParameterList(nn.Parameter(torch.full((t.shape[1],), start))
                                           for _, t in pairs)
        self.regressors.to(student_feats["feats"][0].device)
        self.log_scales.to(student_feats["feats"][0].device)

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        # VID.INPUT_SIZE is not read: the probe uses the dataset's real image size.
        size = getattr(data_info, "image_size", 32)
        return cls(student, teacher, ce_weight=cfg.VID.LOSS.CE_WEIGHT,
                   feat_weight=cfg.VID.LOSS.FEAT_WEIGHT, init_pred_var=cfg.VID.INIT_PRED_VAR,
                   eps=cfg.VID.EPS, image_shape=(3, size, size))

    def forward_train(self, image, target, **batch):
        logits, feats = self.student(image)
        _, teacher_feats = self.teacher_forward(image)
        transfer = torch.zeros((), device=image.device)
        for regressor, log_scale, (student_index, teacher_index) in zip(
                self.regressors, self.log_scales, self.stage_pairs):
            student_feature = feats["feats"][student_index]
            teacher_feature = teacher_feats["feats"][teacher_index]
            student_feature, teacher_feature = match_spatial_size(student_feature, teacher_feature)
            predicted = regressor(student_feature)
            with torch.autocast(image.device.type, enabled=False):
                transfer = transfer + vid_loss(predicted, teacher_feature, log_scale, self.eps)
        return logits, {"loss_ce": self.ce_weight * F.cross_entropy(logits.float(), target),
                        "loss_feat": self.feat_weight * transfer}
