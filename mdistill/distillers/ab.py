"""AB: Heo et al., "Knowledge Transfer via Distillation of Activation Boundaries
Formed by Hidden Neurons" (AAAI 2019), as RepDistiller benchmarks it
(HobbitLong/RepDistiller ``distiller_zoo/AB.py``, ``models/util.py``,
``helper/pretrain.py``, ``train_student.py``).

RepDistiller trains AB in two stages: an initialisation of ``--init_epochs``
30 epochs in which the student (in train mode) and a connector per stage
learn to put the student's pre-ReLU stage outputs on the same side of zero
as the teacher's, at SOLVER.LR held constant; then the usual epochs on the
cross-entropy alone (the connector, in eval mode, is no longer used).
"""
from torch import nn
import torch.nn.functional as F

from ..errors import UserError
from ..registry import DISTILLERS
from .base import Distiller, Stage, probe_features
from .fitnet import Regressor


class ConvBN(Regressor):
    """FitNet's regressor without the ReLU (RepDistiller's ``ConvReg(use_relu=False)``)."""

    def forward(self, x):
        return self.bn(self.conv(x))


def connector(student_shape, teacher_shape):
    """Identity when channels and height agree, else a conv + BN to the teacher's shape."""
    if student_shape[:2] == teacher_shape[:2]:
        return nn.Identity()
    try:
        return ConvBN(student_shape, teacher_shape)
    except UserError:
        raise UserError(f"AB cannot map a student stage of shape {tuple(student_shape)} to the "
                        f"teacher's {tuple(teacher_shape)}") from None


def activation_boundary_loss(student_maps, teacher_maps, margin=1.0):
    """RepDistiller's AB loss over the stages, in fp32.

    Per stage: ``sum((s + m)^2 [s > -m and t <= 0] + (s - m)^2 [s <= m and t > 0])``
    over every element, times ``2^(i - n + 1)`` (the last stage weighs 1, each
    earlier one half the next), divided by the batch size and by 1000 / 3.
    """
    count = len(student_maps)
    total = 0.0
    for index, (student, teacher) in enumerate(zip(student_maps, teacher_maps)):
        student, teacher = student.float(), teacher.float()
        below = ((student > -margin) & (teacher <= 0)).float()
        above = ((student <= margin) & (teacher > 0)).float()
        loss = ((student + margin).pow(2) * below + (student - margin).pow(2) * above).sum()
        total = total + 2.0 ** (index - count + 1) * loss / student.shape[0] / 1000 * 3
    return total


@DISTILLERS.register("AB")
class AB(Distiller):
    """RepDistiller's AB: an activation-boundary initialisation, then cross-entropy training.

    Stages: ``init`` (``init_epochs``, the student and the connectors, constant
    SOLVER.LR, loss ``loss_ab`` on ``preact_feats[1:]``, the stages' pre-ReLU
    outputs), then ``distill`` (SOLVER.EPOCHS, the student only, ``loss_ce``).

    Args:
        student, teacher: the models.
        init_epochs: length of the initialisation (0 skips it).
        margin: the margin ``m`` of the boundary loss.
        ce_weight: weight of the cross-entropy.
        image_shape: input shape used to probe the feature shapes.
    """

    def __init__(self, student, teacher, init_epochs=30, margin=1.0, ce_weight=1.0,
                 image_shape=(3, 32, 32)):
        super().__init__(student, teacher)
        _, student_feats = probe_features(student, image_shape)
        _, teacher_feats = probe_features(teacher, image_shape)
        student_maps, teacher_maps = student_feats["preact_feats"][1:], teacher_feats["preact_feats"][1:]
        if len(student_maps) != len(teacher_maps):
            raise UserError(f"AB pairs the stages of student and teacher, but the student has "
                            f"{len(student_maps)} and the teacher {len(teacher_maps)}")
        self.connectors = nn.ModuleList(connector(tuple(s.shape[1:]), tuple(t.shape[1:]))
                                        for s, t in zip(student_maps, teacher_maps))
        self.connectors.to(student_maps[0].device)
        self.init_epochs = init_epochs
        self.margin = margin
        self.ce_weight = ce_weight

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        size = getattr(data_info, "image_size", 32)
        return cls(student, teacher, init_epochs=cfg.AB.INIT_EPOCHS, margin=cfg.AB.MARGIN,
                   ce_weight=cfg.AB.LOSS.CE_WEIGHT, image_shape=(3, size, size))

    def stages(self, epochs):
        init = [Stage("init", self.init_epochs, schedule=False)] if self.init_epochs > 0 else []
        return init + [Stage("distill", epochs, parameters=lambda: list(self.student.parameters()),
                             eval_modules=("connectors",))]

    def forward_train(self, image, target, **batch):
        logits, feats = self.student(image)
        if self.stage == "init":
            _, teacher_feats = self.teacher_forward(image)
            mapped = [c(f) for c, f in zip(self.connectors, feats["preact_feats"][1:])]
            loss = activation_boundary_loss(mapped, teacher_feats["preact_feats"][1:], self.margin)
            return logits, {"loss_ab": loss}
        return logits, {"loss_ce": self.ce_weight * F.cross_entropy(logits.float(), target)}
