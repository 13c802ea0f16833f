"""DIST, NKD, CTKD, logit standardization and MLKD against the papers' formulas.

Expected values are computed here in float64 numpy, written from the papers
and the authors' code independently of the implementation. The models are
fakes that return fixed logits (times a parameter that is 1, so gradients
have somewhere to go).
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

from mdistill.distillers import DISTILLERS


pytestmark = pytest.mark.usefixtures("one_thread")


class FixedLogits(nn.Module):
    """Returns the first ``len(x)`` rows of fixed logits, times a unit parameter."""

    def __init__(self, logits):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.register_buffer("logits", torch.as_tensor(np.asarray(logits), dtype=torch.float32))

    def forward(self, x):
        logits = self.logits[:len(x)] * self.scale
        return logits, {"feats": [], "preact_feats": [], "pooled_feat": logits}


def pair(batch=6, classes=5, seed=0, spread=3.0):
    rng = np.random.default_rng(seed)
    student = rng.normal(size=(batch, classes)) * spread
    teacher = rng.normal(size=(batch, classes)) * spread
    target = rng.integers(0, classes, size=batch)
    return student, teacher, target


def build(method, student, teacher, **kwargs):
    return DISTILLERS.get(method)(FixedLogits(student), FixedLogits(teacher), **kwargs)


def run(distiller, batch, target, **fields):
    distiller.train()
    _, losses = distiller.forward_train(torch.zeros(batch, 3, 4, 4), torch.as_tensor(target),
                                        **fields)
    return {name: float(value.detach()) for name, value in losses.items()}


def np_softmax(z, temperature=1.0):
    z = np.asarray(z, dtype=np.float64) / temperature
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_cross_entropy(logits, target):
    return float(np.mean([-math.log(np_softmax(row)[t]) for row, t in zip(logits, target)]))


def np_kl(p, q):
    """KL(p || q) of two distributions (rows)."""
    return float(np.sum(p * (np.log(p) - np.log(q))))


def np_kd(student, teacher, temperature):
    """Hinton's KD: batch mean of KL(teacher || student) at T, times T^2."""
    return temperature ** 2 * np.mean([np_kl(np_softmax(t, temperature), np_softmax(s, temperature))
                                       for s, t in zip(student, teacher)])


# ---------------------------------------------------------------------- DIST

def np_pearson(x, y):
    x, y = x - x.mean(), y - y.mean()
    return float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)))


def test_dist_matches_the_pearson_formula():
    student, teacher, target = pair(batch=6, classes=5)
    tau, beta, gamma = 4.0, 1.5, 0.5
    losses = run(build("DIST", student, teacher, tau=tau, beta=beta, gamma=gamma,
                       ce_weight=1.0, kd_weight=2.0), 6, target)
    ps, pt = np_softmax(student, tau), np_softmax(teacher, tau)
    inter = 1 - np.mean([np_pearson(ps[i], pt[i]) for i in range(6)])
    intra = 1 - np.mean([np_pearson(ps[:, j], pt[:, j]) for j in range(5)])
    assert losses["loss_kd"] == pytest.approx(2.0 * tau ** 2 * (beta * inter + gamma * intra),
                                              rel=1e-5)
    assert losses["loss_ce"] == pytest.approx(np_cross_entropy(student, target), rel=1e-5)


def test_dist_is_zero_for_a_perfect_student_and_positive_otherwise():
    student, teacher, target = pair()
    assert run(build("DIST", teacher, teacher), 6, target)["loss_kd"] == pytest.approx(0, abs=1e-4)
    assert run(build("DIST", student, teacher), 6, target)["loss_kd"] > 0.1


# ----------------------------------------------------------------------- NKD

def test_nkd_matches_the_normalized_loss():
    student, teacher, target = pair(batch=6, classes=5, seed=1)
    temperature, gamma = 3.0, 3.5
    losses = run(build("NKD", student, teacher, temperature=temperature, gamma=gamma,
                       ce_weight=1.0, kd_weight=1.0), 6, target)
    target_term = -np.mean([np_softmax(t)[y] * math.log(np_softmax(s)[y])
                            for s, t, y in zip(student, teacher, target)])
    non_target = 0.0
    for s, t, y in zip(student, teacher, target):
        keep = [j for j in range(5) if j != y]
        q_s, q_t = np_softmax(s[keep], temperature), np_softmax(t[keep], temperature)
        non_target += -np.sum(q_t * np.log(q_s)) / 6
    assert losses["loss_target"] == pytest.approx(target_term, rel=1e-5)
    assert losses["loss_non_target"] == pytest.approx(gamma * temperature ** 2 * non_target,
                                                      rel=1e-5)
    assert losses["loss_ce"] == pytest.approx(np_cross_entropy(student, target), rel=1e-5)


