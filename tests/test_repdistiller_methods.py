"""RepDistiller's CC, FSP, AB and FT against their formulas, and their stages.

Expected values are computed here in float64 numpy from the formulas of
RepDistiller's ``distiller_zoo`` (the benchmark these methods are known by),
independently of the implementation. The models are fakes returning fixed
features (times a unit parameter, so gradients have somewhere to go), or the
real CIFAR models where shapes matter.
"""
import numpy as np
import pytest
import torch
from torch import nn

from mdistill.distillers import DISTILLERS


pytestmark = pytest.mark.usefixtures("one_thread")


class FixedFeatures(nn.Module):
    """Fixed logits, feature maps and pooled features (first ``len(x)`` rows) times a
    unit parameter; ``preact`` maps may differ from the post-ReLU ones."""

    def __init__(self, logits, feats=(), pooled=None, preact=None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        as_tensor = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)   # noqa: E731
        self.register_buffer("logits", as_tensor(logits))
        self.register_buffer("pooled", as_tensor(pooled if pooled is not None else logits))
        self.feats = [as_tensor(f) for f in feats]
        self.preact = [as_tensor(f) for f in (preact if preact is not None else feats)]

    def forward(self, x):
        n = len(x)
        return self.logits[:n] * self.scale, {
            "feats": [f[:n] * self.scale for f in self.feats],
            "preact_feats": [f[:n] * self.scale for f in self.preact],
            "pooled_feat": self.pooled[:n] * self.scale}


def losses_of(distiller, batch):
    distiller.train()
    _, losses = distiller.forward_train(torch.zeros(batch, 3, 4, 4), torch.zeros(batch).long())
    return {name: float(value.detach()) for name, value in losses.items()}


# ------------------------------------------------------------------------- CC

def test_cc_matches_repdistillers_correlation_loss():
    rng = np.random.default_rng(0)
    student_pooled, teacher_pooled = rng.normal(size=(5, 6)), rng.normal(size=(5, 4))
    logits = rng.normal(size=(5, 3))
    distiller = DISTILLERS.get("CC")(FixedFeatures(logits, pooled=student_pooled),
                                     FixedFeatures(logits, pooled=teacher_pooled),
                                     feat_dim=7, ce_weight=1.0, feat_weight=0.02,
                                     image_shape=(3, 4, 4))
    weights = {name: p.detach().double().numpy() for name, p in distiller.named_parameters()
               if name.startswith("embed")}
    e_s = student_pooled @ weights["embed_student.weight"].T + weights["embed_student.bias"]
    e_t = teacher_pooled @ weights["embed_teacher.weight"].T + weights["embed_teacher.bias"]
    delta = np.abs(e_s - e_t)
    expected = np.mean([np.sum(delta[i] * delta[i + 1]) for i in range(4)])
    assert losses_of(distiller, 5)["loss_feat"] == pytest.approx(0.02 * expected, rel=1e-5)


# ------------------------------------------------------------------------ FSP

