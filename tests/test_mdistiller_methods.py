"""DKD, ReviewKD and OFD against their papers' formulas, and mdistiller's own
config files loading unchanged.

Expected values are computed here in float64 numpy from the papers (DKD:
Zhao et al. 2022, Eq. 1-2; ReviewKD: Chen et al. 2021, the hierarchical
context loss; OFD: Heo et al. 2019, the margin and the partial L2 distance),
independently of the implementation; the margin is integrated numerically.
"""
import glob
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from conftest import ROOT
from test_distiller_losses import one_thread  # noqa: F401  (autouse: one thread)
from mdistill.config import load_cfg
from mdistill.distillers import DISTILLERS, build_distiller, kd_loss
from mdistill.distillers.dkd import DKD, dkd_loss
from mdistill.distillers.ofd import OFD, bn_margin, ofd_feature_loss
from mdistill.distillers.reviewkd import ReviewKD, hcl_loss, student_levels
from mdistill.errors import UserError
from mdistill.models import build_model

# Copies of files from mdistiller's configs/ (megvii-research/mdistiller).
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "mdistiller_configs")


def np_softmax(rows):
    e = np.exp(rows - rows.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def kl_rows(p, q):
    return (p * np.log(p / q)).sum(axis=1)


# ---------------------------------------------------------------------- DKD
def np_dkd(student, teacher, target, alpha, beta, temperature):
    """TCKD on the binary (target, rest) probabilities, NCKD on the non-target
    classes renormalised, batch mean, times T^2 (the paper's Eq. 2)."""
    rows = np.arange(len(target))
    ps, pt = np_softmax(student / temperature), np_softmax(teacher / temperature)
    bs = np.stack([ps[rows, target], 1 - ps[rows, target]], axis=1)
    bt = np.stack([pt[rows, target], 1 - pt[rows, target]], axis=1)
    keep = np.ones_like(ps, dtype=bool)
    keep[rows, target] = False
    qs = ps[keep].reshape(len(target), -1)
    qt = pt[keep].reshape(len(target), -1)
    qs, qt = qs / qs.sum(1, keepdims=True), qt / qt.sum(1, keepdims=True)
    return temperature ** 2 * (alpha * kl_rows(bt, bs).mean() + beta * kl_rows(qt, qs).mean())


@pytest.mark.parametrize("alpha,beta,temperature", [(1.0, 8.0, 4.0), (1.0, 0.5, 1.0),
                                                    (0.3, 6.0, 2.0)])
def test_dkd_loss_is_tckd_plus_nckd(alpha, beta, temperature):
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(0, 3, (8, 10)), rng.normal(0, 3, (8, 10))
    target = rng.integers(0, 10, 8)
    value = dkd_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(target),
                     alpha, beta, temperature)
    expected = np_dkd(student, teacher, target, alpha, beta, temperature)
    assert value.dtype == torch.float32
    assert float(value) == pytest.approx(expected, rel=1e-5)


def test_dkd_reformulates_kd():
    """The paper's Eq. 1: KD = TCKD + (1 - p_t of the teacher) * NCKD, per sample."""
    torch.manual_seed(0)
    for _ in range(3):
        student, teacher = torch.randn(1, 20) * 2, torch.randn(1, 20) * 2
        target = torch.randint(0, 20, (1,))
        teacher_target = F.softmax(teacher / 4, dim=1)[0, target].item()
        dkd = dkd_loss(student, teacher, target, 1.0, 1.0 - teacher_target, 4.0)
        assert float(dkd) == pytest.approx(float(kd_loss(student, teacher, 4.0)), rel=1e-5)


