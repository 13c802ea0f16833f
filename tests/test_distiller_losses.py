"""FitNet, AT, RKD, CRD and ADVKD: losses against the formulas, and each method's own rules.

Expected values are computed here independently of the implementation, in
float64 numpy with explicit loops where it reads better, from the formulas
in the papers / mdistiller. The models are tiny fakes that return fixed
logits and features (times a scalar parameter, so gradients have somewhere
to go); the real CIFAR models are used where shapes matter.
"""
import copy
import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from mdistill.config import load_cfg
from mdistill.data import ContrastiveSampler
from mdistill.distillers import DISTILLERS, build_distiller
from mdistill.engine.update_rules import commit_step
from mdistill.errors import UserError

# ----------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: threads only add overhead (and contend on shared CPUs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class FakeNet(nn.Module):
    """Returns fixed logits and features (the first ``len(x)`` rows), scaled by a
    parameter that is 1, so the outputs carry a gradient. A BatchNorm sees the input,
    so its running statistics show whether the model ran in train mode."""

    def __init__(self, logits, feats, pooled):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.bn = nn.BatchNorm2d(3)
        self.register_buffer("logits", torch.as_tensor(logits, dtype=torch.float32))
        self.register_buffer("pooled", torch.as_tensor(pooled, dtype=torch.float32))
        self.feats = nn.ParameterList([nn.Parameter(torch.as_tensor(f, dtype=torch.float32),
                                                    requires_grad=False) for f in feats])

    def forward(self, x):
        n = len(x)
        touch = 0 * self.bn(x).mean()        # moves running stats in train mode only
        feats = [f[:n] * self.scale for f in self.feats]
        return self.logits[:n] * self.scale + touch, {
            "feats": feats, "preact_feats": feats, "pooled_feat": self.pooled[:n] * self.scale}


def fake(logits, feats=(), pooled=None):
    logits = np.asarray(logits, dtype=np.float64)
    if pooled is None:
        pooled = np.zeros((len(logits), 2))
    return FakeNet(logits, [np.asarray(f) for f in feats], pooled)


def image(batch):
    return torch.zeros(batch, 3, 4, 4)


def np_softmax(row):
    e = np.exp(row - row.max())
    return e / e.sum()


def np_cross_entropy(logits, target):
    return float(np.mean([-math.log(np_softmax(row)[t]) for row, t in zip(logits, target)]))


def np_kd(student, teacher, temperature):
    total = 0.0
    for s_row, t_row in zip(student, teacher):
        p_s, p_t = np_softmax(s_row / temperature), np_softmax(t_row / temperature)
        total += float(np.sum(p_t * (np.log(p_t) - np.log(p_s))))
    return total / len(student) * temperature ** 2


def smooth_l1(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def assert_gradients(distiller, losses, trained_modules):
    """Backward the summed loss: the student and every named module get a gradient,
    the teacher none."""
    sum(losses.values()).backward()
    assert distiller.student.scale.grad is not None
    for name in trained_modules:
        params = [p for p in getattr(distiller, name).parameters() if p.requires_grad]
        assert params and all(p.grad is not None for p in params), name
        assert any(p.grad.abs().sum() > 0 for p in params), name
    assert all(p.grad is None for p in distiller.teacher.parameters())


RNG = np.random.default_rng(0)
TARGET = torch.tensor([0, 2, 1, 2])
S_LOGITS = RNG.normal(size=(4, 3))
T_LOGITS = RNG.normal(size=(4, 3)) * 2


# ------------------------------------------------------------------ FitNet

def np_conv1x1_bn_relu(x, weight, bias, gamma, beta, eps=1e-5):
    """1x1 conv, then train-mode BatchNorm (batch statistics, biased variance), ReLU."""
    y = np.einsum("oc,nchw->nohw", weight[:, :, 0, 0], x) + bias[None, :, None, None]
    mean = y.mean(axis=(0, 2, 3), keepdims=True)
    var = y.var(axis=(0, 2, 3), keepdims=True)
    y = (y - mean) / np.sqrt(var + eps) * gamma[None, :, None, None] + beta[None, :, None, None]
    return np.maximum(y, 0)


def test_fitnet_losses_match_the_formula():
    s_hint = RNG.normal(size=(4, 3, 2, 2))
    t_hint = RNG.normal(size=(4, 5, 2, 2))
    student = fake(S_LOGITS, [np.zeros((4, 1, 2, 2)), np.zeros((4, 1, 2, 2)), s_hint])
    teacher = fake(T_LOGITS, [np.zeros((4, 1, 2, 2)), np.zeros((4, 1, 2, 2)), t_hint])
    distiller = DISTILLERS.get("FITNET")(student, teacher, hint_layer=2, ce_weight=0.7,
                                         feat_weight=3.0, image_shape=(3, 4, 4))
    conv = distiller.regressor.conv
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1)
    with torch.no_grad():                           # a nonzero BN shift, to be seen
        distiller.regressor.bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0, 0.5]))
    distiller.train()
    _, losses = distiller(image(4), TARGET)
    assert set(losses) == {"loss_ce", "loss_feat"}
    bn = distiller.regressor.bn
    hint = np_conv1x1_bn_relu(s_hint, conv.weight.detach().double().numpy(),
                              conv.bias.detach().double().numpy(),
                              bn.weight.detach().double().numpy(),
                              bn.bias.detach().double().numpy())
    assert losses["loss_feat"].item() == pytest.approx(3.0 * np.mean((hint - t_hint) ** 2),
                                                       rel=1e-5)
    assert losses["loss_ce"].item() == pytest.approx(0.7 * np_cross_entropy(S_LOGITS, TARGET),
                                                     rel=1e-6)
    assert_gradients(distiller, losses, ["regressor"])


