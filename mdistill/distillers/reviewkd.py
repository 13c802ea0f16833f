"""REVIEWKD: Chen et al., "Distilling Knowledge via Knowledge Review" (CVPR 2021)."""
import torch
from torch import nn
import torch.nn.functional as F

from ..errors import UserError
from ..registry import DISTILLERS
from .base import Distiller


class ABF(nn.Module):
    """Attention-based fusion of one student level with the fused deeper levels.

    A 1x1 conv-BN maps the level to ``mid_channels``; when ``fuse``, the deeper
    levels' fused map is upsampled (nearest) to this level's size and the two
    are mixed by a two-channel sigmoid attention computed from both. The mix
    (resized to ``out_size`` when different) is passed on to the next, shallower
    level, and a 3x3 conv-BN of it to ``out_channels`` is compared with the teacher.

    Args:
        in_channels: the student level's channels.
        mid_channels: width of the fused maps.
        out_channels: the teacher level's channels.
        fuse: whether a deeper level comes in (False for the deepest).
    """

    def __init__(self, in_channels, mid_channels, out_channels, fuse):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False),
                                   nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1,
                                             bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = (nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid())
                         if fuse else None)
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x, deeper=None, size=None, out_size=None):
        """Returns ``(output for the loss, fused map for the next level)``."""
        x = self.conv1(x)
        if self.att_conv is not None:
            deeper = F.interpolate(deeper, (size, size), mode="nearest")
            attention = self.att_conv(torch.cat([x, deeper], dim=1))
            x = x * attention[:, :1] + deeper * attention[:, 1:]
        if x.shape[-1] != out_size:
            x = F.interpolate(x, (out_size, out_size), mode="nearest")
        return self.conv2(x), x


def hcl_loss(student_maps, teacher_maps):
    """Hierarchical context loss, in fp32: for each pair of maps, the MSE plus the
    MSEs of their 4x4, 2x2 and 1x1 average-pooled versions (the sizes smaller
    than the map) weighted 1/2, 1/4, 1/8, divided by the sum of the weights
    used; summed over pairs."""
    total = 0.0
    for student, teacher in zip(student_maps, teacher_maps):
        student, teacher = student.float(), teacher.float()
        loss, weight, weights = F.mse_loss(student, teacher), 1.0, 1.0
        for size in (4, 2, 1):
            if size >= student.shape[2]:
                continue
            weight /= 2
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(student, size),
                                              F.adaptive_avg_pool2d(teacher, size))
            weights += weight
        total = total + loss / weights
    return total


def student_levels(feats, preact):
    """The student's levels, shallow to deep: every map of ``feats`` (or
    ``preact_feats``), then the pooled vector as a 1x1 map."""
    maps = feats["preact_feats" if preact else "feats"]
    return list(maps) + [feats["pooled_feat"][:, :, None, None]]


def teacher_levels(feats):
    """The teacher's levels, shallow to deep: its pre-ReLU stage maps (the stem
    left out, as mdistiller does), then the pooled vector as a 1x1 map."""
    return list(feats["preact_feats"][1:]) + [feats["pooled_feat"][:, :, None, None]]