def test_dkd_stays_finite_for_confident_predictions():
    """In fp32 the student's non-target mass underflows to 0 here, so a log of
    the probabilities (mdistiller's) is -inf; log-space terms stay finite."""
    student = torch.zeros(2, 10)
    student[:, 3] = 120.0
    student.requires_grad_(True)
    teacher, target = torch.randn(2, 10), torch.tensor([3, 3])
    assert (1 - F.softmax(student / 1.0, dim=1)[:, 3] == 0).all()
    loss = dkd_loss(student, teacher, target, 1.0, 8.0, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


class FixedLogits(nn.Module):
    """Returns the first ``len(x)`` rows of fixed logits, through a unit parameter."""

    def __init__(self, logits):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.register_buffer("logits", torch.as_tensor(logits, dtype=torch.float32))

    def forward(self, x):
        return self.logits[:len(x)] * self.scale, {}


def test_dkd_warms_up_over_its_epochs_and_weights_cross_entropy():
    rng = np.random.default_rng(1)
    student, teacher = rng.normal(0, 2, (4, 10)), rng.normal(0, 2, (4, 10))
    target = np.array([0, 3, 3, 9])
    distiller = DKD(FixedLogits(student), FixedLogits(teacher), ce_weight=0.5, alpha=2.0,
                    beta=3.0, temperature=2.0, warmup=20)
    assert DKD.teacher_logits_only
    full = np_dkd(student, teacher, target, 2.0, 3.0, 2.0)
    rows = np.arange(4)
    cross_entropy = -np.log(np_softmax(student)[rows, target]).mean()
    for epoch, factor in ((1, 1 / 20), (5, 0.25), (20, 1.0), (60, 1.0)):
        distiller.on_epoch_start(epoch)
        _, losses = distiller.forward_train(torch.zeros(4, 3, 2, 2), torch.tensor(target))
        assert float(losses["loss_kd"].detach()) == pytest.approx(factor * full, rel=1e-5)
        assert float(losses["loss_ce"].detach()) == pytest.approx(0.5 * cross_entropy, rel=1e-5)


# ----------------------------------------------------------------- ReviewKD
def np_pool(x, size):
    batch, channels, height, width = x.shape
    return x.reshape(batch, channels, size, height // size, size, width // size).mean((3, 5))


def np_hcl(student_maps, teacher_maps):
    """Per pair: (MSE + sum over the pooled sizes 4, 2, 1 smaller than the map of
    MSE / 2^k) / (1 + sum of those weights); summed over the pairs."""
    total = 0.0
    for student, teacher in zip(student_maps, teacher_maps):
        terms, weights = [((student - teacher) ** 2).mean()], [1.0]
        for k, size in enumerate([size for size in (4, 2, 1) if size < student.shape[2]], 1):
            terms.append(((np_pool(student, size) - np_pool(teacher, size)) ** 2).mean() / 2 ** k)
            weights.append(1 / 2 ** k)
        total += sum(terms) / sum(weights)
    return total


def test_hcl_loss_matches_the_hierarchical_context_formula():
    rng = np.random.default_rng(2)
    sizes = (8, 4, 2, 1)
    students = [rng.normal(size=(3, 5, s, s)) for s in sizes]
    teachers = [rng.normal(size=(3, 5, s, s)) for s in sizes]
    value = hcl_loss([torch.tensor(s) for s in students], [torch.tensor(t) for t in teachers])
    assert float(value) == pytest.approx(np_hcl(students, teachers), rel=1e-5)


def small_reviewkd(**options):
    """resnet20 -> resnet8 (levels of 16, 32, 64 channels at 32, 16, 8 and the pooled 64)."""
    torch.manual_seed(0)
    return ReviewKD(build_model("resnet8", 10), build_model("resnet20", 10),
                    in_channels=[16, 32, 64, 64], out_channels=[16, 32, 64, 64], **options)


def test_review_fuses_from_the_deepest_level_to_the_shallowest():
    """The shallowest output sees every deeper level; the deepest sees only itself."""
    distiller = small_reviewkd().eval()
    torch.manual_seed(1)
    with torch.no_grad():
        _, feats = distiller.student(torch.randn(2, 3, 32, 32))
        levels = student_levels(feats, preact=False)
        outputs = distiller.review(levels)
        assert [tuple(o.shape[1:]) for o in outputs] == [(16, 32, 32), (32, 16, 16),
                                                         (64, 8, 8), (64, 1, 1)]
        deeper = distiller.review(levels[:-1] + [levels[-1] + 1.0])
        shallower = distiller.review([levels[0], levels[1] + 1.0] + levels[2:])
    assert all(not torch.allclose(a, b) for a, b in zip(outputs, deeper))
    assert not torch.allclose(outputs[0], shallower[0])
    assert all(torch.equal(a, b) for a, b in zip(outputs[1:], shallower[1:]))


@pytest.mark.parametrize("stu_preact", [False, True])
def test_reviewkd_loss_compares_fused_levels_with_the_teachers_preacts(stu_preact):
    distiller = small_reviewkd(reviewkd_weight=5.0, warmup_epochs=20, stu_preact=stu_preact)
    distiller.eval()        # fixed BN statistics: the forward can be repeated exactly
    distiller.on_epoch_start(4)
    torch.manual_seed(2)
    images, target = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    _, losses = distiller.forward_train(images, target)
    with torch.no_grad():
        _, feats = distiller.student(images)
        _, teacher_feats = distiller.teacher(images)
        maps = feats["preact_feats" if stu_preact else "feats"][1:]
        outputs = distiller.review(list(feats["feats"][:1]) + list(maps)
                                   + [feats["pooled_feat"][:, :, None, None]])
    teacher = [t.double().numpy() for t in teacher_feats["preact_feats"][1:]]
    teacher.append(teacher_feats["pooled_feat"].double().numpy()[:, :, None, None])
    expected = 5.0 * (4 / 20) * np_hcl([o.double().numpy() for o in outputs], teacher)
    assert float(losses["loss_kd"].detach()) == pytest.approx(expected, rel=1e-4)


def test_reviewkd_lists_that_do_not_fit_the_models_name_the_key_and_the_fix():
    student, teacher = build_model("resnet8", 10), build_model("resnet20", 10)
    with pytest.raises(UserError) as error:
        ReviewKD(student, teacher)      # the defaults: resnet32x4 -> resnet8x4's widths
    assert str(error.value) == ("REVIEWKD.IN_CHANNELS [64, 128, 256, 256] does not match the "
                                "student channels [16, 32, 64, 64]; set REVIEWKD.IN_CHANNELS "
                                "[16, 32, 64, 64]")
    with pytest.raises(UserError, match=r"^REVIEWKD.OUT_CHANNELS \[64, 128, 256, 256\] does not "
                                        r"match the teacher channels \[16, 32, 64, 64\]; set "):
        ReviewKD(student, teacher, in_channels=[16, 32, 64, 64])
    with pytest.raises(UserError, match=r"names 6 levels, but the student and teacher have 5 "
                                        r"and 4 .*set REVIEWKD.IN_CHANNELS \[16, 32, 64, 64\]"):
        ReviewKD(student, teacher, in_channels=[8, 16, 16, 32, 64, 64])
    # mdistiller's resnet32x4 config with a ShuffleV1 student: the student's sizes differ.
    cfg = load_cfg(os.path.join(FIXTURES, "cifar100", "reviewkd.yaml"),
                   ["DISTILLER.STUDENT", "ShuffleV1", "REVIEWKD.IN_CHANNELS", "[240, 480, 960, 960]"])
    with pytest.raises(UserError, match=r"^REVIEWKD.SHAPES \[1, 8, 16, 32\] does not match the "
                                        r"student sizes \[1, 4, 8, 16\]; set REVIEWKD.SHAPES "
                                        r"\[1, 4, 8, 16\]$"):
        build_distiller(cfg, build_model("ShuffleV1", 100), build_model("resnet32x4", 100),
                        SimpleNamespace(image_size=32))


# ---------------------------------------------------------------------- OFD
def np_margin(scale, shift):
    """E[x | x < 0] for x ~ N(shift, scale^2), by numerical integration; -3|scale|
    when P(x < 0) <= 0.001."""
    scale = abs(scale)
    x = np.linspace(shift - 12 * scale, 0.0, 200001)
    density = np.exp(-((x - shift) / scale) ** 2 / 2) / (scale * math.sqrt(2 * math.pi))
    mass = np.trapezoid(density, x)
    if mass <= 0.001:
        return -3 * scale
    return np.trapezoid(x * density, x) / mass


def test_ofd_margin_is_the_expected_negative_response():
    weights = torch.tensor([1.0, -2.0, 0.5, 1.0, 1.0, -0.2])
    biases = torch.tensor([0.0, 1.0, -1.0, 2.5, 4.0, 3.0])   # the last two: P(x < 0) < 0.001
    margins = bn_margin(weights, biases)
    expected = [np_margin(w, b) for w, b in zip(weights.tolist(), biases.tolist())]
    assert margins.tolist() == pytest.approx(expected, rel=1e-4)
    assert margins[4] == pytest.approx(-3.0) and margins[5] == pytest.approx(-0.6)


def np_partial_l2(student, teacher, margin):
    """The paper's distance: the teacher transformed by max(t, m); a position
    counts nothing when the student is below a non-positive target, (target -
    student)^2 otherwise; summed over all but the batch, averaged over it."""
    target = np.maximum(teacher, margin.reshape(1, -1, 1, 1))
    loss = np.where((student <= target) & (target <= 0), 0.0, (target - student) ** 2)
    return loss.sum() / len(student)


def test_ofd_feature_loss_is_the_partial_l2_distance():
    rng = np.random.default_rng(3)
    student, teacher = rng.normal(size=(4, 6, 3, 3)), rng.normal(size=(4, 6, 3, 3))
    margin = -np.abs(rng.normal(size=6))
    value = ofd_feature_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(margin))
    assert float(value) == pytest.approx(np_partial_l2(student, teacher, margin), rel=1e-5)


def randomise_bns(model, generator):
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator))