@pytest.mark.parametrize("student_shape, teacher_shape, kind, kernel, stride", [
    ((8, 16, 16), (4, 8, 8), nn.Conv2d, (3, 3), (2, 2)),          # student twice as large
    ((8, 4, 4), (4, 8, 8), nn.ConvTranspose2d, (4, 4), (2, 2)),   # half as large
    ((8, 8, 8), (4, 8, 8), nn.Conv2d, (1, 1), (1, 1)),            # same size
    ((8, 7, 6), (4, 4, 4), nn.Conv2d, (4, 3), (1, 1)),            # larger, not twice
])
def test_fitnet_regressor_is_picked_from_the_probed_shapes(student_shape, teacher_shape, kind,
                                                           kernel, stride):
    student = fake(S_LOGITS[:2], [np.ones((2,) + student_shape)])
    teacher = fake(T_LOGITS[:2], [np.ones((2,) + teacher_shape)])
    distiller = DISTILLERS.get("FITNET")(student, teacher, hint_layer=0)
    conv = distiller.regressor.conv
    assert type(conv) is kind and conv.kernel_size == kernel and conv.stride == stride
    assert (conv.in_channels, conv.out_channels) == (student_shape[0], teacher_shape[0])
    distiller.eval()
    out = distiller.regressor(torch.ones((2,) + student_shape))
    assert out.shape[1:] == teacher_shape


def test_fitnet_rejects_unmappable_shapes_and_bad_hint_layers():
    student = fake(S_LOGITS[:2], [np.ones((2, 8, 3, 3))])
    teacher = fake(T_LOGITS[:2], [np.ones((2, 4, 8, 8))])
    with pytest.raises(UserError, match="HINT_LAYER"):
        DISTILLERS.get("FITNET")(student, teacher, hint_layer=0)
    with pytest.raises(UserError, match="out of range"):
        DISTILLERS.get("FITNET")(student, teacher, hint_layer=1)


STANDARD_PAIRS = [("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"), ("vgg13", "vgg8"),
                  ("resnet56", "resnet20"), ("resnet110", "resnet32"),
                  ("resnet32x4", "ShuffleV2"), ("vgg13", "MobileNetV2")]


@pytest.mark.parametrize("pair", STANDARD_PAIRS, ids=lambda pair: "->".join(pair))
def test_fitnet_builds_for_every_standard_pair(pair):
    from mdistill.models import build_model
    teacher, student = (build_model(name, 100) for name in pair)   # a missing model fails
    teacher.train()
    before = copy.deepcopy(teacher.state_dict())
    distiller = DISTILLERS.get("FITNET")(student, teacher)
    after = teacher.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)  # BN stats included
    # One training step's forward; hooks catch the regressed hint and the teacher's map.
    seen = {}
    distiller.regressor.register_forward_hook(lambda m, i, out: seen.update(hint=out.shape))
    teacher.register_forward_hook(lambda m, i, out: seen.update(teacher=out[1]["feats"][2].shape))
    distiller.train()
    _, losses = distiller(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))
    assert seen["hint"] == seen["teacher"]
    assert all(torch.isfinite(value) for value in losses.values())


@pytest.mark.parametrize("method", ["FITNET", "CRD", "ADVKD"])
def test_probing_feature_shapes_does_not_move_the_teacher(method):
    # ADVKD probes only for its "feature" input.
    logits = np.ones((4, 3))
    teacher = fake(logits, [np.ones((4, 2, 4, 4))], np.ones((4, 5)))
    student = fake(logits, [np.ones((4, 2, 4, 4))], np.ones((4, 6)))
    teacher.train()
    before = copy.deepcopy(teacher.state_dict())
    cfg = load_cfg(None, ["DISTILLER.TYPE", method, "FITNET.HINT_LAYER", "0",
                          "ADVKD.INPUT", "feature", "CRD.NCE.K", "4"])
    data = SimpleNamespace(num_classes=3, image_size=4, train_targets=torch.arange(12) % 3)
    distiller = build_distiller(cfg, student, teacher, data)
    after = teacher.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert int(after["bn.num_batches_tracked"]) == 0
    assert not teacher.training                         # the distiller keeps it in eval
    assert all(not p.requires_grad for p in distiller.teacher.parameters())


# ---------------------------------------------------------------------- AT

def np_attention(feature, p):
    """[C, H, W] -> the flattened, L2-normalised mean over channels of f^p."""
    channels, height, width = feature.shape
    values = [sum(feature[c, i, j] ** p for c in range(channels)) / channels
              for i in range(height) for j in range(width)]
    norm = math.sqrt(sum(v * v for v in values))
    return [v / norm for v in values]


def np_avg_pool(feature, size):
    """Average-pool [C, H, W] to [C, size, size] (H divisible by size)."""
    channels, height, _ = feature.shape
    k = height // size
    return feature.reshape(channels, size, k, size, k).mean(axis=(2, 4))


