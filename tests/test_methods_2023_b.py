"""CRLD, DIST+, SRD and SKD against their formulas.

Expected values are computed here in float64 numpy from the formulas of the
authors' code (CRLD) and torchdistill's losses (DIST+, SRD, SKD), independently
of the implementation. The models are fakes that look their outputs up in
fixed tables by the image's first pixel (so two views give two rows), times a
unit parameter so gradients have somewhere to go.
"""
import numpy as np
import pytest
import torch
from torch import nn

from mdistill.distillers import DISTILLERS
from mdistill.errors import UserError


pytestmark = pytest.mark.usefixtures("one_thread")


class TableModel(nn.Module):
    """Row ``x[i, 0, 0, 0]`` of fixed logits, maps and pooled features, times a unit parameter."""

    def __init__(self, logits, maps=None, pooled=None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        as_tensor = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)   # noqa: E731
        self.register_buffer("logits", as_tensor(logits))
        self.register_buffer("maps", as_tensor(maps if maps is not None
                                               else np.zeros((len(logits), 1, 1, 1))))
        self.register_buffer("pooled", as_tensor(pooled if pooled is not None else logits))

    def forward(self, x):
        rows = x[:, 0, 0, 0].long()
        maps = self.maps[rows] * self.scale
        return self.logits[rows] * self.scale, {
            "feats": [maps], "preact_feats": [maps], "pooled_feat": self.pooled[rows] * self.scale}


def images(rows):
    """A batch whose image i selects table row ``rows[i]``."""
    batch = torch.zeros(len(rows), 3, 4, 4)
    batch[:, 0, 0, 0] = torch.as_tensor(rows, dtype=torch.float32)
    return batch


def softmax(z, t=1.0):
    e = np.exp(z / t - (z / t).max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def cross_entropy(z, y):
    return float(-np.log(softmax(z)[np.arange(len(y)), y]).mean())


def kl_rows(s, t, temperature):
    """Each row's KL(softmax(t/T) || softmax(s/T))."""
    p_t, p_s = softmax(t, temperature), softmax(s, temperature)
    return (p_t * (np.log(p_t) - np.log(p_s))).sum(axis=1)


def pearson_rows(a, b, eps=1e-8):
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + eps)


def losses_of(distiller, image, target, **batch):
    distiller.train()
    _, losses = distiller.forward_train(image, torch.as_tensor(target), **batch)
    return {name: float(value.detach()) for name, value in losses.items()}


# ----------------------------------------------------------------------- CRLD

def test_crld_matches_the_authors_within_and_cross_view_losses():
    rng = np.random.default_rng(0)
    batch, classes, temperature = 4, 6, 4.0
    # Rows 0-3 are the weak view, 4-7 the strong one; the teacher's confidence
    # decides the masks: weak rows 0 and 2 are at least 0.9 sure, strong rows 5
    # and 7 at least 0.2 (a flat row, 1/6, is not).
    teacher = rng.normal(size=(2 * batch, classes)) * 0.3
    teacher[0, 1] += 6.0
    teacher[2, 4] += 6.0
    teacher[4] = 0.0
    teacher[5, 0] += 2.0
    teacher[6] = 0.0
    teacher[7, 3] += 2.0
    student = rng.normal(size=(2 * batch, classes))
    target = np.array([1, 0, 4, 2])
    distiller = DISTILLERS.get("CRLD")(TableModel(student), TableModel(teacher),
                                       temperature=temperature, tau_w=0.9, tau_s=0.2,
                                       ce_weight=1.0, wv_weight=2.0, cv_weight=0.5)
    losses = losses_of(distiller, images(range(batch)), target,
                       image_strong=images(range(batch, 2 * batch)))

    s_w, s_s, t_w, t_s = student[:batch], student[batch:], teacher[:batch], teacher[batch:]
    mask_w = (softmax(t_w).max(axis=1) >= 0.9).astype(float)
    mask_s = (softmax(t_s).max(axis=1) >= 0.2).astype(float)
    assert mask_w.tolist() == [1, 0, 1, 0] and mask_s.tolist() == [0, 1, 0, 1]
    t2 = temperature ** 2
    within = t2 * (kl_rows(s_w, t_w, temperature) + kl_rows(s_s, t_s, temperature))
    cross = t2 * (kl_rows(s_s, t_w, temperature) + kl_rows(s_w, t_s, temperature))
    expected = {"loss_ce": cross_entropy(s_w, target) + cross_entropy(s_s, target),
                "loss_kd_wv": 2.0 * float((within * mask_w).mean()),
                "loss_kd_cv": 0.5 * float((cross * mask_s).mean())}
    assert losses == pytest.approx(expected, rel=1e-5)


