"""Each method's loss against numbers computed from its formula by hand."""
import math

import pytest
import torch
from torch import nn

from mdistill.distillers import DISTILLERS, kd_loss
from mdistill.distillers.advkd import discriminator_loss, generator_loss
from mdistill.distillers.at import at_loss
from mdistill.distillers.crd import nce_loss
from mdistill.distillers.rkd import rkd_angle_loss, rkd_distance_loss


def softmax(values, temperature):
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def smooth_l1(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


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


def test_attention_transfer_loss_matches_the_formula():
    # One sample, two channels, 2x2 maps; the teacher map is 4x4 and gets pooled to 2x2.
    student = torch.tensor([[[[1.0, 2.0], [0.0, 1.0]], [[1.0, 0.0], [2.0, 1.0]]]])
    teacher_small = [[2.0, 1.0], [1.0, 0.0]]
    teacher = torch.tensor(teacher_small).repeat_interleave(2, 0).repeat_interleave(2, 1)
    teacher = teacher.view(1, 1, 4, 4)

    def attention(channels):
        values = [sum(c[i][j] ** 2 for c in channels) / len(channels)
                  for i in range(2) for j in range(2)]
        norm = math.sqrt(sum(v * v for v in values))
        return [v / norm for v in values]

    s_att = attention(student[0].tolist())
    t_att = attention([teacher_small])                 # pooling 2x2 blocks of equal values
    expected = sum((s - t) ** 2 for s, t in zip(s_att, t_att)) / 4
    assert at_loss(student, teacher, 2).item() == pytest.approx(expected, rel=1e-6)


POINTS_S = [[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]]
POINTS_T = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]


def test_rkd_distance_loss_matches_the_formula():
    def normalised(points):
        d = [[math.dist(a, b) for b in points] for a in points]
        mean = sum(v for row in d for v in row if v > 0) / 6
        return [[v / mean for v in row] for row in d]

    s, t = normalised(POINTS_S), normalised(POINTS_T)
    expected = sum(smooth_l1(s[i][j], t[i][j]) for i in range(3) for j in range(3)) / 9
    value = rkd_distance_loss(torch.tensor(POINTS_S), torch.tensor(POINTS_T))
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_rkd_angle_loss_matches_the_formula():
    def cosines(points):
        out = []
        for i in range(3):
            for j in range(3):
                for k in range(3):
                    e_ij = [a - b for a, b in zip(points[j], points[i])]
                    e_ik = [a - b for a, b in zip(points[k], points[i])]
                    n_ij, n_ik = math.hypot(*e_ij), math.hypot(*e_ik)
                    if n_ij == 0 or n_ik == 0:
                        out.append(0.0)
                    else:
                        out.append(sum(a * b for a, b in zip(e_ij, e_ik)) / (n_ij * n_ik))
        return out

    expected = sum(smooth_l1(a, b) for a, b in zip(cosines(POINTS_S), cosines(POINTS_T))) / 27
    value = rkd_angle_loss(torch.tensor(POINTS_S), torch.tensor(POINTS_T))
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_crd_nce_loss_matches_the_formula():
    scores = [[0.5, 0.01, 0.02], [0.2, 0.03, 0.001]]
    num_data = 10
    noise = 2 / num_data
    expected = 0.0
    for row in scores:
        expected -= math.log(row[0] / (row[0] + noise + 1e-7))
        expected -= sum(math.log(noise / (v + noise + 1e-7)) for v in row[1:])
    expected /= 2
    assert nce_loss(torch.tensor(scores), num_data).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("kind", ["bce", "lsgan", "hinge"])
def test_gan_losses_match_their_formulas(kind):
    real, fake = [1.5, -0.5], [0.25, -2.0]
    label = 0.9

    def bce(x, y):
        p = 1 / (1 + math.exp(-x))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    if kind == "bce":
        d_expected = (sum(bce(x, label) for x in real) + sum(bce(x, 0.0) for x in fake)) / 2
        g_expected = sum(bce(x, label) for x in fake) / 2
    elif kind == "lsgan":
        d_expected = (sum((x - label) ** 2 for x in real) + sum(x * x for x in fake)) / 2
        g_expected = sum((x - label) ** 2 for x in fake) / 2
    else:
        d_expected = (sum(max(0, 1 - x) for x in real) + sum(max(0, 1 + x) for x in fake)) / 2
        g_expected = -sum(fake) / 2
    d_value = discriminator_loss(torch.tensor(real), torch.tensor(fake), kind, label)
    g_value = generator_loss(torch.tensor(fake), kind, label)
    assert d_value.item() == pytest.approx(d_expected, rel=1e-6)
    assert g_value.item() == pytest.approx(g_expected, rel=1e-6)