def test_at_losses_match_the_formula():
    # Stems (ignored), then stages paired from the deepest: the student's stage 2 (2x2)
    # with the teacher's stage 3 (1x1, the student's pooled), its stage 1 (4x4) with the
    # teacher's stage 2 (2x2); the teacher's first stage has no partner and is left out.
    student_feats = [RNG.normal(size=(2, 3, 4, 4)), RNG.normal(size=(2, 2, 4, 4)),
                     RNG.normal(size=(2, 3, 2, 2))]
    teacher_feats = [RNG.normal(size=(2, 5, 4, 4)), RNG.normal(size=(2, 4, 2, 2)),
                     RNG.normal(size=(2, 2, 2, 2)), RNG.normal(size=(2, 2, 1, 1))]
    student = fake(S_LOGITS[:2], student_feats)
    teacher = fake(T_LOGITS[:2], teacher_feats)
    distiller = DISTILLERS.get("AT")(student, teacher, p=2, ce_weight=0.5, feat_weight=10.0)
    distiller.train()
    _, losses = distiller(image(2), TARGET[:2])
    assert set(losses) == {"loss_ce", "loss_feat"}

    expected = 0.0
    for student_stage, teacher_stage in ((1, 2), (2, 3)):
        terms = []
        for n in range(2):
            s, t = student_feats[student_stage][n], teacher_feats[teacher_stage][n]
            if s.shape[1] > t.shape[1]:
                s = np_avg_pool(s, t.shape[1])
            elif t.shape[1] > s.shape[1]:
                t = np_avg_pool(t, s.shape[1])
            terms += [(a - b) ** 2 for a, b in zip(np_attention(s, 2), np_attention(t, 2))]
        expected += sum(terms) / len(terms)
    assert losses["loss_feat"].item() == pytest.approx(10.0 * expected, rel=1e-5)
    assert losses["loss_ce"].item() == pytest.approx(
        0.5 * np_cross_entropy(S_LOGITS[:2], TARGET[:2]), rel=1e-6)
    assert_gradients(distiller, losses, [])


def test_at_pools_the_teacher_when_its_map_is_larger():
    student_feats = [np.zeros((1, 1, 2, 2)), RNG.normal(size=(1, 2, 2, 2))]
    teacher_feats = [np.zeros((1, 1, 2, 2)), RNG.normal(size=(1, 3, 4, 4))]
    distiller = DISTILLERS.get("AT")(fake(S_LOGITS[:1], student_feats),
                                     fake(T_LOGITS[:1], teacher_feats), p=2, feat_weight=1.0)
    distiller.train()
    _, losses = distiller(image(1), TARGET[:1])
    s = np_attention(student_feats[1][0], 2)
    t = np_attention(np_avg_pool(teacher_feats[1][0], 2), 2)
    expected = sum((a - b) ** 2 for a, b in zip(s, t)) / 4
    assert losses["loss_feat"].item() == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------- RKD

def np_rkd_distance(student, teacher, squared):
    def normalised(points):
        n = len(points)
        d = np.array([[np.sum((points[i] - points[j]) ** 2) for j in range(n)]
                      for i in range(n)])
        if not squared:
            d = np.sqrt(d)
        return d / d[d > 0].mean()

    s, t = normalised(student), normalised(teacher)
    n = len(student)
    return sum(smooth_l1(s[i, j], t[i, j]) for i in range(n) for j in range(n)) / n ** 2


def np_rkd_angle(student, teacher):
    def cosines(points):
        out = []
        n = len(points)
        for i, j, k in itertools.product(range(n), repeat=3):
            e_ij, e_kj = points[i] - points[j], points[k] - points[j]
            n_ij, n_kj = np.linalg.norm(e_ij), np.linalg.norm(e_kj)
            out.append(0.0 if n_ij == 0 or n_kj == 0 else e_ij @ e_kj / (n_ij * n_kj))
        return out

    s, t = cosines(student), cosines(teacher)
    return sum(smooth_l1(a, b) for a, b in zip(s, t)) / len(s)


@pytest.mark.parametrize("squared", [False, True])
def test_rkd_losses_match_the_formula(squared):
    s_pooled = RNG.normal(size=(4, 3))
    t_pooled = RNG.normal(size=(4, 5)) * 3
    distiller = DISTILLERS.get("RKD")(fake(S_LOGITS, pooled=s_pooled),
                                      fake(T_LOGITS, pooled=t_pooled), distance_weight=25.0,
                                      angle_weight=50.0, ce_weight=0.3, feat_weight=2.0,
                                      squared=squared)
    distiller.train()
    _, losses = distiller(image(4), TARGET)
    assert set(losses) == {"loss_ce", "loss_feat"}
    expected = 2.0 * (25.0 * np_rkd_distance(s_pooled, t_pooled, squared)
                      + 50.0 * np_rkd_angle(s_pooled, t_pooled))
    assert losses["loss_feat"].item() == pytest.approx(expected, rel=1e-5)
    assert losses["loss_ce"].item() == pytest.approx(0.3 * np_cross_entropy(S_LOGITS, TARGET),
                                                     rel=1e-6)
    assert_gradients(distiller, losses, [])


