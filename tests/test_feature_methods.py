"""NST, PKT, SP, KDSVD and VID: losses against the papers' formulas, in float64.

The references below are written from the formulas (with mdistiller's
reductions and feature choices), independently of the implementation:
numpy with explicit loops over samples, channels and pairs. The fake models
of test_distiller_losses.py give fixed features, so each method's choice of
features (``feats[1:]``, ``feats[-1]``, ``pooled_feat``) is checked too.
"""
import math

import numpy as np
import pytest
import torch

from mdistill.distillers import DISTILLERS, build_distiller
from mdistill.config import load_cfg
from mdistill.distillers.kdsvd import kdsvd_loss
from mdistill.distillers.nst import nst_loss
from mdistill.models import build_model
from test_distiller_losses import (assert_gradients, fake, image, np_cross_entropy,  # noqa: F401
                                   one_thread)  # autouse: one thread for these tiny tensors

RNG = np.random.default_rng(7)
TARGET = torch.tensor([0, 2, 1, 2])
S_LOGITS = RNG.normal(size=(4, 3))
T_LOGITS = RNG.normal(size=(4, 3))


def maps(*shape):
    """Random non-negative maps (like post-ReLU features) of ``shape``."""
    return np.abs(RNG.normal(size=shape))


def block_mean(x, size):
    """Average pooling of ``[B, C, H, W]`` to ``size x size`` (H a multiple of size)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, size, h // size, size, w // size).mean(axis=(3, 5))


def same_size(s, t):
    if s.shape[2] > t.shape[2]:
        return block_mean(s, t.shape[2]), t
    if t.shape[2] > s.shape[2]:
        return s, block_mean(t, s.shape[2])
    return s, t


def build(method, student, teacher, **options):
    return DISTILLERS.get(method)(student, teacher, **options)


def run(distiller, batch=4):
    distiller.train()
    _, losses = distiller(image(batch), TARGET[:batch])
    assert set(losses) == {"loss_ce", "loss_feat"}
    return losses


# --------------------------------------------------------------------- NST

def np_nst(s, t):
    """MMD^2 with the kernel k(x, y) = (x . y)^2 between the L2-normalised channels
    of each sample, averaged over the samples."""
    s, t = same_size(s, t)
    total = 0.0
    for s_sample, t_sample in zip(s, t):
        s_rows = [row / np.linalg.norm(row) for row in s_sample.reshape(len(s_sample), -1)]
        t_rows = [row / np.linalg.norm(row) for row in t_sample.reshape(len(t_sample), -1)]

        def kernel_mean(a, b):
            return np.mean([np.dot(x, y) ** 2 for x in a for y in b])
        total += kernel_mean(t_rows, t_rows) + kernel_mean(s_rows, s_rows) \
            - 2 * kernel_mean(s_rows, t_rows)
    return total / len(s)


def test_nst_matches_the_formula_on_every_stage_but_the_stem():
    s_feats = [maps(4, 2, 4, 4), maps(4, 3, 4, 4), maps(4, 5, 4, 4)]
    t_feats = [maps(4, 6, 4, 4), maps(4, 4, 2, 2), maps(4, 2, 4, 4)]   # stage 1: pooled
    distiller = build("NST", fake(S_LOGITS, s_feats), fake(T_LOGITS, t_feats),
                      ce_weight=0.5, feat_weight=7.0)
    losses = run(distiller)
    expected = sum(np_nst(s, t) for s, t in zip(s_feats[1:], t_feats[1:]))
    assert losses["loss_feat"].item() == pytest.approx(7.0 * expected, rel=1e-5)
    assert losses["loss_ce"].item() == pytest.approx(0.5 * np_cross_entropy(S_LOGITS, TARGET),
                                                     rel=1e-6)
    assert_gradients(distiller, losses, [])


def test_nst_is_zero_for_identical_maps_and_pools_the_larger_one():
    f = torch.from_numpy(maps(2, 3, 4, 4))
    assert nst_loss(f, f).item() == pytest.approx(0.0, abs=1e-6)
    big, small = maps(2, 3, 8, 8), maps(2, 4, 4, 4)
    assert nst_loss(torch.from_numpy(big), torch.from_numpy(small)).item() == pytest.approx(
        np_nst(big, small), rel=1e-5)
    assert nst_loss(torch.from_numpy(small), torch.from_numpy(big)).item() == pytest.approx(
        np_nst(small, big), rel=1e-5)


# --------------------------------------------------------------------- PKT

def np_pkt(s, t, eps=1e-7):
    """KL(P_t || P_s) of the cosine-similarity conditional probabilities
    p(i|j) = K(i, j) / sum_i K(i, j), K = (cos + 1) / 2; mean over all B^2 entries."""
    def probabilities(x):
        unit = x / (np.linalg.norm(x, axis=1, keepdims=True) + eps)
        n = len(x)
        kernel = np.array([[(np.dot(unit[i], unit[j]) + 1) / 2 for j in range(n)]
                           for i in range(n)])
        return kernel / kernel.sum(axis=1, keepdims=True)
    p_s, p_t = probabilities(s), probabilities(t)
    return float(np.mean(p_t * np.log((p_t + eps) / (p_s + eps))))


def test_pkt_matches_the_formula_on_pooled_features():
    s_pooled, t_pooled = RNG.normal(size=(4, 5)), RNG.normal(size=(4, 9))
    student = fake(S_LOGITS, [maps(4, 2, 2, 2)], pooled=s_pooled)
    teacher = fake(T_LOGITS, [maps(4, 2, 2, 2)], pooled=t_pooled)
    distiller = build("PKT", student, teacher, ce_weight=1.0, feat_weight=300.0)
    losses = run(distiller)
    assert losses["loss_feat"].item() == pytest.approx(300.0 * np_pkt(s_pooled, t_pooled),
                                                       rel=1e-4)
    assert_gradients(distiller, losses, [])


# ---------------------------------------------------------------------- SP

def np_sp(s, t):
    """|| G_t / |rows| - G_s / |rows| ||_F^2 / B^2 with G the B x B Gram matrix."""
    def similarity(x):
        flat = x.reshape(len(x), -1)
        gram = np.array([[np.dot(a, b) for b in flat] for a in flat])
        return gram / np.linalg.norm(gram, axis=1, keepdims=True)
    return float(np.sum((similarity(t) - similarity(s)) ** 2) / len(s) ** 2)


def test_sp_matches_the_formula_on_the_last_map():
    s_feats = [maps(4, 2, 4, 4), maps(4, 3, 2, 2)]
    t_feats = [maps(4, 6, 4, 4), RNG.normal(size=(4, 5, 1, 1))]   # shapes differ
    distiller = build("SP", fake(S_LOGITS, s_feats), fake(T_LOGITS, t_feats), feat_weight=30.0)
    losses = run(distiller)
    assert losses["loss_feat"].item() == pytest.approx(30.0 * np_sp(s_feats[-1], t_feats[-1]),
                                                       rel=1e-5)
    assert_gradients(distiller, losses, [])


# ------------------------------------------------------------------- KDSVD

def np_kdsvd(student_maps, teacher_maps, k):
    """Per sample and stage: the [C*H, W] matrix's top right singular vectors
    (teacher k, student k + 3); each teacher vector takes the student vector with
    the largest |cosine|, signed; both are scaled by the teacher's normalised
    singular values; the RBF kernel exp(-(a - b)^2 / 8) between consecutive
    stages' vectors; squared student-teacher kernel differences summed over
    everything and divided by the batch size."""
    batch = student_maps[0].shape[0]
    total = 0.0
    for b in range(batch):
        previous = None
        for s_map, t_map in zip(student_maps, teacher_maps):
            s_map, t_map = same_size(s_map, t_map)

            def right_vectors(x):
                c, h, w = x.shape
                # torch's LAPACK call in float64, so the singular vectors' signs are the
                # implementation's; everything after it is written here.
                _, values, vh = torch.linalg.svd(torch.from_numpy(x.reshape(c * h, w)),
                                                 full_matrices=False)
                return values.numpy(), vh.numpy().T
            t_values, t_vectors = right_vectors(t_map[b])
            _, s_vectors = right_vectors(s_map[b])
            t_vectors, s_vectors = t_vectors[:, :k], s_vectors[:, :k + 3]
            scale = t_values[:k] / np.linalg.norm(t_values[:k])
            aligned = np.zeros_like(t_vectors)
            for j in range(k):
                cosines = [np.dot(s_vectors[:, i], t_vectors[:, j])
                           for i in range(s_vectors.shape[1])]
                best = int(np.argmax(np.abs(cosines)))
                aligned[:, j] = np.sign(cosines[best]) * s_vectors[:, best]
            current = (aligned * scale, t_vectors * scale)
            if previous is not None:
                for a in range(current[0].shape[0]):
                    for c in range(previous[0].shape[0]):
                        for j in range(k):
                            ks = math.exp(-(current[0][a, j] - previous[0][c, j]) ** 2 / 8)
                            kt = math.exp(-(current[1][a, j] - previous[1][c, j]) ** 2 / 8)
                            total += (ks - kt) ** 2
            previous = current
    return total / batch


@pytest.mark.parametrize("k", [1, 2])
def test_kdsvd_matches_the_formula(k):
    student = [RNG.normal(size=(3, 4, 8, 8)), RNG.normal(size=(3, 6, 4, 4)),
               RNG.normal(size=(3, 5, 4, 4))]
    teacher = [RNG.normal(size=(3, 2, 8, 8)), RNG.normal(size=(3, 3, 8, 8)),   # pooled to 4x4
               RNG.normal(size=(3, 7, 4, 4))]
    loss = kdsvd_loss([torch.from_numpy(f) for f in student],
                      [torch.from_numpy(f) for f in teacher], k)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(np_kdsvd(student, teacher, k), rel=1e-9)
    assert loss.item() > 0


def test_kdsvd_distiller_uses_every_stage_but_the_stem():
    s_feats = [maps(4, 2, 4, 4), maps(4, 3, 4, 4), maps(4, 5, 4, 4)]
    t_feats = [maps(4, 6, 4, 4), maps(4, 4, 4, 4), maps(4, 2, 4, 4)]
    distiller = build("KDSVD", fake(S_LOGITS, s_feats), fake(T_LOGITS, t_feats), k=1,
                      feat_weight=2.0)
    losses = run(distiller)
    assert losses["loss_feat"].item() == pytest.approx(
        2.0 * np_kdsvd(s_feats[1:], t_feats[1:], 1), rel=1e-4)
    assert_gradients(distiller, losses, [])


# --------------------------------------------------------------------- VID

def np_vid(student_map, teacher_map, weights, log_scale, eps):
    """Gaussian NLL 0.5 * ((mu - t)^2 / var + log var), var = log(1 + e^s) + eps per
    channel, mu = W3 relu(W2 relu(W1 x)) (1x1 convolutions), mean over elements."""
    student_map, teacher_map = same_size(student_map, teacher_map)
    x = student_map
    for i, w in enumerate(weights):
        x = np.einsum("oc,bchw->bohw", w[:, :, 0, 0], x)
        if i < len(weights) - 1:
            x = np.maximum(x, 0)
    variance = np.log1p(np.exp(log_scale)) + eps
    variance = variance[None, :, None, None]
    return float(np.mean(0.5 * ((x - teacher_map) ** 2 / variance + np.log(variance))))


def test_vid_matches_the_formula_and_trains_its_variances():
    s_feats = [maps(4, 2, 4, 4), maps(4, 3, 4, 4), maps(4, 5, 2, 2)]
    t_feats = [maps(4, 6, 4, 4), maps(4, 4, 2, 2), maps(4, 2, 2, 2)]   # stage 1: pooled
    distiller = build("VID", fake(S_LOGITS, s_feats), fake(T_LOGITS, t_feats), ce_weight=1.0,
                      feat_weight=3.0, init_pred_var=5.0, eps=1e-5, image_shape=(3, 4, 4))
    assert len(distiller.regressors) == 2 and len(distiller.log_scales) == 2
    for log_scale, channels in zip(distiller.log_scales, (4, 2)):    # the teacher's widths
        assert log_scale.shape == (channels,)
        assert torch.allclose(torch.nn.functional.softplus(log_scale) + 1e-5,
                              torch.full((channels,), 5.0))
    with torch.no_grad():                     # variances away from their start, to be seen
        distiller.log_scales[0].copy_(torch.tensor([0.3, -1.0, 2.0, 0.0]))
    losses = run(distiller)
    expected = sum(
        np_vid(s, t, [layer.weight.detach().double().numpy() for layer in regressor[::2]],
               log_scale.detach().double().numpy(), 1e-5)
        for s, t, regressor, log_scale in zip(s_feats[1:], t_feats[1:], distiller.regressors,
                                              distiller.log_scales))
    assert losses["loss_feat"].item() == pytest.approx(3.0 * expected, rel=1e-5)
    # The regressors and the variances train with the student.
    assert_gradients(distiller, losses, ["regressors", "log_scales"])
    learnable = {id(p) for p in distiller.get_learnable_parameters()}
    assert all(id(p) in learnable for p in distiller.log_scales.parameters())
    assert all(k.startswith(("student.", "regressors.", "log_scales."))
               for k in distiller.state_dict_to_save())
    assert distiller.get_extra_parameters() == sum(
        p.numel() for p in [*distiller.regressors.parameters(), *distiller.log_scales])


# ------------------------------------------------------------ real models

@pytest.mark.parametrize("method", ["NST", "PKT", "SP", "KDSVD", "VID"])
@pytest.mark.parametrize("teacher_name, student_name", [("vgg13", "MobileNetV2"),
                                                        ("resnet32x4", "ShuffleV1")])
def test_heterogeneous_pairs_give_finite_losses_and_gradients(method, teacher_name,
                                                              student_name):
    """Stages of different sizes and widths (the MobileNet/ShuffleNet configs)."""
    cfg = load_cfg(None, ["DISTILLER.TYPE", method])
    torch.manual_seed(0)
    student, teacher = build_model(student_name, 10), build_model(teacher_name, 10)
    distiller = build_distiller(cfg, student, teacher)
    distiller.train()
    _, losses = distiller(torch.randn(4, 3, 32, 32), torch.arange(4))
    assert torch.isfinite(losses["loss_feat"]) and losses["loss_feat"] > 0
    losses["loss_feat"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
