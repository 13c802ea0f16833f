"""WTTM, WKD, SDD (on KD, DKD, NKD), CAT-KD and ICKD against the papers' formulas.

Expected values are computed here in float64 numpy, written from the papers
and the authors' code (zkxufo/TTM, JiamingLv/WKD, shicaiwei123/SDD-CVPR2024,
GzyAftermath/CAT-KD, ADLab-AutoDrive/ICKD) independently of the implementation.
The models are fakes with fixed outputs (times a parameter that is 1, so
gradients have somewhere to go) and a real linear classifier where the method
applies it to a map.
"""
import glob
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from mdistill.distillers import DISTILLERS
from mdistill.distillers.catkd import class_activation_maps
from mdistill.distillers.ickd import channel_correlation_loss
from mdistill.distillers.sdd import ScaleDecoupling
from mdistill.distillers.wkd import teacher_cost_matrix, wkd_feature_loss, wkd_logit_loss
from mdistill.distillers.wttm import wttm_loss
from mdistill.engine.teacher_cache import teacher_fingerprint
from mdistill.errors import UserError
from mdistill.models import build_model
from test_distillers import make_trainer, two_steps
from test_new_logit_methods import FixedLogits, np_kl, np_softmax

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ fakes
class FixedMap(nn.Module):
    """A fixed last map (times a unit parameter), average-pooled into a linear ``fc``."""

    def __init__(self, feature_map, weight, bias):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.register_buffer("map", torch.as_tensor(np.asarray(feature_map), dtype=torch.float32))
        self.fc = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(torch.as_tensor(weight))
            self.fc.bias.copy_(torch.as_tensor(bias))

    def forward(self, x):
        feature_map = self.map[:len(x)] * self.scale
        pooled = feature_map.mean(dim=(2, 3))
        return self.fc(pooled), {"feats": [feature_map], "preact_feats": [feature_map],
                                 "pooled_feat": pooled}


def map_model(rng, batch, channels, classes, side):
    feature_map = rng.normal(size=(batch, channels, side, side))
    weight, bias = rng.normal(size=(classes, channels)), rng.normal(size=classes) * 0.1
    return FixedMap(feature_map, weight, bias), feature_map, weight, bias


def run(distiller, batch, target, epoch=None, size=4):
    distiller.train()
    if epoch is not None:
        distiller.on_epoch_start(epoch)
    image = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    _, losses = distiller.forward_train(image, torch.as_tensor(target))
    return {name: float(value.detach()) for name, value in losses.items()}


