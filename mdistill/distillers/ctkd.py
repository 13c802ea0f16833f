"""CTKD: Li et al., "Curriculum Temperature for Knowledge Distillation" (AAAI 2023).

Facts from the authors' code (zhengli97/CTKD ``train_student.py``,
``helper/loops.py``, ``models/temp_global.py``): one global temperature
``T = t_start + t_end * sigmoid(theta)``, ``theta`` a scalar initialised to
1 and optimised with the student (same SGD, weight decay included). It
reaches the KD loss through a gradient-reversal layer, so the temperature
ascends the loss the student descends. The reversal's strength follows a
cosine curriculum over the 1-based epoch ``e``:
``lambda(e) = (1 - cos(pi * min(e, 10) / 10)) / 2`` (their ``CosineDecay``
from 0 to -1 over ``decay_loops`` 10 epochs, used as the reversal's factor).
Defaults: t_start 1, t_end 20, CE weight 0.1, KD weight 0.9, KD as
``KL(T) * T^2`` with T differentiable in both places.
"""
import math

import torch
from torch import nn
import torch.nn.functional as F

from ..registry import DISTILLERS
from .base import Distiller, kd_loss


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``-scale``."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return -ctx.scale * grad, None


def reverse_gradient(x, scale):
    """``x`` unchanged, its gradient multiplied by ``-scale`` (Ganin & Lempitsky 2015)."""
    return _ReverseGradient.apply(x, scale)


class GlobalTemperature(nn.Module):
    """CTKD's learnable global temperature ``t_start + t_end * sigmoid(theta)``.

    Args:
        t_start: the lowest temperature.
        t_end: the range above it.
    """

    def __init__(self, t_start=1.0, t_end=20.0):
        super().__init__()
        self.t_start = t_start
        self.t_end = t_end
        self.theta = nn.Parameter(torch.ones(()))

    def forward(self, reversal):
        """The temperature; ``theta``'s gradient is reversed and scaled by ``reversal``."""
        return self.t_start + self.t_end * torch.sigmoid(reverse_gradient(self.theta, reversal))


def curriculum_lambda(epoch, max_lambda=1.0, epochs=10):
    """The reversal strength at 1-based ``epoch``: a cosine ramp from 0 to
    ``max_lambda`` over ``epochs`` epochs, constant afterwards."""
    if epochs <= 0:
        return max_lambda
    progress = min(max(epoch, 0), epochs) / epochs
    return max_lambda * (1 - math.cos(math.pi * progress)) / 2


@DISTILLERS.register("CTKD")
class CTKD(Distiller):
    """KD at a temperature learned adversarially through a gradient-reversal layer.

    The temperature module is a submodule, so the trainer optimises it with
    the student and saves it in the run checkpoint.

    Args:
        student, teacher: the models.
        t_start, t_end: the temperature is ``t_start + t_end * sigmoid(theta)``.
        max_lambda: the reversal strength after the curriculum.
        lambda_epochs: epochs of the cosine curriculum of the reversal strength.
        ce_weight, kd_weight: weights of the cross-entropy and the KD loss.
    """

    teacher_reads = frozenset({"logits"})
    student_reads = frozenset({"logits"})
    reads_hard_labels = False

    def __init__(self, student, teacher, t_start=1.0, t_end=20.0, max_lambda=1.0,
                 lambda_epochs=10, ce_weight=0.1, kd_weight=0.9):
        super().__init__(student, teacher)
        self.temperature = GlobalTemperature(t_start, t_end)
        self.max_lambda = max_lambda
        self.lambda_epochs = lambda_epochs
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight

    @classmethod
    def from_config(cls, cfg, student, teacher, data_info=None):
        return cls(student, teacher, t_start=cfg.CTKD.T_START, t_end=cfg.CTKD.T_END,
                   max_lambda=cfg.CTKD.MAX_LAMBDA, lambda_epochs=cfg.CTKD.LAMBDA_EPOCHS,
                   ce_weight=cfg.CTKD.LOSS.CE_WEIGHT, kd_weight=cfg.CTKD.LOSS.KD_WEIGHT)

    def forward_train(self, image, target, **batch):
        logits, _ = self.student(image)
        teacher_logits, _ = self.teacher_forward(image)
        reversal = curriculum_lambda(self.epoch, self.max_lambda, self.lambda_epochs)
        temperature = self.temperature(reversal)
        self.log_diagnostic("temperature", temperature)
        self.log_diagnostic("lambda", reversal)
        return logits, {
            "loss_ce": self.ce_weight * F.cross_entropy(logits.float(), target),
            "loss_kd": self.kd_weight * kd_loss(logits, teacher_logits, temperature),
        }