def np_pool_to(x, size):
    """Average-pool [B, C, H, W] to size x size by equal blocks."""
    b, c, h, w = x.shape
    return x.reshape(b, c, size, h // size, size, w // size).mean(axis=(3, 5))


def np_fsp(maps):
    out = []
    for bottom, top in zip(maps[:-1], maps[1:]):
        size = min(bottom.shape[2], top.shape[2])
        bottom, top = np_pool_to(bottom, size), np_pool_to(top, size)
        b, cb = bottom.shape[:2]
        ct = top.shape[1]
        g = np.zeros((b, cb, ct))
        for n in range(b):
            for i in range(cb):
                for j in range(ct):
                    g[n, i, j] = np.mean(bottom[n, i] * top[n, j])
        out.append(g)
    return out


def random_maps(rng, batch, shapes):
    return [rng.normal(size=(batch, *shape)) for shape in shapes]


def test_fsp_init_stage_matches_the_fsp_matrices_and_distill_is_cross_entropy():
    rng = np.random.default_rng(1)
    shapes = [(2, 4, 4), (3, 2, 2), (2, 2, 2)]
    student_maps, teacher_maps = random_maps(rng, 3, shapes), random_maps(rng, 3, shapes)
    logits = rng.normal(size=(3, 4))
    distiller = DISTILLERS.get("FSP")(FixedFeatures(logits, student_maps),
                                      FixedFeatures(logits, teacher_maps), init_epochs=30,
                                      image_shape=(3, 4, 4))
    stages = distiller.stages(240)
    assert [(s.name, s.epochs, s.schedule, s.parameters) for s in stages] == [
        ("init", 30, False, None), ("distill", 240, True, None)]
    distiller.on_stage_start("init")
    expected = sum(np.mean((s - t) ** 2)
                   for s, t in zip(np_fsp(student_maps), np_fsp(teacher_maps)))
    assert losses_of(distiller, 3) == pytest.approx({"loss_fsp": expected}, rel=1e-5)
    distiller.on_stage_start("distill")
    assert set(losses_of(distiller, 3)) == {"loss_ce"}
    assert [s.name for s in DISTILLERS.get("FSP")(
        FixedFeatures(logits, student_maps), FixedFeatures(logits, teacher_maps),
        init_epochs=0, image_shape=(3, 4, 4)).stages(240)] == ["distill"]


def test_fsp_refuses_maps_of_different_channels():
    from mdistill.errors import UserError
    from mdistill.models import build_model
    with pytest.raises(UserError, match="FSP needs feature maps of equal channels"):
        DISTILLERS.get("FSP")(build_model("resnet8", 10), build_model("resnet8x4", 10))


# ------------------------------------------------------------------------- AB

def test_ab_init_stage_matches_the_activation_boundary_loss():
    rng = np.random.default_rng(2)
    shapes = [(2, 4, 4), (3, 2, 2), (4, 1, 1)]
    # preact_feats[0] is the stem, which AB leaves out.
    student_pre = random_maps(rng, 4, shapes)
    teacher_pre = random_maps(rng, 4, shapes)
    logits = rng.normal(size=(4, 3))
    distiller = DISTILLERS.get("AB")(FixedFeatures(logits, student_pre, preact=student_pre),
                                     FixedFeatures(logits, teacher_pre, preact=teacher_pre),
                                     margin=1.0, image_shape=(3, 4, 4))
    assert all(isinstance(c, nn.Identity) for c in distiller.connectors)   # equal shapes
    distiller.on_stage_start("init")
    stages = list(zip(student_pre[1:], teacher_pre[1:]))
    expected = 0.0
    for index, (s, t) in enumerate(stages):
        total = np.sum((s + 1) ** 2 * ((s > -1) & (t <= 0)) + (s - 1) ** 2 * ((s <= 1) & (t > 0)))
        expected += 2.0 ** (index - len(stages) + 1) * total / 4 / 1000 * 3
    assert losses_of(distiller, 4) == pytest.approx({"loss_ab": expected}, rel=1e-5)
    distiller.on_stage_start("distill")
    assert set(losses_of(distiller, 4)) == {"loss_ce"}


def test_ab_stages_and_connectors():
    from mdistill.models import build_model
    student, teacher = build_model("resnet8", 10), build_model("resnet8x4", 10)
    distiller = DISTILLERS.get("AB")(student, teacher, init_epochs=30)
    # Different widths: a conv + BN (no ReLU) maps each student stage to the teacher's.
    assert all(isinstance(c.bn, nn.BatchNorm2d) for c in distiller.connectors)
    init, distill = distiller.stages(240)
    assert (init.name, init.epochs, init.schedule) == ("init", 30, False)
    # RepDistiller's init trains the feature modules (all but the classifier) and connectors.
    trained = {id(p) for p in init.parameters()}
    assert trained == ({id(p) for name, p in student.named_parameters() if not name.startswith("fc")}
                       | {id(p) for p in distiller.connectors.parameters()})
    assert init.eval_modules == ("student_head",) and distiller.student_head.names == ("fc",)
    assert {id(p) for p in distill.parameters()} == {id(p) for p in student.parameters()}
    assert distill.eval_modules == ("connectors",)
    assert distiller.teacher_reads == {"preact_feats"} and "preact_feats" in distiller.student_reads


def test_ab_init_stage_keeps_a_wrn_students_final_bn_in_eval_mode(cifar_root, teacher_file,
                                                                  tmp_path):
    """RepDistiller's init runs the student in eval mode but its feature modules: WRN's
    final bn1 (after block3, before the pooling) normalises the last pre-activation
    map with its running statistics and is not trained."""
    import os
    from conftest import ROOT, tiny_opts
    from mdistill.config import load_cfg
    from mdistill.engine.builder import build_experiment
    from mdistill.engine.trainer import Trainer
    cfg = load_cfg(os.path.join(ROOT, "configs/cifar100/ab.yaml"),
                   tiny_opts(cifar_root, tmp_path, "DISTILLER.TEACHER", "resnet20",
                             "DISTILLER.STUDENT", "wrn_16_1", "DISTILLER.TEACHER_WEIGHTS",
                             teacher_file, "AB.INIT_EPOCHS", "1"))
    torch.manual_seed(0)
    trainer = Trainer(build_experiment(cfg), str(tmp_path), log=lambda text: None)
    distiller = trainer.distiller
    student = distiller.student
    assert distiller.student_features.names == ("conv1", "block1", "block2", "block3")
    assert distiller.student_head.names == ("bn1", "fc")
    with torch.no_grad():      # running statistics far from any batch's
        student.bn1.running_mean.uniform_(-1, 1)
        student.bn1.running_var.uniform_(2, 3)
        student.bn1.weight.uniform_(0.5, 1.5)
    before = {name: value.clone() for name, value in student.state_dict().items()}

    trainer.start_epoch(trainer.epoch)
    assert distiller.stage == "init" and not student.bn1.training and student.block3.training
    _, feats = student(torch.randn(4, 3, 32, 32))
    bn = student.bn1
    by_hand = ((feats["feats"][-1] - bn.running_mean.view(1, -1, 1, 1))
               / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
               * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1))
    torch.testing.assert_close(feats["preact_feats"][-1], by_hand)

    trainer.train_epoch()
    after = student.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert not any(name.startswith(("bn1.", "fc.")) for name in changed)
    assert {"conv1.weight", "block3.layer.1.conv2.weight",
            "block3.layer.0.bn1.running_mean"} <= changed