def test_crld_declares_its_strong_view_and_temperatures_and_needs_the_view():
    logits = np.eye(3)
    distiller = DISTILLERS.get("CRLD")(TableModel(logits), TableModel(logits), temperature=4.0)
    assert set(distiller.extra_batch_fields()) == {"image_strong"}
    assert distiller.teacher_reads == {"logits"}
    # The KD terms soften at T, the confidence masks read the plain softmax.
    assert distiller.teacher_temperatures() == (4.0, 1.0)
    with pytest.raises(UserError, match="image_strong"):
        distiller.forward_train(images([0, 1]), torch.tensor([0, 1]))


# ---------------------------------------------------------------------- DIST+

def test_distplus_matches_dist_plus_the_channel_and_spatial_relations():
    rng = np.random.default_rng(1)
    batch, classes, shape = 5, 7, (4, 3, 2)
    s_logits, t_logits = rng.normal(size=(batch, classes)), rng.normal(size=(batch, classes))
    s_maps, t_maps = rng.normal(size=(batch, *shape)), rng.normal(size=(batch, *shape))
    target = np.array([0, 3, 6, 1, 2])
    tau, beta, gamma, iota, kappa, weight = 2.0, 1.5, 0.5, 0.7, 1.3, 2.0
    distiller = DISTILLERS.get("DISTPLUS")(TableModel(s_logits, s_maps), TableModel(t_logits, t_maps),
                                           tau=tau, beta=beta, gamma=gamma, iota=iota, kappa=kappa,
                                           ce_weight=1.0, kd_weight=weight, image_shape=(3, 4, 4))
    losses = losses_of(distiller, images(range(batch)), target)

    y_s, y_t = softmax(s_logits, tau), softmax(t_logits, tau)
    inter = 1 - pearson_rows(y_s, y_t).mean()
    intra = 1 - pearson_rows(y_s.T, y_t.T).mean()
    # Channel relation: Pearson across channels at each (sample, position).
    per_position = lambda m: np.moveaxis(m, 1, -1).reshape(-1, shape[0])   # noqa: E731
    channel = 1 - pearson_rows(per_position(s_maps), per_position(t_maps)).mean()
    # Spatial relation: channel sums, Pearson across the batch at each position.
    sums = lambda m: m.sum(axis=1).reshape(batch, -1)                       # noqa: E731
    spatial = 1 - pearson_rows(sums(s_maps).T, sums(t_maps).T).mean()
    expected = {"loss_ce": cross_entropy(s_logits, target),
                "loss_kd": weight * tau ** 2 * (beta * inter + gamma * intra),
                "loss_channel": weight * iota * channel,
                "loss_spatial": weight * kappa * spatial}
    assert losses == pytest.approx(expected, rel=1e-5)
    assert distiller.teacher_temperatures() == (2.0,)
    assert distiller.teacher_reads == {"logits", "feats"}


def test_distplus_refuses_last_maps_of_different_shapes_unless_their_terms_are_off():
    logits = np.eye(3)
    student = TableModel(logits, np.zeros((3, 4, 2, 2)))
    teacher = TableModel(logits, np.zeros((3, 8, 2, 2)))
    with pytest.raises(UserError, match=r"DISTPLUS.IOTA 0.*\(4, 2, 2\) vs \(8, 2, 2\)|"
                                        r"\(4, 2, 2\) vs \(8, 2, 2\).*DISTPLUS.IOTA 0"):
        DISTILLERS.get("DISTPLUS")(student, teacher, image_shape=(3, 4, 4))
    # Without the channel term only the positions must agree.
    distiller = DISTILLERS.get("DISTPLUS")(student, teacher, iota=0.0, image_shape=(3, 4, 4))
    assert set(losses_of(distiller, images([0, 1, 2]), [0, 1, 2])) == {
        "loss_ce", "loss_kd", "loss_spatial"}