# ------------------------------------------------------------------ numpy reference
def np_cells(feature_map, side):
    """Cell means of a ``[B, C, H, W]`` map on a ``side x side`` grid whose cells are
    adaptive pooling's: rows floor(i H / side) to ceil((i + 1) H / side)."""
    height, width = feature_map.shape[2:]
    out = np.zeros(feature_map.shape[:2] + (side, side))
    for i in range(side):
        for j in range(side):
            rows = slice(i * height // side, -(-(i + 1) * height // side))
            cols = slice(j * width // side, -(-(j + 1) * width // side))
            out[:, :, i, j] = feature_map[:, :, rows, cols].mean(axis=(2, 3))
    return out


def np_region_logits(feature_map, weight, bias, scales):
    """``[regions, B, classes]``: the global region, then each scale's cells row by row."""
    regions = []
    for scale in scales:
        cells = np_cells(feature_map, scale)
        for i in range(scale):
            for j in range(scale):
                regions.append(cells[:, :, i, j] @ weight.T + bias)
    return np.stack(regions)


def np_region_weights(teacher_regions, target):
    """2 where a local region's teacher prediction is right and the global one wrong,
    or the reverse; 1 elsewhere (the global region included)."""
    right = teacher_regions.argmax(axis=2) == target[None, :]
    return np.where(right != right[0:1], 2.0, 1.0)


# ---------------------------------------------------------------------- WTTM
def test_wttm_matches_the_weighted_transformed_teacher_formula():
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(6, 7)) * 3, rng.normal(size=(6, 7)) * 3
    gamma = 0.2
    expected = []
    for s, t in zip(student, teacher):
        powered = np_softmax(t) ** gamma
        weight = powered.sum()
        expected.append(weight * np_kl(powered / weight, np_softmax(s)))
    value = wttm_loss(torch.tensor(student), torch.tensor(teacher), gamma)
    assert float(value) == pytest.approx(np.mean(expected), rel=1e-5)

    target = rng.integers(0, 7, size=6)
    distiller = DISTILLERS.get("WTTM")(FixedLogits(student), FixedLogits(teacher), gamma=gamma,
                                       ce_weight=1.0, kd_weight=4.0)
    losses = run(distiller, 6, target)
    assert losses["loss_kd"] == pytest.approx(4.0 * np.mean(expected), rel=1e-5)
    assert distiller.teacher_temperatures() is None and distiller.teacher_logits_only


def test_wttm_with_gamma_one_is_the_plain_kl_at_temperature_one():
    rng = np.random.default_rng(1)
    student, teacher = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    expected = np.mean([np_kl(np_softmax(t), np_softmax(s)) for s, t in zip(student, teacher)])
    assert float(wttm_loss(torch.tensor(student), torch.tensor(teacher), 1.0)) == \
        pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------- WKD
def np_sinkhorn_distance(student, teacher, cost, reg, iterations):
    """The authors' Sinkhorn on one pair of distributions (cost already relu + 1e-8)."""
    kernel = np.exp(-cost / reg)
    u = np.full(len(student), 1.0 / len(student))
    for _ in range(iterations):
        v = teacher / (kernel.T @ u + 1e-8)
        u = student / (kernel @ v + 1e-8)
    flow = u[:, None] * kernel * v[None, :]
    return float((flow * cost).sum())


def np_wkd_logit(student, teacher, target, cost, temperature, reg, iterations):
    """(target term, mean Wasserstein distance over the non-target classes)."""
    target_terms, distances = [], []
    for s, t, y in zip(student, teacher, target):
        target_terms.append(-np_softmax(t)[y] * math.log(np_softmax(s)[y]))
        keep = np.arange(len(s)) != y
        reduced = np.maximum(cost[np.ix_(keep, keep)], 0) + 1e-8
        distances.append(np_sinkhorn_distance(np_softmax(s[keep], temperature),
                                              np_softmax(t[keep], temperature),
                                              reduced, reg, iterations))
    return float(np.mean(target_terms)), float(np.mean(distances))


def random_cost(rng, classes):
    cost = rng.uniform(0.2, 1.5, size=(classes, classes))
    cost = (cost + cost.T) / 2
    np.fill_diagonal(cost, 0.0)
    return cost


@pytest.mark.parametrize("temperature,reg", [(4.0, 0.05), (2.0, 0.5)])
def test_wkd_logit_loss_matches_sinkhorn_over_the_non_target_classes(temperature, reg):
    rng = np.random.default_rng(2)
    student, teacher = rng.normal(size=(5, 6)) * 2, rng.normal(size=(5, 6)) * 2
    target = rng.integers(0, 6, size=5)
    cost = random_cost(rng, 6)
    expected = np_wkd_logit(student, teacher, target, cost, temperature, reg, 10)
    target_term, distance = wkd_logit_loss(torch.tensor(student), torch.tensor(teacher),
                                           torch.tensor(target), torch.tensor(cost),
                                           temperature, reg, 10)
    assert float(target_term) == pytest.approx(expected[0], rel=1e-5)
    assert float(distance) == pytest.approx(expected[1], rel=1e-4)


def test_wkd_distiller_sharpens_the_cost_and_decays_its_weights_by_cosine():
    rng = np.random.default_rng(3)
    student, teacher = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    target = rng.integers(0, 5, size=4)
    cost = random_cost(rng, 5)
    sharpened = 1.0 - np.exp(-2.0 * cost)
    expected_target, expected_distance = np_wkd_logit(student, teacher, target, sharpened, 4.0,
                                                      0.05, 10)
    distiller = DISTILLERS.get("WKD")(FixedLogits(student), FixedLogits(teacher),
                                      cost=torch.tensor(cost), logit_weight=30.0, feat_weight=0.0,
                                      sharpen=2.0, decay_epoch=10, epochs=20)
    before = run(distiller, 4, target, epoch=10)
    assert before["loss_target"] == pytest.approx(expected_target, rel=1e-5)
    assert before["loss_wkd_logit"] == pytest.approx(30.0 * expected_distance, rel=1e-4)
    # After epoch 10 the weight follows 0.5 (1 + cos(pi (e - 10) / 10)); the
    # target term is never weighted (as the authors).
    later = run(distiller, 4, target, epoch=15)
    assert later["loss_wkd_logit"] == pytest.approx(0.5 * before["loss_wkd_logit"], rel=1e-5)
    assert later["loss_target"] == pytest.approx(before["loss_target"])
    assert run(distiller, 4, target, epoch=20)["loss_wkd_logit"] == pytest.approx(0.0, abs=1e-9)


def test_wkd_logit_gradient_reaches_the_student_through_the_sinkhorn_iterations():
    rng = np.random.default_rng(4)
    student = torch.tensor(rng.normal(size=(3, 5)), requires_grad=True)
    _, distance = wkd_logit_loss(student, torch.tensor(rng.normal(size=(3, 5))),
                                 torch.tensor([0, 1, 2]), torch.tensor(random_cost(rng, 5)),
                                 4.0)
    distance.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def np_moments(feature_map, grid, eps):
    """Per-cell channel means and sqrt(unbiased variance + eps), cells as adaptive pooling."""
    height, width = feature_map.shape[2:]
    means = np.zeros(feature_map.shape[:2] + (grid, grid))
    stds = np.zeros_like(means)
    for i in range(grid):
        for j in range(grid):
            block = feature_map[:, :, i * height // grid: -(-(i + 1) * height // grid),
                                j * width // grid: -(-(j + 1) * width // grid)]
            flat = block.reshape(block.shape[0], block.shape[1], -1)
            means[:, :, i, j] = flat.mean(axis=2)
            stds[:, :, i, j] = np.sqrt(flat.var(axis=2, ddof=1) + eps)
    return means, stds


@pytest.mark.parametrize("grid,side", [(1, 4), (2, 5), (4, 8)])
def test_wkd_feature_loss_is_the_gaussian_wasserstein_distance_per_cell(grid, side):
    rng = np.random.default_rng(5)
    student = rng.normal(size=(3, 4, side, side)) * 2 + 5     # far from zero mean on purpose
    teacher = rng.normal(size=(3, 4, side, side)) + 4
    (student_mean, student_std), (teacher_mean, teacher_std) = (np_moments(student, grid, 1e-5),
                                                                np_moments(teacher, grid, 1e-5))
    scale = grid * grid * 3
    mean_term, std_term = wkd_feature_loss(torch.tensor(student), torch.tensor(teacher), grid,
                                           1e-5)
    assert float(mean_term) == pytest.approx(((student_mean - teacher_mean) ** 2).sum() / scale,
                                             rel=1e-4)
    assert float(std_term) == pytest.approx(((student_std - teacher_std) ** 2).sum() / scale,
                                            rel=1e-4)


class Classifier(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(torch.as_tensor(weight))


def np_fc_cost(weight):
    rows = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    return 1.0 - rows @ rows.T


def test_wkd_cost_is_computed_once_and_kept_beside_the_teacher_file(tmp_path):
    rng = np.random.default_rng(6)
    weight = rng.normal(size=(5, 3))
    teacher = Classifier(weight)
    checkpoint = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": teacher.state_dict()}, checkpoint)

    cost = teacher_cost_matrix(teacher, "fc", str(checkpoint))
    np.testing.assert_allclose(cost.numpy(), np_fc_cost(weight), atol=1e-6)
    fingerprint = teacher_fingerprint(teacher)
    kept = glob.glob(str(tmp_path / "ckpt_epoch_240.pth.wkd_fc_cost.*.pt"))
    assert kept == [str(checkpoint) + f".wkd_fc_cost.{fingerprint[:16]}.pt"]
    assert torch.load(kept[0], weights_only=True)["fingerprint"] == fingerprint

    # The next run reads the file: a marker written there comes back unchanged.
    marker = torch.full((5, 5), 7.0)
    torch.save({"fingerprint": fingerprint, "classifier": "fc", "cost": marker}, kept[0])
    assert torch.equal(teacher_cost_matrix(teacher, "fc", str(checkpoint)), marker)

    # Other weights have another fingerprint, so another file and their own cost.
    other = Classifier(rng.normal(size=(5, 3)))
    other_cost = teacher_cost_matrix(other, "fc", str(checkpoint))
    np.testing.assert_allclose(other_cost.numpy(), np_fc_cost(other.fc.weight.detach().numpy()),
                               atol=1e-6)
    assert len(glob.glob(str(tmp_path / "*.wkd_fc_cost.*.pt"))) == 2


def test_wkd_cost_is_computed_in_memory_when_the_folder_cannot_be_written(tmp_path, monkeypatch):
    weight = np.random.default_rng(7).normal(size=(4, 3))
    teacher = Classifier(weight)
    checkpoint = tmp_path / "teacher.pth"
    torch.save({"model": teacher.state_dict()}, checkpoint)

    def refuse(*args, **kwargs):
        raise PermissionError("read-only folder")
    monkeypatch.setattr(torch, "save", refuse)
    cost = teacher_cost_matrix(teacher, "fc", str(checkpoint))
    np.testing.assert_allclose(cost.numpy(), np_fc_cost(weight), atol=1e-6)
    assert sorted(os.listdir(tmp_path)) == ["teacher.pth"]
    # No checkpoint file at all (fresh teachers, torchvision weights): in memory too.
    np.testing.assert_allclose(teacher_cost_matrix(teacher, "fc", None).numpy(),
                               np_fc_cost(weight), atol=1e-6)


def test_wkd_declares_only_the_parts_whose_weight_is_not_zero():
    student, teacher = build_model("resnet8", 10), build_model("resnet8", 10)
    cost = torch.rand(10, 10)
    logit_only = DISTILLERS.get("WKD")(student, teacher, cost=cost, feat_weight=0.0)
    assert logit_only.teacher_reads == {"logits"} and logit_only.teacher_logits_only
    assert logit_only.teacher_temperatures() == (1.0, 4.0)
    assert not hasattr(logit_only, "projector")
    feature_only = DISTILLERS.get("WKD")(student, teacher, logit_weight=0.0, grid=2)
    assert feature_only.teacher_reads == {"feats"} and feature_only.teacher_temperatures() is None
    assert "cost" not in dict(feature_only.named_buffers())
    losses = run(feature_only, 2, [0, 1], size=32)
    assert set(losses) == {"loss_ce", "loss_wkd_feat"} and losses["loss_wkd_feat"] > 0
    with pytest.raises(UserError, match="WKD_LOGIT_WEIGHT and WKD.LOSS.WKD_FEAT_WEIGHT are both 0"):
        DISTILLERS.get("WKD")(student, teacher, logit_weight=0.0, feat_weight=0.0)
    with pytest.raises(UserError, match="WKD.HINT_LAYER 7 is out of range"):
        DISTILLERS.get("WKD")(student, teacher, logit_weight=0.0, hint_layer=7)


# ---------------------------------------------------------------------- SDD
def sdd_pair(seed, batch=4, channels=3, classes=5, side=4):
    rng = np.random.default_rng(seed)
    student = map_model(rng, batch, channels, classes, side)
    teacher = map_model(rng, batch, channels, classes, side)
    target = rng.integers(0, classes, size=batch)
    return student, teacher, target


def sdd_regions(student, teacher, target, scales):
    _, student_map, student_w, student_b = student
    _, teacher_map, teacher_w, teacher_b = teacher
    s = np_region_logits(student_map, student_w, student_b, scales)
    t = np_region_logits(teacher_map, teacher_w, teacher_b, scales)
    weights = np_region_weights(t, target)
    assert (weights == 2).any() and (weights == 1).any()    # both kinds of region occur
    return s, t, weights


def test_sdd_kd_weights_every_region_s_kl_and_averages_over_regions_and_samples():
    student, teacher, target = sdd_pair(8)
    s, t, weights = sdd_regions(student, teacher, target, [1, 2])
    per_region = np.array([[16.0 * np_kl(np_softmax(t[n, b], 4.0), np_softmax(s[n, b], 4.0))
                            for b in range(len(target))] for n in range(len(s))])
    expected = 0.9 * (weights * per_region).mean()
    sdd = ScaleDecoupling(student[0], teacher[0], scales=[1, 2], image_shape=(3, 4, 4))
    distiller = DISTILLERS.get("KD")(student[0], teacher[0], scale_decoupling=sdd)
    assert run(distiller, 4, target)["loss_kd"] == pytest.approx(expected, rel=1e-5)
    assert distiller.teacher_reads == {"feats"} and not distiller.teacher_logits_only


def np_dkd_row(s, t, y, alpha, beta, temperature):
    p_s, p_t = np_softmax(s, temperature), np_softmax(t, temperature)
    binary_s, binary_t = np.array([p_s[y], 1 - p_s[y]]), np.array([p_t[y], 1 - p_t[y]])
    keep = np.arange(len(s)) != y
    nckd = np_kl(np_softmax(t[keep], temperature), np_softmax(s[keep], temperature))
    return (alpha * np_kl(binary_t, binary_s) + beta * nckd) * temperature ** 2


def test_sdd_dkd_is_dkd_per_region_weighted_and_warmed_up():
    student, teacher, target = sdd_pair(9)
    s, t, weights = sdd_regions(student, teacher, target, [1, 2])
    per_region = np.array([[np_dkd_row(s[n, b], t[n, b], target[b], 1.0, 6.0, 4.0)
                            for b in range(len(target))] for n in range(len(s))])
    sdd = ScaleDecoupling(student[0], teacher[0], scales=[1, 2], image_shape=(3, 4, 4))
    distiller = DISTILLERS.get("DKD")(student[0], teacher[0], beta=6.0, warmup=20,
                                      scale_decoupling=sdd)
    expected = 5 / 20 * (weights * per_region).mean()
    assert run(distiller, 4, target, epoch=5)["loss_kd"] == pytest.approx(expected, rel=1e-5)


def test_sdd_nkd_is_nkd_per_region_weighted_and_warmed_up():
    student, teacher, target = sdd_pair(10)
    s, t, weights = sdd_regions(student, teacher, target, [1, 2])
    temperature, gamma = 4.0, 6.0
    target_rows = np.array([[-np_softmax(t[n, b])[y] * math.log(np_softmax(s[n, b])[y])
                             for b, y in enumerate(target)] for n in range(len(s))])
    non_target_rows = np.array([[
        -gamma * temperature ** 2 * np.sum(
            np_softmax(np.delete(t[n, b], y), temperature)
            * np.log(np_softmax(np.delete(s[n, b], y), temperature)))
        for b, y in enumerate(target)] for n in range(len(s))])
    sdd = ScaleDecoupling(student[0], teacher[0], scales=[1, 2], image_shape=(3, 4, 4))
    distiller = DISTILLERS.get("NKD")(student[0], teacher[0], temperature=temperature,
                                      gamma=gamma, warmup=20, scale_decoupling=sdd)
    losses = run(distiller, 4, target, epoch=10)
    assert losses["loss_target"] == pytest.approx(0.5 * (weights * target_rows).mean(), rel=1e-5)
    assert losses["loss_non_target"] == pytest.approx(0.5 * (weights * non_target_rows).mean(),
                                                      rel=1e-5)


def test_sdd_with_the_global_region_alone_is_the_method_itself():
    student, teacher, target = sdd_pair(11)
    plain = DISTILLERS.get("KD")(student[0], teacher[0])
    sdd = ScaleDecoupling(student[0], teacher[0], scales=[1], image_shape=(3, 4, 4))
    decoupled = DISTILLERS.get("KD")(student[0], teacher[0], scale_decoupling=sdd)
    assert run(decoupled, 4, target)["loss_kd"] == pytest.approx(run(plain, 4, target)["loss_kd"],
                                                                 rel=1e-6)


@pytest.mark.parametrize("name,source", [("resnet8", "feats"), ("wrn_16_1", "preact_feats")])
def test_sdd_finds_the_map_each_zoo_model_pools_into_its_classifier(name, source):
    torch.manual_seed(0)
    student, teacher = build_model(name, 10), build_model(name, 10)
    sdd = ScaleDecoupling(student, teacher, scales=[1, 2, 4])
    assert sdd.teacher_reads == {source} and sdd.student_reads == {"logits", source}
    student.eval()
    image = torch.randn(3, 3, 32, 32)
    logits, feats = student(image)
    with torch.no_grad():
        _, teacher_feats = teacher(image)
    rows, _, target_rows, weights = sdd.rows(student, feats, teacher, teacher_feats,
                                             torch.tensor([1, 2, 3]))
    # 1 + 4 + 16 regions; the first 3 rows (the global region) are the logits.
    assert rows.shape == (21 * 3, 10) and weights.shape == (21 * 3,)
    torch.testing.assert_close(rows[:3], logits, rtol=1e-4, atol=1e-5)
    assert target_rows.tolist() == [1, 2, 3] * 21


def test_sdd_refuses_bad_scales_and_models_without_their_pooled_map():
    student, teacher = build_model("resnet8", 10), build_model("resnet8", 10)
    for scales in ([2, 4], [1, 1], [1, 2.5], []):
        with pytest.raises(UserError, match="SDD.SCALES must be increasing grid sizes"):
            ScaleDecoupling(student, teacher, scales=scales)
    with pytest.raises(UserError, match="model MobileNetV2 average-pools into its classifier"):
        ScaleDecoupling(build_model("MobileNetV2", 10), teacher)


@pytest.mark.parametrize("method", ["KD", "DKD", "NKD"])
def test_sdd_trains_two_steps_through_the_trainer(method, cifar_root, teacher_file, tmp_path):
    trainer = make_trainer(method, cifar_root, teacher_file, tmp_path, "SDD.ENABLE", "True",
                           "SDD.SCALES", "[1, 2, 4]")
    distiller = trainer.distiller
    assert distiller.scale_decoupling.scales == [1, 2, 4]
    assert distiller.teacher_reads == {"feats"}
    distiller.zero_grad(set_to_none=True)
    values = two_steps(trainer)
    assert all(math.isfinite(value) for step in values for value in step.values())
    assert distiller.student.fc.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------- declarations
def test_logit_methods_declare_what_they_read_and_at_which_temperatures():
    student, teacher = FixedLogits(np.zeros((2, 3))), FixedLogits(np.zeros((2, 3)))
    kd = DISTILLERS.get("KD")(student, teacher, temperature=4.0)
    assert kd.teacher_reads == {"logits"} and kd.teacher_temperatures() == (4.0,)
    assert DISTILLERS.get("KD")(student, teacher, logit_stand=True).teacher_temperatures() is None
    dkd = DISTILLERS.get("DKD")(student, teacher, temperature=2.0)
    assert dkd.teacher_logits_only and dkd.teacher_temperatures() == (2.0,)
    assert DISTILLERS.get("DKD")(student, teacher, logit_stand=True).teacher_temperatures() is None
    # NKD softens the teacher at 1 for its target term and at T for the others.
    assert DISTILLERS.get("NKD")(student, teacher, temperature=1.0).teacher_temperatures() == (1.0,)
    assert DISTILLERS.get("NKD")(student, teacher, temperature=3.0).teacher_temperatures() == \
        (1.0, 3.0)


def test_nkd_warmup_scales_both_terms():
    rng = np.random.default_rng(12)
    student, teacher = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    target = rng.integers(0, 5, size=4)
    plain = run(DISTILLERS.get("NKD")(FixedLogits(student), FixedLogits(teacher)), 4, target)
    warm = run(DISTILLERS.get("NKD")(FixedLogits(student), FixedLogits(teacher), warmup=20), 4,
               target, epoch=5)
    for name in ("loss_target", "loss_non_target"):
        assert warm[name] == pytest.approx(plain[name] / 4, rel=1e-6)
    assert warm["loss_ce"] == pytest.approx(plain["loss_ce"])


# ---------------------------------------------------------------------- CAT-KD
@pytest.mark.parametrize("normalize,resolution", [(True, 2), (False, 2), (True, 1)])
def test_catkd_is_the_mse_of_pooled_class_activation_maps(normalize, resolution):
    rng = np.random.default_rng(13)
    student, student_map, student_w, _ = map_model(rng, 3, 4, 5, 4)
    teacher, teacher_map, teacher_w, _ = map_model(rng, 3, 6, 5, 4)
    target = rng.integers(0, 5, size=3)

    def cams(feature_map, weight):        # the classifier as a 1x1 conv, then pooled
        full = np.einsum("kc,bchw->bkhw", weight, feature_map)
        pooled = np_cells(full, resolution)
        if normalize:
            pooled = pooled / np.sqrt((pooled ** 2).sum(axis=(2, 3), keepdims=True))
        return pooled

    expected = np.mean((cams(student_map, student_w) - cams(teacher_map, teacher_w)) ** 2)
    distiller = DISTILLERS.get("CATKD")(student, teacher, cat_weight=15.0, resolution=resolution,
                                        normalize=normalize, image_shape=(3, 4, 4))
    assert run(distiller, 3, target)["loss_cat"] == pytest.approx(15.0 * expected, rel=1e-5)
    assert distiller.teacher_reads == {"feats"}


# ---------------------------------------------------------------------- ICKD
def np_ickd(student_map, teacher_map):
    total = 0.0
    for s, t in zip(student_map, teacher_map):
        grams = []
        for feature_map in (s, t):
            flat = feature_map.reshape(feature_map.shape[0], -1)
            gram = flat @ flat.T
            grams.append(gram / np.linalg.norm(gram, axis=1, keepdims=True))
        total += ((grams[0] - grams[1]) ** 2).sum()
    return total / (student_map.shape[1] * student_map.shape[0])


def test_ickd_loss_matches_the_normalised_channel_gram_distance():
    rng = np.random.default_rng(14)
    student = rng.normal(size=(3, 4, 2, 2))
    teacher = rng.normal(size=(3, 4, 4, 4))      # the Gram matrix is C x C whatever H, W
    value = channel_correlation_loss(torch.tensor(student), torch.tensor(teacher))
    assert float(value) == pytest.approx(np_ickd(student, teacher), rel=1e-5)


def test_ickd_embeds_the_student_to_the_teachers_width_and_kd_is_optional():
    student, teacher = build_model("resnet8", 10), build_model("resnet8x4", 10)
    ickd = DISTILLERS.get("ICKD")(student, teacher)
    assert ickd.embed[0].in_channels == 64 and ickd.embed[0].out_channels == 256
    assert ickd.teacher_reads == {"logits", "feats"} and ickd.teacher_temperatures() == (4.0,)
    without_kl = DISTILLERS.get("ICKD")(student, teacher, kd_weight=0.0)
    assert without_kl.teacher_reads == {"feats"} and without_kl.teacher_temperatures() is None
    losses = run(without_kl, 2, [0, 1], size=32)
    assert set(losses) == {"loss_ce", "loss_feat"} and losses["loss_feat"] > 0


# ---------------------------------------------------------------------- precision
def loss_helpers():
    rng = np.random.default_rng(15)

    def fp32(*shape):
        return torch.tensor(rng.normal(size=shape), dtype=torch.float32)
    student, teacher, weight = fp32(4, 10), fp32(4, 10), fp32(10, 32)
    maps = fp32(4, 32, 4, 4), fp32(4, 32, 4, 4)
    cost = torch.tensor(random_cost(rng, 10), dtype=torch.float32)
    return {
        "wkd_logit": lambda: wkd_logit_loss(student, teacher, torch.arange(4), cost, 4.0)[1],
        "ickd": lambda: channel_correlation_loss(*maps),
        "catkd": lambda: class_activation_maps(maps[0], weight, 2).sum(),
    }


@pytest.mark.parametrize("name", ["wkd_logit", "ickd", "catkd"])
def test_matrix_products_stay_in_fp32_under_bf16_autocast(name):
    # Sinkhorn's iterations, the Gram matrices and the CAMs lose about 1e-3 of
    # their value in bf16; the helpers switch autocast off for them.
    helper = loss_helpers()[name]
    expected = float(helper())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = helper()
    assert value.dtype == torch.float32 and float(value) == pytest.approx(expected, rel=1e-6)