# ------------------------------------------------------------------------- FT

def np_factor(f):
    v = (f ** 2).mean(axis=1).reshape(len(f), -1)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_ft_losses_and_stages():
    rng = np.random.default_rng(3)
    student_maps = random_maps(rng, 3, [(3, 4, 4)])
    teacher_maps = random_maps(rng, 3, [(4, 2, 2)])
    logits = rng.normal(size=(3, 5))
    distiller = DISTILLERS.get("FT")(FixedFeatures(logits, student_maps),
                                     FixedFeatures(logits, teacher_maps), init_epochs=30,
                                     init_lr=0.01, feat_weight=200.0, image_shape=(3, 4, 4))
    init, distill = distiller.stages(240)
    assert (init.lr, init.schedule, init.eval_modules) == (0.01, False, ("student",))
    assert {id(p) for p in init.parameters()} == {id(p) for p in distiller.paraphraser.parameters()}
    assert {id(p) for p in distill.parameters()} == (
        {id(p) for p in distiller.student.parameters()}
        | {id(p) for p in distiller.translator.parameters()})
    teacher = torch.as_tensor(teacher_maps[0], dtype=torch.float32)

    distiller.on_stage_start("init")
    distiller.train()
    _, losses = distiller.forward_train(torch.zeros(3, 3, 4, 4), torch.zeros(3).long())
    with torch.no_grad():
        rebuilt = distiller.paraphraser(teacher).double().numpy()
    assert float(losses["loss_paraphrase"].detach()) == pytest.approx(
        np.mean((rebuilt - teacher_maps[0]) ** 2), rel=1e-5)

    distiller.on_stage_start("distill")
    distiller.eval()
    distiller.student.train()
    distiller.translator.train()
    _, losses = distiller.forward_train(torch.zeros(3, 3, 4, 4), torch.zeros(3).long())
    losses["loss_feat"].backward()
    with torch.no_grad():
        factor_t = distiller.paraphraser.encoder(teacher).double().numpy()
        # The translated student factor, recomputed (train-mode BN: the batch's statistics).
        factor_s = distiller.translator(torch.as_tensor(student_maps[0], dtype=torch.float32))
    factor_s = factor_s.double().numpy()
    factor_s = np_pool_to(factor_s, 2)            # the larger map is pooled to the smaller
    expected = 200.0 * np.mean(np.abs(np_factor(factor_s) - np_factor(factor_t)))
    assert float(losses["loss_feat"].detach()) == pytest.approx(expected, rel=1e-4)
    # The paraphraser is frozen in the distillation stage; the translator learns.
    assert all(p.grad is None for p in distiller.paraphraser.parameters())
    assert any(p.grad is not None for p in distiller.translator.parameters())
