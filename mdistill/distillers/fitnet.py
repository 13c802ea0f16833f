"""FITNET: Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015)."""
from torch import nn
import torch.nn.functional as F

from ..errors import UserError
from ..registry import DISTILLERS
from .base import Distiller, probe_features


class Regressor(nn.Module):
    """Maps the student's hint-layer map to the teacher's shape: conv, BN, ReLU.

    A strided conv halves the size, a transposed conv doubles it, and a 3x3
    conv keeps it; which one is picked from the probed shapes.
    """

    def __init__(self, student_shape, teacher_shape):
        super().__init__()
        s_channels, s_height = student_shape[0], student_shape[1]
        t_channels, t_height = teacher_shape[0], teacher_shape[1]
        if s_height == 2 * t_height:
            self.conv = nn.Conv2d(s_channels, t_channels, 3, stride=2, padding=1)
        elif s_height * 2 == t_height:
            self.conv = nn.ConvTranspose2d(s_channels, t_channels, 4, stride=2, padding=1)
        elif s_height >= t_height:
            self.conv = nn.Conv2d(s_channels, t_channels, 1 + s_height - t_height)
        else:
            raise UserError(f"FitNet cannot map a {s_height}x{s_height} student map to a "
                            f"{t_height}x{t_height} teacher map; pick another FITNET.HINT_LAYER")
        self.bn = nn.BatchNorm2d(t_channels)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


@DISTILLERS.register("FITNET")
class FitNet(Distiller):
    """Cross-entropy plus the MSE between a regressed student hint and the teacher's.

    Args:
        student, teacher: the models.
        hint_layer: index into ``feats["feats"]`` of both models.
        ce_weight, feat_weight: weights of the two terms.
        image_shape: input shape used to probe the feature shapes.
    """

    def __init__(self, student, teacher, hint_layer=2, ce_weight=1.0, feat_weight=100.0,
                 image_shape=(3, 32, 32)):
        super().__init__(student, teacher)
        _, student_feats = probe_features(student, image_shape)
        _, teacher_feats = probe_features(teacher, image_shape)
        available = min(len(student_feats["feats"]), len(teacher_feats["feats"]))
        if not 0 <= hint_layer < available:
            raise UserError(f"FITNET.HINT_LAYER {hint_layer} is out of range: the models give "
                            f"{available} feature maps (valid 0..{available - 1})")
        self.hint_layer = hint_layer
        self.ce_weight = ce_weight
        self.feat_weight = feat_weight
        self.regressor = Regressor(tuple(student_feats["feats"][hint_layer].shape[1:]),
                                   tuple(teacher_feats["feats"][hint_layer].shape[1:]))

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        size = getattr(data_info, "image_size", 32)
        return cls(student, teacher, hint_layer=cfg.FITNET.HINT_LAYER,
                   ce_weight=cfg.FITNET.LOSS.CE_WEIGHT, feat_weight=cfg.FITNET.LOSS.FEAT_WEIGHT,
                   image_shape=(3, size, size))

    def forward_train(self, image, target, **batch):
        logits, feats = self.student(image)
        _, teacher_feats = self.teacher_forward(image)
        hint = self.regressor(feats["feats"][self.hint_layer])
        mse = F.mse_loss(hint.float(), teacher_feats["feats"][self.hint_layer].float())
        return logits, {"loss_ce": self.ce_weight * F.cross_entropy(logits.float(), target),
                        "loss_feat": self.feat_weight * mse}