def test_rkd_uses_both_weights_separately():
    s_pooled, t_pooled = RNG.normal(size=(3, 2)), RNG.normal(size=(3, 2))
    values = {}
    for distance_weight, angle_weight in [(1.0, 0.0), (0.0, 1.0)]:
        distiller = DISTILLERS.get("RKD")(fake(S_LOGITS[:3], pooled=s_pooled),
                                          fake(T_LOGITS[:3], pooled=t_pooled),
                                          distance_weight=distance_weight,
                                          angle_weight=angle_weight).train()
        values[(distance_weight, angle_weight)] = distiller(image(3), TARGET[:3])[1]["loss_feat"]
    assert values[(1.0, 0.0)].item() == pytest.approx(np_rkd_distance(s_pooled, t_pooled, False),
                                                      rel=1e-5)
    assert values[(0.0, 1.0)].item() == pytest.approx(np_rkd_angle(s_pooled, t_pooled), rel=1e-5)


# --------------------------------------------------------------------- CRD

NUM_DATA, DIM, TEMPERATURE, MOMENTUM = 8, 4, 0.5, 0.5


def np_normalise(rows):
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def np_nce(probabilities, num_data):
    """CRD's NCE loss over [B, K+1] (column 0 positive), Pn = 1/num_data, eps 1e-7."""
    m = probabilities.shape[1] - 1
    noise = m / num_data
    total = 0.0
    for row in probabilities:
        total -= math.log(row[0] / (row[0] + noise + 1e-7))
        total -= sum(math.log(noise / (p + noise + 1e-7)) for p in row[1:])
    return total / len(probabilities)


def make_crd(s_pooled, t_pooled, contrastive=None, **options):
    sampler = contrastive or (lambda index, target: None)
    return DISTILLERS.get("CRD")(fake(S_LOGITS[:len(s_pooled)], pooled=s_pooled),
                                 fake(T_LOGITS[:len(t_pooled)], pooled=t_pooled),
                                 num_data=NUM_DATA, sampler=sampler, feat_dim=DIM,
                                 temperature=TEMPERATURE, momentum=MOMENTUM,
                                 image_shape=(3, 4, 4), **options)


def np_embed(module, pooled):
    weight = module.linear.weight.detach().double().numpy()
    bias = module.linear.bias.detach().double().numpy()
    return np_normalise(pooled @ weight.T + bias)


CRD_INDEX = torch.tensor([5, 1, 6])
CRD_CONTRAST = torch.tensor([[5, 0, 2, 7], [1, 3, 3, 4], [6, 0, 2, 1]])


def test_crd_loss_and_memory_update_match_the_formula():
    s_pooled, t_pooled = RNG.normal(size=(3, 6)), RNG.normal(size=(3, 5))
    distiller = make_crd(s_pooled, t_pooled, ce_weight=0.4, feat_weight=0.8).train()
    memory_s = distiller.memory_student.double().numpy().copy()
    memory_t = distiller.memory_teacher.double().numpy().copy()
    v_s = np_embed(distiller.embed_student, s_pooled)
    v_t = np_embed(distiller.embed_teacher, t_pooled)
    _, losses = distiller(image(3), TARGET[:3], index=CRD_INDEX,
                          contrastive_index=CRD_CONTRAST)
    assert set(losses) == {"loss_ce", "loss_feat"}
    # The forward computes only: banks and Z move when the trainer commits the step.
    assert torch.equal(distiller.memory_student, torch.tensor(memory_s, dtype=torch.float32))
    assert distiller.z_student.item() < 0
    loss_feat = losses["loss_feat"].item()
    commit_step(distiller)

    idx = CRD_CONTRAST.numpy()
    # Student embedding against the teacher's memory, and the other way round.
    scores_s = np.exp(np.einsum("bkd,bd->bk", memory_t[idx], v_s) / TEMPERATURE)
    scores_t = np.exp(np.einsum("bkd,bd->bk", memory_s[idx], v_t) / TEMPERATURE)
    z_s, z_t = scores_s.mean() * NUM_DATA, scores_t.mean() * NUM_DATA
    expected = np_nce(scores_s / z_s, NUM_DATA) + np_nce(scores_t / z_t, NUM_DATA)
    assert distiller.z_student.item() == pytest.approx(z_s, rel=1e-5)
    assert distiller.z_teacher.item() == pytest.approx(z_t, rel=1e-5)
    assert loss_feat == pytest.approx(0.8 * expected, rel=1e-5)
    assert losses["loss_ce"].item() == pytest.approx(
        0.4 * np_cross_entropy(S_LOGITS[:3], TARGET[:3]), rel=1e-6)

    # Rows of the batch's samples: momentum towards the new embedding, re-normalised.
    for memory_before, memory_after, v in ((memory_s, distiller.memory_student, v_s),
                                           (memory_t, distiller.memory_teacher, v_t)):
        after = memory_after.double().numpy()
        for row, sample in enumerate(CRD_INDEX.tolist()):
            new = np_normalise(MOMENTUM * memory_before[sample] + (1 - MOMENTUM) * v[row])
            np.testing.assert_allclose(after[sample], new, rtol=1e-5, atol=1e-6)
        others = sorted(set(range(NUM_DATA)) - set(CRD_INDEX.tolist()))
        np.testing.assert_array_equal(after[others], memory_before[others].astype(np.float32))
    assert_gradients(distiller, losses, ["embed_student", "embed_teacher"])