# ------------------------------------------------------------------------ SRD

def test_srd_matches_the_log_distance_of_batch_standardized_features():
    rng = np.random.default_rng(2)
    batch, classes, s_dim, t_dim = 6, 5, 3, 4
    s_logits, t_logits = rng.normal(size=(batch, classes)), rng.normal(size=(batch, classes))
    s_pooled, t_pooled = rng.normal(size=(batch, s_dim)), rng.normal(size=(batch, t_dim)) * 3
    target = np.array([0, 1, 2, 3, 4, 0])
    distiller = DISTILLERS.get("SRD")(TableModel(s_logits, pooled=s_pooled),
                                      TableModel(t_logits, pooled=t_pooled),
                                      temperature=2.0, image_shape=(3, 4, 4))
    weight, bias = rng.normal(size=(t_dim, s_dim)), rng.normal(size=t_dim)
    with torch.no_grad():
        distiller.projector.weight.copy_(torch.as_tensor(weight))
        distiller.projector.bias.copy_(torch.as_tensor(bias))
    losses = losses_of(distiller, images(range(batch)), target)

    def standardized(x):       # BatchNorm1d in training, no affine: biased variance, eps 1e-4
        return (x - x.mean(axis=0)) / np.sqrt(x.var(axis=0) + 1e-4)
    distance = np.abs(standardized(s_pooled @ weight.T + bias) - standardized(t_pooled))
    expected = {"loss_ce": cross_entropy(s_logits, target),
                "loss_kd": 4.0 * float(kl_rows(s_logits, t_logits, 2.0).mean()),
                "loss_feat": 2.0 * float(np.log((distance ** 4).sum()))}
    assert losses == pytest.approx(expected, rel=1e-5)

    distiller.zero_grad()
    _, tensors = distiller.forward_train(images(range(batch)), torch.as_tensor(target))
    tensors["loss_feat"].backward()
    assert distiller.projector.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------ SKD

def test_skd_matches_the_instance_kl_and_the_mahalanobis_direction_term():
    rng = np.random.default_rng(3)
    batch, classes, temperature, tikhonov = 6, 5, 4.0, 0.1
    s_logits, t_logits = rng.normal(size=(batch, classes)), rng.normal(size=(batch, classes))
    target = np.array([0, 1, 2, 3, 4, 0])
    distiller = DISTILLERS.get("SKD")(TableModel(s_logits), TableModel(t_logits),
                                      temperature=temperature, tikhonov=tikhonov,
                                      ce_weight=0.5, instance_weight=1.0, direction_weight=2.0)
    losses = losses_of(distiller, images(range(batch)), target)

    def gram(z):
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
        return z @ z.T
    difference = gram(s_logits) - gram(t_logits)
    covariance = np.cov(difference.T) + tikhonov * np.eye(batch)      # unbiased, columns as variables
    inverse = np.linalg.inv(covariance)
    mahalanobis = np.sqrt(np.einsum("bi,ij,bj->b", difference, inverse, difference))
    expected = {"loss_ce": 0.5 * cross_entropy(s_logits, target),
                "loss_instance": float(kl_rows(s_logits, t_logits, temperature).mean()),  # no T^2
                "loss_direction": 2.0 * float(mahalanobis.mean())}
    assert losses == pytest.approx(expected, rel=1e-5)
    # The direction term reads the raw logits: no single softening temperature.
    assert distiller.teacher_temperatures() is None


def test_skd_defaults_are_torchdistills_without_cross_entropy():
    from mdistill.config import get_cfg
    cfg = get_cfg()
    assert (cfg.SKD.TEMPERATURE, cfg.SKD.TIKHONOV, cfg.SKD.LOSS.CE_WEIGHT) == (4.0, 0.1, 0.0)
    logits = np.random.default_rng(4).normal(size=(4, 3))
    distiller = DISTILLERS.get("SKD").from_config(cfg, TableModel(logits), TableModel(logits))
    losses = losses_of(distiller, images(range(4)), [0, 1, 2, 0])
    assert losses["loss_ce"] == 0.0 and losses["loss_instance"] == pytest.approx(0.0, abs=1e-7)
