"""FSP: Yim et al., "A Gift from Knowledge Distillation: Fast Optimization, Network
Minimization and Transfer Learning" (CVPR 2017), as RepDistiller benchmarks it
(HobbitLong/RepDistiller ``distiller_zoo/FSP.py``, ``helper/pretrain.py``,
``train_student.py``).

RepDistiller trains FSP in two stages: an initialisation of ``--init_epochs``
30 epochs in which the student (in train mode) learns only to match the
teacher's FSP matrices, at SOLVER.LR held constant (SGD, same momentum and
weight decay); then the usual epochs on the cross-entropy alone (its FSP
term there is 0).
"""
import torch.nn.functional as F

from ..errors import UserError
from ..registry import DISTILLERS
from .base import Distiller, Stage


def fsp_matrices(feature_maps):
    """The FSP ("flow of solution procedure") matrices of consecutive maps.

    For maps ``f_i [B, C_i, H, W]`` and ``f_i+1`` (the larger average-pooled to
    the smaller's size): ``G[b, a, c] = mean over positions of f_i[b, a] f_i+1[b, c]``.
    """
    matrices = []
    for bottom, top in zip(feature_maps[:-1], feature_maps[1:]):
        if bottom.shape[2] > top.shape[2]:
            bottom = F.adaptive_avg_pool2d(bottom, top.shape[2:])
        elif top.shape[2] > bottom.shape[2]:
            top = F.adaptive_avg_pool2d(top, bottom.shape[2:])
        bottom, top = bottom.float().flatten(2), top.float().flatten(2)
        matrices.append(bottom @ top.transpose(1, 2) / bottom.shape[2])
    return matrices


def fsp_loss(student_maps, teacher_maps):
    """Sum over consecutive pairs of the mean squared FSP-matrix difference."""
    return sum((s - t).pow(2).mean()
               for s, t in zip(fsp_matrices(student_maps), fsp_matrices(teacher_maps)))


@DISTILLERS.register("FSP")
class FSP(Distiller):
    """RepDistiller's FSP: an FSP-matching initialisation, then cross-entropy training.

    Stages: ``init`` (``init_epochs``, every learnable parameter, constant
    SOLVER.LR, loss ``loss_fsp`` over ``feats["feats"]``: stem and stages),
    then ``distill`` (SOLVER.EPOCHS, ``loss_ce``).

    Args:
        student, teacher: the models; their feature maps must have equal channels.
        init_epochs: length of the initialisation (0 skips it).
        ce_weight: weight of the cross-entropy.
        image_shape: input shape used to probe the feature shapes.

    Raises:
        UserError: the two models' maps differ in number or channels.
    """

    teacher_reads = frozenset({"feats"})
    student_reads = frozenset({"logits", "feats"})
    reads_hard_labels = False

    def __init__(self, student, teacher, init_epochs=30, ce_weight=1.0, image_shape=(3, 32, 32)):
        super().__init__(student, teacher)
        (_, student_feats), (_, teacher_feats) = self.probe(image_shape)
        student_channels = [f.shape[1] for f in student_feats["feats"]]
        teacher_channels = [f.shape[1] for f in teacher_feats["feats"]]
        if student_channels != teacher_channels:
            raise UserError(f"FSP needs feature maps of equal channels in student and teacher; "
                            f"the student's have {student_channels}, the teacher's "
                            f"{teacher_channels} (pick a pair of the same widths)")
        self.init_epochs = init_epochs
        self.ce_weight = ce_weight

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        size = getattr(data_info, "image_size", 32)
        return cls(student, teacher, init_epochs=cfg.FSP.INIT_EPOCHS,
                   ce_weight=cfg.FSP.LOSS.CE_WEIGHT, image_shape=(3, size, size))

    def stages(self, epochs):
        init = ([Stage("init", self.init_epochs, schedule=False, task_loss=False)]
                if self.init_epochs > 0 else [])
        return init + [Stage("distill", epochs)]

    def forward_train(self, image, target, **batch):
        logits, feats = self.student(image)
        if self.stage == "init":
            _, teacher_feats = self.teacher_forward(image)
            return logits, {"loss_fsp": fsp_loss(feats["feats"], teacher_feats["feats"])}
        return logits, {"loss_ce": self.ce_weight * F.cross_entropy(logits.float(), target)}