def test_crd_memory_is_initialised_uniformly_as_crd():
    distiller = DISTILLERS.get("CRD")(fake(S_LOGITS, pooled=np.ones((4, 2))),
                                      fake(T_LOGITS, pooled=np.ones((4, 3))), num_data=2000,
                                      sampler=None, feat_dim=48, image_shape=(3, 4, 4))
    bound = 1 / math.sqrt(48 / 3)
    for memory in (distiller.memory_student, distiller.memory_teacher):
        assert memory.shape == (2000, 48)
        assert memory.abs().max() <= bound
        assert memory.min() < -0.95 * bound and memory.max() > 0.95 * bound
        assert memory.mean().abs() < 0.01
    assert not torch.equal(distiller.memory_student, distiller.memory_teacher)
    assert distiller.embed_student.linear.in_features == 2     # probed widths
    assert distiller.embed_teacher.linear.in_features == 3
    assert {"memory_student", "memory_teacher"} <= set(distiller.state_dict())


def test_crd_fixes_z_after_the_first_batch():
    s_pooled, t_pooled = RNG.normal(size=(3, 6)), RNG.normal(size=(3, 5))
    distiller = make_crd(s_pooled, t_pooled).train()
    assert distiller.z_student.item() < 0 and distiller.z_teacher.item() < 0
    distiller(image(3), TARGET[:3], index=CRD_INDEX, contrastive_index=CRD_CONTRAST)
    assert distiller.z_student.item() < 0          # a skipped step would not fix Z
    commit_step(distiller)
    z = (distiller.z_student.item(), distiller.z_teacher.item())
    assert z[0] > 0 and z[1] > 0
    other = torch.tensor([[2, 5, 6, 1], [3, 0, 5, 6], [4, 1, 1, 0]])
    distiller(image(3), TARGET[:3], index=torch.tensor([2, 3, 4]), contrastive_index=other)
    commit_step(distiller)
    assert (distiller.z_student.item(), distiller.z_teacher.item()) == z
    # Z is state: a checkpointed run resumes with it.
    assert {"z_student", "z_teacher"} <= set(distiller.state_dict())


def test_crd_scores_column_zero_as_the_positive():
    # One sample (index 3) whose embeddings equal memory row 3 of the other side, with
    # rows 0-2 pointing the opposite way: the loss is low when row 3 is in column 0 and
    # high when it is a "negative" and row 0 the positive.
    s_pooled, t_pooled = RNG.normal(size=(1, 6)), RNG.normal(size=(1, 5))
    distiller = make_crd(s_pooled, t_pooled).train()
    v_s = np_embed(distiller.embed_student, s_pooled)[0]
    v_t = np_embed(distiller.embed_teacher, t_pooled)[0]
    distiller.memory_teacher[3] = torch.tensor(v_s)
    distiller.memory_teacher[[0, 1, 2]] = -torch.tensor(v_s, dtype=torch.float32)
    distiller.memory_student[3] = torch.tensor(v_t)
    distiller.memory_student[[0, 1, 2]] = -torch.tensor(v_t, dtype=torch.float32)
    distiller.z_student.fill_(1.0)
    distiller.z_teacher.fill_(1.0)
    state = copy.deepcopy(distiller.state_dict())
    memory_s = state["memory_student"].double().numpy()
    memory_t = state["memory_teacher"].double().numpy()

    values = []
    for contrast in ([3, 0, 1, 2], [0, 1, 2, 3]):
        distiller.load_state_dict(state)
        _, losses = distiller(image(1), TARGET[:1], index=torch.tensor([3]),
                              contrastive_index=torch.tensor([contrast]))
        scores_s = np.exp(memory_t[contrast] @ v_s / TEMPERATURE)      # Z = 1
        scores_t = np.exp(memory_s[contrast] @ v_t / TEMPERATURE)
        expected = np_nce(scores_s[None], NUM_DATA) + np_nce(scores_t[None], NUM_DATA)
        assert losses["loss_feat"].item() == pytest.approx(0.8 * expected, rel=1e-5)
        values.append(losses["loss_feat"].item())
    assert values[0] < values[1] / 3


def test_crd_from_config_with_more_negatives_than_other_samples():
    # 10 samples of 2 classes: 5 of another class, K = 50 (drawn with replacement).
    targets = torch.tensor([0, 1] * 5)
    cfg = load_cfg(None, ["DISTILLER.TYPE", "CRD", "CRD.NCE.K", "50", "CRD.FEAT.DIM", "8",
                          "CRD.FEAT.STUDENT_DIM", "999"])
    data = SimpleNamespace(num_classes=2, image_size=4, train_targets=targets)
    logits = RNG.normal(size=(4, 2))
    distiller = build_distiller(cfg, fake(logits, pooled=RNG.normal(size=(4, 6))),
                                fake(logits, pooled=RNG.normal(size=(4, 3))), data)
    assert distiller.memory_student.shape == (10, 8)
    assert distiller.embed_student.linear.in_features == 6       # STUDENT_DIM ignored
    fields = distiller.extra_batch_fields()
    assert set(fields) == {"contrastive_index"}
    assert isinstance(fields["contrastive_index"], ContrastiveSampler)
    index = torch.tensor([0, 3, 4, 9])
    contrast = fields["contrastive_index"](index, targets[index])
    assert contrast.shape == (4, 51)
    assert torch.equal(contrast[:, 0], index)
    assert bool((targets[contrast[:, 1:]] != targets[index].unsqueeze(1)).all())
    distiller.train()
    _, losses = distiller(image(4), targets[index], index=index, contrastive_index=contrast)
    assert all(torch.isfinite(value) for value in losses.values())
    ignored = set(distiller.ddp_ignored_names())
    assert {"memory_student", "memory_teacher", "z_student", "z_teacher"} <= ignored
    # The teacher is no submodule: DDP never sees it.
    assert not any(p is q for p in distiller.parameters() for q in distiller.teacher.parameters())
    assert not any(name.startswith(("student.", "embed_")) for name in ignored)