def test_ofd_loss_on_pre_relu_maps_with_halving_stage_weights():
    generator = torch.Generator().manual_seed(4)
    student, teacher = build_model("vgg8", 10), build_model("resnet20", 10)
    randomise_bns(teacher, generator)
    distiller = OFD(student, teacher, feat_weight=0.01, teacher_bn="eval").eval()
    # vgg8 has four stages, resnet20 three: the student's deepest three are used.
    assert [c[0].in_channels for c in distiller.connectors] == [256, 512, 512]
    assert [c[0].out_channels for c in distiller.connectors] == [16, 32, 64]
    bns = [teacher.layer1[-1].bn2, teacher.layer2[-1].bn2, teacher.layer3[-1].bn2]
    for margin, bn in zip(distiller.margins(), bns):
        expected = [np_margin(w, b) for w, b in zip(bn.weight.tolist(), bn.bias.tolist())]
        assert margin.tolist() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    images = torch.randn(2, 3, 32, 32, generator=generator)
    _, losses = distiller.forward_train(images, torch.tensor([0, 1]))
    with torch.no_grad():
        _, feats = student(images)
        _, teacher_feats = teacher(images)
        expected = 0.0
        for index, connect in enumerate(distiller.connectors):
            mapped = connect(feats["preact_feats"][index + 2]).double().numpy()
            target = np_pool(teacher_feats["preact_feats"][index + 1].double().numpy(),
                             mapped.shape[2])       # the teacher's maps are 4x or 2x larger
            margin = distiller.margins()[index].double().numpy()
            expected += np_partial_l2(mapped, target, margin) / 2 ** (2 - index)
    assert float(losses["loss_kd"].detach()) == pytest.approx(0.01 * expected, rel=1e-4)