@DISTILLERS.register("REVIEWKD")
class ReviewKD(Distiller):
    """Cross-entropy plus the review loss between fused student levels and the teacher's.

    The student's ``n = len(in_channels)`` deepest levels (its feature maps,
    then the pooled feature as a 1x1 map; pre-ReLU maps with ``stu_preact``)
    are fused from deep to shallow by :class:`ABF` modules, and the i-th output
    (shallow first) is compared by :func:`hcl_loss` with the teacher's i-th
    level (its pre-ReLU stage maps ``preact_feats[1:]``, then the pooled
    feature), as mdistiller pairs them. The loss is warmed up linearly over
    ``warmup_epochs``. The ABFs train with the student.

    The list arguments keep mdistiller's conventions: ``in_channels`` and
    ``out_channels`` shallow to deep, ``shapes`` and ``out_shapes`` (square
    sizes) deep to shallow, so for resnet32x4 -> resnet8x4 they are
    ``[64, 128, 256, 256]`` and ``[1, 8, 16, 32]``.

    Args:
        student, teacher: the models.
        shapes: sizes of the student's levels.
        out_shapes: sizes of the teacher's levels they are compared with.
        in_channels: channels of the student's levels.
        out_channels: channels of the teacher's levels.
        max_mid_channel: the fused maps are ``min(max_mid_channel, in_channels[-1])``
            wide. mdistiller's code reads 512 in place of this key; that is the
            same for all its configs but ImageNet ResNet50 -> MobileNetV1, which
            sets 256, the ReviewKD authors' width for that pair.
        stu_preact: fuse the student's pre-ReLU maps.
        ce_weight, reviewkd_weight: weights of the two terms.
        warmup_epochs: epochs over which the review loss ramps up.
        image_shape: ``(C, H, W)`` of the inputs, used to probe both models.

    Raises:
        UserError: a list does not match the models (the message names the key
            and the value that would match).
    """

    teacher_reads = frozenset({"preact_feats", "pooled_feat"})
    student_reads = frozenset({"logits", "feats", "pooled_feat"})
    reads_hard_labels = False

    def __init__(self, student, teacher, shapes=(1, 8, 16, 32), out_shapes=(1, 8, 16, 32),
                 in_channels=(64, 128, 256, 256), out_channels=(64, 128, 256, 256),
                 max_mid_channel=512, stu_preact=False, ce_weight=1.0, reviewkd_weight=1.0,
                 warmup_epochs=20, image_shape=(3, 32, 32)):
        super().__init__(student, teacher)
        self.shapes = list(shapes)
        self.out_shapes = list(out_shapes)
        self.stu_preact = stu_preact
        if stu_preact:
            self.student_reads = self.student_reads | {"preact_feats"}
        self.ce_weight = ce_weight
        self.reviewkd_weight = reviewkd_weight
        self.warmup_epochs = warmup_epochs
        (_, student_feats), (_, teacher_feats) = self.probe(image_shape)
        check_review_shapes(student_levels(student_feats, stu_preact),
                            teacher_levels(teacher_feats), self.shapes, self.out_shapes,
                            list(in_channels), list(out_channels))
        mid_channels = min(max_mid_channel, in_channels[-1])
        last = len(in_channels) - 1
        # Deepest first, the order the forward runs them in.
        self.abfs = nn.ModuleList(ABF(in_channels[index], mid_channels, out_channels[index],
                                      fuse=index < last) for index in range(last, -1, -1))
        self.abfs.to(student_feats["pooled_feat"].device)

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        size = getattr(data_info, "image_size", 32)
        review = cfg.REVIEWKD
        return cls(student, teacher, shapes=review.SHAPES, out_shapes=review.OUT_SHAPES,
                   in_channels=review.IN_CHANNELS, out_channels=review.OUT_CHANNELS,
                   max_mid_channel=review.MAX_MID_CHANNEL, stu_preact=review.STU_PREACT,
                   ce_weight=review.CE_WEIGHT, reviewkd_weight=review.REVIEWKD_WEIGHT,
                   warmup_epochs=review.WARMUP_EPOCHS, image_shape=(3, size, size))

    def review(self, levels):
        """The ABF outputs for the student's levels (shallow to deep), shallow first."""
        deep_first = levels[::-1]
        outputs = []
        fused = None
        for index, (level, abf) in enumerate(zip(deep_first, self.abfs)):
            output, fused = abf(level, fused, self.shapes[index], self.out_shapes[index])
            outputs.insert(0, output)
        return outputs

    def forward_train(self, image, target, **batch):
        logits, feats = self.student(image)
        _, teacher_feats = self.teacher_forward(image)
        outputs = self.review(student_levels(feats, self.stu_preact))
        loss = hcl_loss(outputs, teacher_levels(teacher_feats))
        return logits, {
            "loss_ce": self.ce_weight * F.cross_entropy(logits.float(), target),
            "loss_kd": self.reviewkd_weight * self.warmup_factor(self.warmup_epochs) * loss,
        }


def check_review_shapes(student, teacher, shapes, out_shapes, in_channels, out_channels):
    """Raise a UserError naming the first REVIEWKD list that does not fit the models.

    The ABFs take the student's ``len(in_channels)`` deepest levels, and their
    outputs (shallow first) meet the teacher's first levels, as in mdistiller.

    Args:
        student, teacher: the models' levels, shallow to deep (:func:`student_levels`,
            :func:`teacher_levels`).
        shapes, out_shapes, in_channels, out_channels: the REVIEWKD lists.
    """
    count = len(in_channels)
    most = min(len(student), len(teacher))
    if not 1 <= count <= most:
        wanted = [level.shape[1] for level in student[-most:]]
        raise UserError(f"REVIEWKD.IN_CHANNELS {in_channels} names {count} levels, but the "
                        f"student and teacher have {len(student)} and {len(teacher)} (maps "
                        f"and the pooled feature); set "
                        f"REVIEWKD.IN_CHANNELS {wanted} (and the other REVIEWKD lists to match)")
    used, met = student[-count:], teacher[:count]
    expected = {
        "IN_CHANNELS": [level.shape[1] for level in used],
        "SHAPES": [level.shape[-1] for level in used[::-1]],
        "OUT_SHAPES": [level.shape[-1] for level in met[::-1]],
        "OUT_CHANNELS": [level.shape[1] for level in met],
    }
    given = {"IN_CHANNELS": in_channels, "SHAPES": shapes, "OUT_SHAPES": out_shapes,
             "OUT_CHANNELS": out_channels}
    for key, wanted in expected.items():
        if list(given[key]) != wanted:
            side = "student" if key in ("IN_CHANNELS", "SHAPES") else "teacher"
            raise UserError(f"REVIEWKD.{key} {list(given[key])} does not match the {side} "
                            f"{'channels' if key.endswith('CHANNELS') else 'sizes'} "
                            f"{wanted}; set REVIEWKD.{key} {wanted}")