# ------------------------------------------------------------------- ADVKD

NUM_CLASSES = 3


def np_discriminator(module, x):
    """D's forward written out: linear layers with LeakyReLU(0.2) between them."""
    linears = [layer for layer in module.net if isinstance(layer, nn.Linear)]
    for position, linear in enumerate(linears):
        x = x @ linear.weight.detach().double().numpy().T + linear.bias.detach().double().numpy()
        if position < len(linears) - 1:
            x = np.where(x > 0, x, 0.2 * x)
    return x[:, 0]


def np_bce(score, label):
    p = 1 / (1 + math.exp(-score))
    return -(label * math.log(p) + (1 - label) * math.log(1 - p))


def np_d_loss(real, fake, kind, label):
    if kind == "bce":
        return np.mean([np_bce(x, label) for x in real]) + np.mean([np_bce(x, 0) for x in fake])
    if kind == "lsgan":
        return np.mean((real - label) ** 2) + np.mean(fake ** 2)
    return np.mean(np.maximum(0, 1 - real)) + np.mean(np.maximum(0, 1 + fake))


def np_g_loss(fake, kind, label):
    if kind == "bce":
        return np.mean([np_bce(x, label) for x in fake])
    if kind == "lsgan":
        return np.mean((fake - label) ** 2)
    return -np.mean(fake)


def make_advkd(student_logits=S_LOGITS, teacher_logits=T_LOGITS, **options):
    torch.manual_seed(0)
    return DISTILLERS.get("ADVKD")(fake(student_logits, pooled=RNG.normal(size=(4, 6))),
                                   fake(teacher_logits, pooled=RNG.normal(size=(4, 5))),
                                   NUM_CLASSES, image_shape=(3, 4, 4), **options)


@pytest.mark.parametrize("kind", ["bce", "lsgan", "hinge"])
@pytest.mark.parametrize("input_kind", ["logits", "probs"])
def test_advkd_losses_and_diagnostics_match_the_formulas(kind, input_kind):
    label = 0.9 if kind != "hinge" else 1.0
    distiller = make_advkd(gan_loss=kind, input_kind=input_kind, real_label=label,
                           adv_weight=0.6, warmup_epochs=0, temperature=2.0, ce_weight=0.2,
                           kd_weight=0.7, d_lr=1e-2, hidden=(5, 4))
    distiller.train().on_epoch_start(3)
    prepare = (lambda rows: np.stack([np_softmax(r) for r in rows])) if input_kind == "probs" \
        else (lambda rows: rows)
    real_in, fake_in = prepare(T_LOGITS), prepare(S_LOGITS)
    d_real, d_fake = (np_discriminator(distiller.discriminator, x) for x in (real_in, fake_in))
    before = copy.deepcopy(distiller.discriminator.state_dict())

    _, losses = distiller(image(4), TARGET)
    assert set(losses) == {"loss_ce", "loss_kd", "loss_adv"}
    # The forward computes with D as it is; D takes its step in the trainer's phase.
    after_forward = distiller.discriminator.state_dict()
    assert all(torch.equal(before[key], after_forward[key]) for key in before)
    assert losses["loss_adv"].item() == pytest.approx(0.6 * np_g_loss(d_fake, kind, label),
                                                      rel=1e-5)
    commit_step(distiller)
    diagnostics = distiller.pop_diagnostics()
    threshold = label / 2 if kind == "lsgan" else 0.0
    assert diagnostics["d_loss"] == pytest.approx(np_d_loss(d_real, d_fake, kind, label),
                                                  rel=1e-5)
    assert diagnostics["d_acc_teacher"] == pytest.approx(np.mean(d_real > threshold))
    assert diagnostics["d_acc_student"] == pytest.approx(np.mean(d_fake <= threshold))
    assert diagnostics["adv_weight"] == pytest.approx(0.6)
    after = distiller.discriminator.state_dict()
    assert not all(torch.equal(before[key], after[key]) for key in before)
    assert losses["loss_ce"].item() == pytest.approx(0.2 * np_cross_entropy(S_LOGITS, TARGET),
                                                     rel=1e-6)
    assert losses["loss_kd"].item() == pytest.approx(0.7 * np_kd(S_LOGITS, T_LOGITS, 2.0),
                                                     rel=1e-5)


def test_advkd_with_zero_adversarial_weight_equals_kd():
    options = dict(temperature=4.0, ce_weight=0.1, kd_weight=0.9)
    advkd = make_advkd(adv_weight=0.0, d_lr=1e-2, **options).train()
    kd = DISTILLERS.get("KD")(fake(S_LOGITS), fake(T_LOGITS), **options).train()
    advkd.on_epoch_start(50)
    for _ in range(3):                        # D steps in between change nothing for the student
        _, adv_losses = advkd(image(4), TARGET)
        commit_step(advkd)
        _, kd_losses = kd(image(4), TARGET)
        assert torch.equal(adv_losses["loss_ce"], kd_losses["loss_ce"])
        assert torch.equal(adv_losses["loss_kd"], kd_losses["loss_kd"])
        assert adv_losses.get("loss_adv", torch.zeros(())).item() == 0.0