def test_ofd_margins_of_a_shufflenet_v2_teacher_cover_only_its_branch_channels():
    generator = torch.Generator().manual_seed(5)
    teacher = build_model("ShuffleV2", 10)
    randomise_bns(teacher, generator)
    distiller = OFD(build_model("resnet8", 10), teacher)
    for margin, stage in zip(distiller.margins(), (teacher.layer1, teacher.layer2, teacher.layer3)):
        bn = stage[-1].bn3
        assert (margin[0::2] == 0).all()      # the kept half: already non-negative
        expected = [np_margin(w, b) for w, b in zip(bn.weight.tolist(), bn.bias.tolist())]
        assert margin[1::2].tolist() == pytest.approx(expected, rel=1e-4, abs=1e-6)


# ------------------------------------------------- mdistiller's config files
MDISTILLER_CONFIGS = sorted(glob.glob(os.path.join(FIXTURES, "**", "*.yaml"), recursive=True))


@pytest.mark.parametrize("path", MDISTILLER_CONFIGS, ids=lambda p: os.path.relpath(p, FIXTURES))
def test_mdistillers_config_files_load_unchanged_and_build(path):
    """Copies of files from mdistiller's configs/ (no _BASE_, mdistiller's keys)."""
    cfg = load_cfg(path)
    imagenet = cfg.DATASET.TYPE == "imagenet"
    classes = 1000 if imagenet else 100
    data = SimpleNamespace(num_classes=classes, image_size=224 if imagenet else 32,
                           train_targets=torch.arange(200) % classes)
    student = build_model(cfg.DISTILLER.STUDENT, classes, dataset=cfg.DATASET.TYPE)
    method = DISTILLERS.get(cfg.DISTILLER.TYPE)
    teacher = (build_model(cfg.DISTILLER.TEACHER, classes, dataset=cfg.DATASET.TYPE)
               if method.requires_teacher else None)
    assert isinstance(build_distiller(cfg, student, teacher, data), method)


def test_mdistiller_config_values_arrive():
    dot = load_cfg(os.path.join(FIXTURES, "cifar100", "dot", "res32x4_shuv2.yaml"))
    assert (dot.SOLVER.TRAINER, dot.SOLVER.DOT.DELTA, dot.SOLVER.LR) == ("dot", 0.075, 0.01)
    review = load_cfg(os.path.join(FIXTURES, "imagenet", "r50_mv1", "reviewkd.yaml"))
    assert review.REVIEWKD.OUT_CHANNELS == [256, 512, 1024, 2048, 2048]
    assert (review.REVIEWKD.MAX_MID_CHANNEL, review.REVIEWKD.STU_PREACT) == (256, True)
    dkd = load_cfg(os.path.join(FIXTURES, "cifar100", "dkd", "vgg13_mv2.yaml"))
    assert (dkd.DKD.BETA, dkd.DKD.WARMUP, dkd.DKD.T) == (6.0, 20, 4.0)
