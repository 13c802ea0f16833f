"""FITNET: Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015)."""
import torch
from torch import nn
import torch.nn.functional as F

from ..errors import UserError
from ..registry import DISTILLERS
from .base import Distiller


class Regressor(nn.Module):
    """Maps the student's hint-layer map to the teacher's shape: conv, BN, ReLU.

    The conv is picked from the two shapes (as mdistiller's ``ConvReg``): a
    3x3 stride-2 conv when the student map is twice the teacher's size, a
    4x4 stride-2 transposed conv when it is half, and otherwise a conv whose
    kernel ``(1 + Hs - Ht, 1 + Ws - Wt)`` shrinks the student map to the
    teacher's size (1x1 when they are equal).

    Args:
        student_shape, teacher_shape: ``(C, H, W)`` of the hint maps.

    Raises:
        UserError: the student map is smaller than the teacher's, but not half its size.
    """

    def __init__(self, student_shape, teacher_shape):
        super().__init__()
        s_channels, s_height, s_width = student_shape
        t_channels, t_height, t_width = teacher_shape
        if s_height == 2 * t_height and s_width == 2 * t_width:
            self.conv = nn.Conv2d(s_channels, t_channels, 3, stride=2, padding=1)
        elif 2 * s_height == t_height and 2 * s_width == t_width:
            self.conv = nn.ConvTranspose2d(s_channels, t_channels, 4, stride=2, padding=1)
        elif s_height >= t_height and s_width >= t_width:
            self.conv = nn.Conv2d(s_channels, t_channels,
                                  (1 + s_height - t_height, 1 + s_width - t_width))
        else:
            raise UserError(f"FitNet cannot map a {s_height}x{s_width} student map to a "
                            f"{t_height}x{t_width} teacher map; pick another FITNET.HINT_LAYER")
        self.bn = nn.BatchNorm2d(t_channels)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


@DISTILLERS.register("FITNET")
class FitNet(Distiller):
    """Cross-entropy plus the MSE between a regressed student hint and the teacher's.

    ``loss_ce = ce_weight * CE(student logits, target)`` and
    ``loss_feat = feat_weight * MSE(regressor(student feats[h]), teacher feats[h])``.
    The regressor trains with the student.

    Args:
        student, teacher: the models.
        hint_layer: index into ``feats["feats"]`` of both models.
        ce_weight, feat_weight: weights of the two terms.
        image_shape: ``(C, H, W)`` of the inputs, used to probe the hint shapes
            (in eval mode without gradients, so the teacher's BN statistics stay put).

    Raises:
        UserError: ``hint_layer`` is out of range, or the shapes cannot be mapped.
    """

    teacher_reads = frozenset({"feats"})
    student_reads = frozenset({"logits", "feats"})
    reads_hard_labels = False

    def __init__(self, student, teacher, hint_layer=2, ce_weight=1.0, feat_weight=100.0,
                 image_shape=(3, 32, 32)):
        super().__init__(student, teacher)
        (_, student_feats), (_, teacher_feats) = self.probe(image_shape)
        available = min(len(student_feats["feats"]), len(teacher_feats["feats"]))
        if not 0 <= hint_layer < available:
            raise UserError(f"FITNET.HINT_LAYER {hint_layer} is out of range: the models give "
                            f"{available} feature maps (valid 0..{available - 1})")
        self.hint_layer = hint_layer
        self.ce_weight = ce_weight
        self.feat_weight = feat_weight
        student_hint = student_feats["feats"][hint_layer]
        teacher_hint = teacher_feats["feats"][hint_layer]
        try:
            self.regressor = Regressor(tuple(student_hint.shape[1:]),
                                       tuple(teacher_hint.shape[1:]))
        except UserError as error:      # name the stage: the models may be of two families
            raise UserError(f"feature stage {hint_layer} (FITNET.HINT_LAYER): {error}") from None
        self.regressor.to(student_hint.device)
        with torch.no_grad():
            mapped = self.regressor.conv(student_hint).shape[1:]
        if mapped != teacher_hint.shape[1:]:     # odd sizes: halving rounds up
            raise UserError(f"FitNet maps the student's hint {tuple(student_hint.shape[1:])} to "
                            f"{tuple(mapped)}, not the teacher's {tuple(teacher_hint.shape[1:])}; "
                            f"pick another FITNET.HINT_LAYER")

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        # FITNET.INPUT_SIZE is not read: the probe uses the dataset's real image size.
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