def test_advkd_discriminator_learns_with_the_student_frozen():
    distiller = make_advkd(d_lr=1e-3).train()
    distiller.student.requires_grad_(False)
    losses = []
    for _ in range(30):
        distiller(image(4), TARGET)
        commit_step(distiller)
        losses.append(distiller.pop_diagnostics()["d_loss"])
    assert losses[-1] < 0.8 * losses[0]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


class LearnedLogits(FakeNet):
    """A toy student whose logits are its parameters."""

    def __init__(self, logits):
        super().__init__(logits, [], np.zeros((len(logits), 2)))
        self.free = nn.Parameter(torch.as_tensor(logits, dtype=torch.float32))

    def forward(self, x):
        logits, feats = super().forward(x)
        return logits - self.logits[:len(x)] + self.free[:len(x)], feats


def test_advkd_student_learns_to_fool_a_frozen_discriminator():
    torch.manual_seed(0)
    distiller = DISTILLERS.get("ADVKD")(LearnedLogits(S_LOGITS), fake(T_LOGITS), NUM_CLASSES,
                                        adv_weight=1.0, warmup_epochs=0, d_steps=0)
    distiller.train().on_epoch_start(1)
    frozen = copy.deepcopy(distiller.discriminator.state_dict())
    optimizer = torch.optim.Adam([distiller.student.free], lr=0.5)
    adversarial = []
    for _ in range(30):
        _, losses = distiller(image(4), TARGET)
        optimizer.zero_grad()
        losses["loss_adv"].backward()
        optimizer.step()
        adversarial.append(losses["loss_adv"].item())
    assert adversarial[-1] < 0.8 * adversarial[0]
    after = distiller.discriminator.state_dict()
    assert all(torch.equal(frozen[key], after[key]) for key in frozen)
    assert all(p.grad is None for p in distiller.discriminator.parameters())


def test_advkd_warmup_of_the_adversarial_weight():
    distiller = make_advkd(adv_weight=0.5, warmup_epochs=20).train()
    observed = []
    for epoch in (1, 10, 20, 30):
        distiller.on_epoch_start(epoch)
        distiller(image(4), TARGET)
        observed.append(distiller.pop_diagnostics()["adv_weight"])
    assert observed == pytest.approx([0.025, 0.25, 0.5, 0.5])
    assert make_advkd(adv_weight=0.5, warmup_epochs=0).adversarial_weight(1) == 0.5


def test_advkd_loss_adv_is_lambda_times_the_generator_loss():
    distiller = make_advkd(adv_weight=2.0, warmup_epochs=4, d_steps=0).train()
    distiller.on_epoch_start(1)
    _, losses = distiller(image(4), TARGET)
    g = np_g_loss(np_discriminator(distiller.discriminator, S_LOGITS), "bce", 1.0)
    assert losses["loss_adv"].item() == pytest.approx(0.5 * g, rel=1e-5)


@pytest.mark.parametrize("input_kind", ["logits", "probs", "feature"])
def test_advkd_gradients_reach_the_student_and_its_modules_never_the_teacher(input_kind):
    distiller = make_advkd(input_kind=input_kind, warmup_epochs=0).train()
    _, losses = distiller(image(4), TARGET)
    # The student-side adapter ("feature") trains with the student; D with its own
    # optimizer, in its phase only (frozen for the student's loss).
    trained = ["student_adapter"] if input_kind == "feature" else []
    assert_gradients(distiller, losses, trained)
    assert all(p.grad is None for p in distiller.discriminator.parameters())
    commit_step(distiller)
    assert all(p.grad is not None for p in distiller.discriminator.parameters())
    names = {name for name, _ in distiller.trainable_named_modules()}
    assert "discriminator" not in names and "teacher" not in names
    learnable = {id(p) for p in distiller.get_learnable_parameters()}
    assert not learnable & {id(p) for p in distiller.discriminator.parameters()}
    if input_kind == "feature":
        assert learnable >= {id(p) for p in distiller.student_adapter.parameters()}
        # The teacher-side projection is fixed (a buffer): the "real" samples stay put.
        assert list(distiller.teacher_adapter.parameters()) == []
        assert "teacher_adapter.weight" in distiller.state_dict()


def test_advkd_declarations():
    distiller = make_advkd(spectral_norm=True)
    assert distiller.auxiliary_module_names() == ["discriminator"]
    optimizer = distiller.auxiliary_optimizers()["discriminator"]
    assert isinstance(optimizer, torch.optim.Adam)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-4, (0.5, 0.999), 0.0)
    assert {id(p) for p in group["params"]} == {id(p) for p in distiller.discriminator.parameters()}
    ignored = set(distiller.ddp_ignored_names())
    assert {f"discriminator.{name}" for name, _ in distiller.discriminator.named_parameters()} \
        <= ignored
    assert not any(name.startswith("student.") for name in ignored)
    widths = [(m.in_features, m.out_features) for m in distiller.discriminator.modules()
              if isinstance(m, nn.Linear)]
    assert widths == [(NUM_CLASSES, 256), (256, 128), (128, 1)]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                   for m in distiller.discriminator.modules())


