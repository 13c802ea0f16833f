"""KD's loss against numbers computed from its formula by hand (the other methods'
formulas are checked in test_distiller_losses.py)."""
import math

import pytest
import torch
from torch import nn

from mdistill.distillers import DISTILLERS, kd_loss


def softmax(values, temperature):
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def test_kd_loss_matches_the_formula():
    student = [[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]]
    teacher = [[3.0, 2.0, 1.0], [0.0, 0.0, 2.0]]
    temperature = 2.0
    expected = 0.0
    for s_row, t_row in zip(student, teacher):
        p_s, p_t = softmax(s_row, temperature), softmax(t_row, temperature)
        expected += sum(t * (math.log(t) - math.log(s)) for s, t in zip(p_s, p_t))
    expected = expected / 2 * temperature ** 2
    value = kd_loss(torch.tensor(student), torch.tensor(teacher), temperature)
    assert value.item() == pytest.approx(expected, rel=1e-6)


class Fixed(nn.Module):
    """A 'model' returning fixed logits and features (plus a parameter)."""

    def __init__(self, logits, feats):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.logits, self.feats = logits, feats

    def forward(self, x):
        scale = self.scale
        return self.logits * scale, {key: [f * scale for f in value] if isinstance(value, list)
                                     else value * scale for key, value in self.feats.items()}


def test_kd_distiller_weights_its_terms():
    logits = torch.tensor([[1.0, 2.0, 0.0]])
    teacher_logits = torch.tensor([[0.0, 1.0, 3.0]])
    feats = {"feats": [], "pooled_feat": torch.zeros(1, 2)}
    distiller = DISTILLERS.get("KD")(Fixed(logits, feats), Fixed(teacher_logits, feats),
                                     temperature=4.0, ce_weight=0.1, kd_weight=0.9)
    distiller.train()
    _, losses = distiller(torch.zeros(1, 3, 2, 2), torch.tensor([2]))
    ce = -math.log(softmax([1.0, 2.0, 0.0], 1.0)[2])
    p_s, p_t = softmax([1.0, 2.0, 0.0], 4.0), softmax([0.0, 1.0, 3.0], 4.0)
    kd = sum(t * math.log(t / s) for s, t in zip(p_s, p_t)) * 16
    assert losses["loss_ce"].item() == pytest.approx(0.1 * ce, rel=1e-6)
    assert losses["loss_kd"].item() == pytest.approx(0.9 * kd, rel=1e-6)
