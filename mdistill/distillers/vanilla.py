"""NONE: the student trained alone with cross-entropy."""
import torch.nn.functional as F

from ..registry import DISTILLERS
from .base import Distiller


@DISTILLERS.register("NONE")
class Vanilla(Distiller):
    """Plain supervised training of the student; no teacher is built."""

    requires_teacher = False
    teacher_reads = frozenset()
    student_reads = frozenset({"logits"})
    reads_hard_labels = False

    def forward_train(self, image, target, **batch):
        logits, _ = self.student(image)
        return logits, {"loss_ce": F.cross_entropy(logits.float(), target)}