def test_advkd_forward_leaves_d_alone_and_runs_in_fp32():
    distiller = make_advkd(spectral_norm=True).train()
    before = copy.deepcopy(distiller.discriminator.state_dict())
    distiller.forward_train(image(4), TARGET)
    after = distiller.discriminator.state_dict()       # spectral norm's vectors included
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert distiller.discriminator.training
    assert distiller.eval()(image(4)).shape == (4, NUM_CLASSES)   # eval: student logits only
    distiller.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, losses = distiller(image(4), TARGET)
    assert losses["loss_adv"].dtype == torch.float32
    commit_step(distiller)
    assert all(p.dtype == torch.float32 for p in distiller.discriminator.parameters())
    assert np.isfinite(distiller.pop_diagnostics()["d_loss"])


def test_from_config_maps_the_declared_keys():
    logits = np.ones((4, 3))
    data = SimpleNamespace(num_classes=3, image_size=4, train_targets=torch.arange(12) % 3)

    def build(method, *opts):
        cfg = load_cfg(None, ["DISTILLER.TYPE", method, *opts])
        student = fake(logits, [np.ones((4, 2, 4, 4))] * 3, np.ones((4, 5)))
        teacher = fake(logits, [np.ones((4, 2, 4, 4))] * 3, np.ones((4, 5)))
        return build_distiller(cfg, student, teacher, data)

    fitnet = build("FITNET", "FITNET.LOSS.FEAT_WEIGHT", "7", "FITNET.HINT_LAYER", "1")
    assert (fitnet.hint_layer, fitnet.ce_weight, fitnet.feat_weight) == (1, 1.0, 7.0)
    at = build("AT", "AT.P", "3")
    assert (at.p, at.ce_weight, at.feat_weight) == (3, 1.0, 1000.0)
    rkd = build("RKD", "RKD.PDIST.SQUARED", "True")
    assert (rkd.distance_weight, rkd.angle_weight, rkd.squared, rkd.eps) == (25.0, 50.0, True,
                                                                             1e-12)
    crd = build("CRD", "CRD.NCE.K", "5")
    assert (crd.temperature, crd.momentum, crd.feat_weight, crd.num_data) == (0.07, 0.5, 0.8, 12)
    assert crd.sampler.num_negatives == 5 and crd.sampler.mode == "exact"
    advkd = build("ADVKD", "ADVKD.GAN_LOSS", "hinge", "ADVKD.D_STEPS", "2",
                  "ADVKD.DISC.HIDDEN", "[16]")
    assert (advkd.gan_loss, advkd.d_steps, advkd.adv_weight, advkd.warmup_epochs) == \
        ("hinge", 2, 0.5, 20)
    assert advkd.d_optimizer.param_groups[0]["lr"] == 1e-4
    with pytest.raises(UserError, match="GAN_LOSS"):
        build("ADVKD", "ADVKD.GAN_LOSS", "wgan")


@pytest.mark.parametrize("shape", [(2, 7, 4), (2, 3, 5)])
def test_kdsvd_svd_gradient_is_torchs_where_the_singular_values_are_distinct(shape):
    from mdistill.distillers.kdsvd import stable_svd
    torch.manual_seed(0)
    matrices = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    count = min(shape[1:])
    weights_s = torch.randn(shape[0], count, dtype=torch.float64)
    weights_v = torch.randn(shape[0], shape[2], count, dtype=torch.float64)

    def loss(values, vectors):      # a function of V that does not depend on its signs
        return (values * weights_s).sum() + (vectors.pow(2) * weights_v).sum()
    ours = torch.autograd.grad(loss(*stable_svd(matrices)), matrices)[0]
    _, values, vectors_h = torch.linalg.svd(matrices, full_matrices=False)
    reference = torch.autograd.grad(loss(values, vectors_h.transpose(-2, -1)), matrices)[0]
    assert torch.allclose(ours, reference, atol=1e-12)


def test_kdsvd_gradient_stays_finite_on_zero_padded_images():
    """Fashion-MNIST's 28 px images padded to 32 give first-stage maps with
    near-zero columns whose singular values square to 0 in fp32: the plain SVD
    gradient divides by the zero gap, and in the Fashion-MNIST table's first
    KDSVD step it was NaN (so were the student's weights after it). Ours skips
    those pairs: the student's gradient is finite and reaches its first layer."""
    from mdistill.models import build_model
    torch.manual_seed(0)
    student, teacher = build_model("resnet8", 10), build_model("resnet20", 10)
    image = torch.zeros(64, 3, 32, 32)
    image[:, :, 2:30, 2:30] = torch.rand(64, 3, 28, 28)
    distiller = DISTILLERS.get("KDSVD")(student, teacher.eval()).train()
    _, losses = distiller.forward_train(image, torch.arange(64) % 10)
    losses["loss_feat"].backward()
    grad = student.conv1.weight.grad
    assert torch.isfinite(losses["loss_feat"]) and torch.isfinite(grad).all()
    assert grad.abs().sum() > 0


def test_kdsvd_loss_does_not_raise_on_maps_that_are_not_finite():
    """torch's SVD raises on NaN input; a diverged student then gets a NaN
    cross-entropy, which the trainer reports, rather than a traceback."""
    from mdistill.distillers.kdsvd import kdsvd_loss
    student = [torch.full((2, 4, 4, 4), float("nan")), torch.randn(2, 8, 2, 2)]
    teacher = [torch.randn(2, 4, 4, 4), torch.randn(2, 8, 2, 2)]
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.svd(student[0].reshape(2, 16, 4), full_matrices=False)
    assert kdsvd_loss(student, teacher, k=1).shape == ()