def test_nkd_non_target_term_ignores_the_target_logit():
    """Moving only the target logit leaves the non-target term alone (it is renormalised)."""
    student, teacher, target = pair(batch=4, classes=6, seed=2)
    moved = student.copy()
    moved[np.arange(4), target] += 5.0
    first = run(build("NKD", student, teacher), 4, target)
    second = run(build("NKD", moved, teacher), 4, target)
    assert first["loss_non_target"] == pytest.approx(second["loss_non_target"], rel=1e-6)
    assert first["loss_target"] != pytest.approx(second["loss_target"], rel=1e-3)


# ---------------------------------------------------------------------- CTKD

def np_sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_ctkd_loss_uses_the_learned_temperature():
    student, teacher, target = pair(seed=3)
    distiller = build("CTKD", student, teacher)
    distiller.on_epoch_start(4)
    losses = run(distiller, 6, target)
    temperature = 1 + 20 * np_sigmoid(1.0)          # theta starts at 1
    assert losses["loss_kd"] == pytest.approx(0.9 * np_kd(student, teacher, temperature), rel=1e-5)
    assert losses["loss_ce"] == pytest.approx(0.1 * np_cross_entropy(student, target), rel=1e-5)


@pytest.mark.parametrize("epoch", [0, 1, 3, 10, 25])
def test_ctkd_temperature_gradient_is_reversed_and_scaled_by_the_curriculum(epoch):
    student, teacher, target = pair(seed=4)
    distiller = build("CTKD", student, teacher)
    distiller.on_epoch_start(epoch)
    distiller.train()
    _, losses = distiller.forward_train(torch.zeros(6, 3, 4, 4), torch.as_tensor(target))
    losses["loss_kd"].backward()

    def loss_at(theta):                             # float64, no reversal
        return 0.9 * np_kd(student, teacher, 1 + 20 * np_sigmoid(theta))
    step = 1e-5
    descent = (loss_at(1 + step) - loss_at(1 - step)) / (2 * step)
    # The authors' CosineDecay(max 0, min -1, 10 loops), applied as the reversal's factor.
    lam = (math.cos(min(epoch, 10) * math.pi / 10) + 1) / 2 * (0 - (-1)) + (-1)
    assert abs(descent) > 1e-3
    assert float(distiller.temperature.theta.grad) == pytest.approx(lam * descent, rel=1e-3,
                                                                    abs=1e-9)
    # The student's gradient is not reversed: the KD loss falls along -grad.
    assert float(distiller.student.scale.grad) != 0


def test_ctkd_temperature_is_trained_and_checkpointed_with_the_student():
    distiller = build("CTKD", *pair()[:2])
    params = {id(p) for p in distiller.get_learnable_parameters()}
    assert id(distiller.temperature.theta) in params
    assert "temperature.theta" in distiller.state_dict_to_save()


# ------------------------------------------------------ logit standardization

def np_standardize(z):
    """Per-row z-score with the unbiased (n - 1) std plus 1e-7, as the authors' code."""
    z = np.asarray(z, dtype=np.float64)
    return (z - z.mean(axis=1, keepdims=True)) / (z.std(axis=1, ddof=1, keepdims=True) + 1e-7)


def test_kd_with_logit_standardization_matches_the_formula():
    student, teacher, target = pair(seed=5)
    losses = run(build("KD", student, teacher, temperature=2.0, ce_weight=0.1, kd_weight=9.0,
                       logit_stand=True), 6, target)
    expected = 9.0 * np_kd(np_standardize(student), np_standardize(teacher), 2.0)
    assert losses["loss_kd"] == pytest.approx(expected, rel=1e-5)
    assert losses["loss_ce"] == pytest.approx(0.1 * np_cross_entropy(student, target), rel=1e-5)
    # The biased std would give another value: the test tells them apart.
    biased = [(z - z.mean(1, keepdims=True)) / z.std(1, keepdims=True) for z in (student, teacher)]
    assert losses["loss_kd"] != pytest.approx(9.0 * np_kd(*biased, 2.0), rel=1e-3)


def test_logit_standardization_ignores_the_students_logit_range():
    """The point of the paper: a student matching the teacher's logits up to shift and
    scale has zero loss with the switch on, not without it."""
    _, teacher, target = pair(seed=6)
    student = 0.3 * teacher + 2.0
    on = run(build("KD", student, teacher, logit_stand=True), 6, target)["loss_kd"]
    off = run(build("KD", student, teacher), 6, target)["loss_kd"]
    assert on == pytest.approx(0, abs=1e-5) and off > 0.1


def np_dkd(student, teacher, target, alpha, beta, temperature):
    """Decoupled KD (Zhao et al. 2022): alpha TCKD + beta NCKD, batch mean, times T^2."""
    total = 0.0
    for s, t, y in zip(student, teacher, target):
        p_s, p_t = np_softmax(s, temperature), np_softmax(t, temperature)
        tckd = np_kl(np.array([p_t[y], 1 - p_t[y]]), np.array([p_s[y], 1 - p_s[y]]))
        keep = [j for j in range(len(s)) if j != y]
        nckd = np_kl(p_t[keep] / p_t[keep].sum(), p_s[keep] / p_s[keep].sum())
        total += alpha * tckd + beta * nckd
    return temperature ** 2 * total / len(student)


def test_dkd_with_logit_standardization_matches_the_formula():
    student, teacher, target = pair(seed=8)
    distiller = build("DKD", student, teacher, ce_weight=1.0, alpha=9.0, beta=72.0,
                      temperature=2.0, warmup=20, logit_stand=True)
    distiller.on_epoch_start(10)                  # half-way through the warm-up
    losses = run(distiller, 6, target)
    expected = 0.5 * np_dkd(np_standardize(student), np_standardize(teacher), target, 9.0,
                            72.0, 2.0)
    assert losses["loss_kd"] == pytest.approx(expected, rel=1e-5)
    plain = build("DKD", student, teacher, alpha=9.0, beta=72.0, temperature=2.0, warmup=20)
    plain.on_epoch_start(10)
    assert run(plain, 6, target)["loss_kd"] == pytest.approx(
        0.5 * np_dkd(student, teacher, target, 9.0, 72.0, 2.0), rel=1e-5)


# ---------------------------------------------------------------------- MLKD

class TwoViews(nn.Module):
    """Fixed logits for the weak view (an input of zeros) and the strong view (ones)."""

    def __init__(self, weak, strong):
        super().__init__()
        self.weak, self.strong = FixedLogits(weak), FixedLogits(strong)

    def forward(self, x):
        return (self.strong if bool(x.flatten()[0] == 1) else self.weak)(x)


def np_mlkd(weak, strong, teacher_weak, teacher_strong, target, temperature, ce_weight,
            kd_weight, stand=False):
    """The authors' KD_ours.forward_train, transcribed to float64 numpy."""
    temps = [temperature, 3.0, 5.0, 2.0, 6.0]
    teacher_probs = np_softmax(teacher_weak)
    confidence = teacher_probs.max(axis=1)
    mask = confidence <= np.percentile(confidence, 50)
    class_confidence = teacher_probs.sum(axis=0)
    class_mask = class_confidence <= np.percentile(class_confidence, 50)

    def kd(s, t, temp):
        if stand:
            s, t = np_standardize(s), np_standardize(t)
        return np_kd(s, t, temp)

    def cc(s, t, temp):
        ps, pt = np_softmax(s, temp), np_softmax(t, temp)
        return ((pt.T @ pt - ps.T @ ps) ** 2).sum() / s.shape[1]

    def bc(s, t, temp):
        ps, pt = np_softmax(s, temp), np_softmax(t, temp)
        return ((pt @ pt.T - ps @ ps.T) ** 2).sum() / s.shape[0]

    loss_ce = ce_weight * (np_cross_entropy(weak, target) + np_cross_entropy(strong, target))
    kd_weak = sum(kd_weight * (kd(weak, teacher_weak, t) * mask).mean() for t in temps)
    kd_strong = kd_weight * (kd(strong, teacher_strong, temps[0]) + kd(strong, teacher_strong, 3.0)
                             + kd(strong, teacher_strong, 5.0) + kd(weak, teacher_weak, 2.0)
                             + kd(weak, teacher_weak, 6.0))
    loss_cc = sum(kd_weight * (cc(weak, teacher_weak, t) * class_mask).mean() for t in temps)
    loss_bc = sum(kd_weight * (bc(weak, teacher_weak, t) * mask).mean() for t in temps)
    return {"loss_ce": loss_ce, "loss_kd": kd_weak + kd_strong, "loss_cc": loss_cc,
            "loss_bc": loss_bc}


@pytest.mark.parametrize("stand", [False, True])
def test_mlkd_matches_the_authors_losses(stand):
    rng = np.random.default_rng(7)
    weak, strong, teacher_weak, teacher_strong = (rng.normal(size=(8, 6)) * 2 for _ in range(4))
    target = rng.integers(0, 6, size=8)
    temperature, kd_weight = (2.0, 9.0) if stand else (4.0, 0.9)
    distiller = DISTILLERS.get("MLKD")(TwoViews(weak, strong), TwoViews(teacher_weak, teacher_strong),
                                       temperature=temperature, ce_weight=0.1,
                                       kd_weight=kd_weight, logit_stand=stand)
    distiller.train()
    logits, losses = distiller.forward_train(torch.zeros(8, 3, 4, 4), torch.as_tensor(target),
                                             image_strong=torch.ones(8, 3, 4, 4))
    expected = np_mlkd(weak, strong, teacher_weak, teacher_strong, target, temperature, 0.1,
                       kd_weight, stand)
    assert set(losses) == set(expected)
    for name, value in expected.items():
        assert float(losses[name].detach()) == pytest.approx(value, rel=1e-5), name
    assert torch.allclose(logits, torch.as_tensor(weak, dtype=torch.float32))


def test_mlkd_declares_its_strong_view():
    from mdistill.data.randaugment import RandAugmentView
    distiller = build("MLKD", *pair()[:2], augment_ops=3)
    view = distiller.extra_batch_fields()["image_strong"]
    assert isinstance(view, RandAugmentView) and view.num_ops == 3
