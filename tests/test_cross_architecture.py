"""Distillation across architectures: OFA-KD and DeiT's distillation token, and the
stage maps of ViT, Swin and ConvNeXt.

Loss values are computed here in float64 numpy from the papers' formulas
(OFA: -sum((p_t + 1_y)^eps - 1_y) log p_s; DeiT: CE against the teacher's
argmax, or the KL at tau summed over batch x classes / their number, times tau^2).
"""
import os

import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_opts
from mdistill.config import load_cfg
from mdistill.distillers import DISTILLERS
from mdistill.distillers.deit import deit_hard_loss, deit_soft_loss
from mdistill.distillers.ofa import OFA, ofa_loss
from mdistill.engine.builder import build_experiment
from mdistill.engine.trainer import Trainer
from mdistill.errors import UserError
from mdistill.models import build_model, pair_model_stages, provided_outputs, stage_info

pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")

DEIT_STUDENT = "timm:deit_tiny_distilled_patch16_224"


def softmax(z, t=1.0):
    e = np.exp(z / t - (z / t).max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def random_logits(seed, rows=5, classes=7):
    generator = np.random.default_rng(seed)
    return generator.normal(0, 2, (rows, classes)), generator.integers(0, classes, rows)


# ------------------------------------------------------------------ OFA loss
@pytest.mark.parametrize("eps, temperature", [(1.0, 1.0), (1.5, 1.0), (1.2, 2.0)])
def test_ofa_loss_is_the_target_enhanced_cross_entropy(eps, temperature):
    student, target = random_logits(0)
    teacher, _ = random_logits(1)
    p_s, p_t = softmax(student, temperature), softmax(teacher, temperature)
    expected = 0.0
    for row in range(len(target)):
        for column in range(student.shape[1]):
            one = float(column == target[row])
            expected -= ((p_t[row, column] + one) ** eps - one) * np.log(p_s[row, column])
    expected /= len(target)
    got = ofa_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(target), eps,
                   temperature)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_ofa_declares_a_temperature_only_for_plain_soft_targets():
    teacher, student = build_model("resnet8", 10), build_model("resnet8", 10)
    assert OFA(student, teacher, 10, temperature=2.0).teacher_temperatures() == (2.0,)
    assert OFA(student, teacher, 10, eps=1.5).teacher_temperatures() is None
    assert OFA.teacher_reads == {"logits"}


def test_ofa_takes_the_argmax_of_soft_targets_as_the_target_class():
    """Mixed or smoothed targets (the authors' recipe) mark their argmax, as the authors."""
    student, target = random_logits(6)
    teacher, _ = random_logits(7)
    soft = np.full(student.shape, 0.1 / student.shape[1])
    soft[np.arange(len(target)), target] += 0.9
    arguments = torch.tensor(student), torch.tensor(teacher)
    assert float(ofa_loss(*arguments, torch.tensor(soft), 1.5)) == pytest.approx(
        float(ofa_loss(*arguments, torch.tensor(target), 1.5)), rel=1e-6)


def test_ofa_branches_train_and_sum_into_loss_ofa():
    torch.manual_seed(0)
    teacher, student = build_model("resnet20", 10).eval(), build_model("resnet8", 10)
    distiller = OFA(student, teacher, 10, eps=1.5, loss_weight=0.5).train()
    assert distiller.stage_indices == [1, 2, 3]          # resnet8: stem, then three stages
    image, target = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    logits, losses = distiller(image, target)
    # loss_ofa is each branch's OFA loss against the teacher, summed and weighted.
    _, feats = student(image)
    with torch.no_grad():
        teacher_logits = teacher(image)[0]
    expected = 0.5 * sum(ofa_loss(distiller.branches[str(i)](feats["feats"][i]), teacher_logits,
                                  target, 1.5) for i in (1, 2, 3))
    assert float(losses["loss_ofa"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(losses["loss_kd"]) == pytest.approx(
        float(ofa_loss(logits, teacher_logits, target, 1.5)), rel=1e-5)
    sum(losses.values()).backward()
    for name, branch in distiller.branches.items():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in branch.parameters()
                   if p.dim() > 1), name
    assert all(p.grad is None for p in teacher.parameters())


def test_ofa_builds_transformer_branches_for_a_vit_student():
    torch.manual_seed(0)
    student = build_model(DEIT_STUDENT, 10, image_size=32)
    distiller = OFA(student, build_model("resnet8", 10), 10, stages=[2, 4]).train()
    # Four token maps, no stem; stage 2 gets 4 - 2 blocks, stage 4 one.
    assert distiller.stage_indices == [1, 3]
    assert [len(distiller.branches[key].blocks.layers) for key in ("1", "3")] == [2, 1]
    _, losses = distiller(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))
    losses["loss_ofa"].backward()
    assert all(p.grad is not None for p in distiller.branches.parameters())


@pytest.mark.parametrize("name, halvings", [("swin_tiny_patch4_window7_224", [3, 2, 1, 0]),
                                             ("test_convnext", [3, 2, 1, 0])])
def test_ofa_gives_pyramid_students_downsampling_branches(name, halvings):
    """Swin's and ConvNeXt's maps are a pyramid: each stage's branch halves its map
    down to the last stage's size (a 1x1 convolution on the last)."""
    torch.manual_seed(0)
    student = build_model(f"timm:{name}", 10, image_size=32, small_input=True)
    distiller = OFA(student, build_model("resnet8", 10), 10).train()
    counts = [sum(isinstance(layer, torch.nn.Sequential) for layer in distiller.branches[key])
              for key in sorted(distiller.branches)]
    assert counts == halvings
    _, losses = distiller(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))
    losses["loss_ofa"].backward()
    assert all(p.grad is not None for p in distiller.branches.parameters())


def test_transformer_branch_merges_patches_down_to_seven_by_seven():
    from mdistill.distillers.ofa import PatchMerging, TransformerBranch
    branch = TransformerBranch(dim=8, grid=28, width=16, blocks=1, num_classes=5)
    merges = [layer for layer in branch.merge if isinstance(layer, PatchMerging)]
    assert len(merges) == 2 and isinstance(merges[-1].act, torch.nn.Identity)
    assert branch.merge(torch.randn(2, 8, 28, 28)).shape == (2, 16, 7, 7)
    assert branch(torch.randn(2, 8, 28, 28)).shape == (2, 5)
    # Merging concatenates each 2x2 neighbourhood: top-left, bottom-left, top-right, bottom-right.
    merge = PatchMerging(1, 4, act=False)
    with torch.no_grad():
        merge.norm.weight.fill_(1.0)
        merge.reduction.weight.copy_(torch.eye(4))
    image = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    normalised = torch.nn.functional.layer_norm(torch.tensor([1.0, 3.0, 2.0, 4.0]), (4,))
    assert torch.allclose(merge(image).flatten(), normalised, atol=1e-6)


@pytest.mark.parametrize("stages", [[0], [4], [1, 1]])
def test_ofa_refuses_stages_the_student_lacks(stages):
    with pytest.raises(UserError,
                       match=r"^OFA.STAGES .*resnet8 has stages 1 to 3 besides its stem"):
        OFA(build_model("resnet8", 10), build_model("resnet8", 10), 10, stages=stages)


# ---------------------------------------------------------------- DeiT losses
def test_deit_hard_loss_is_the_cross_entropy_to_the_teachers_argmax():
    student, _ = random_logits(2)
    teacher, _ = random_logits(3)
    labels = teacher.argmax(axis=1)
    expected = -np.log(softmax(student)[np.arange(len(labels)), labels]).mean()
    got = deit_hard_loss(torch.tensor(student), torch.tensor(teacher))
    assert float(got) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_deit_soft_loss_is_the_kl_over_every_logit(tau):
    student, _ = random_logits(4)
    teacher, _ = random_logits(5)
    p_t, p_s = softmax(teacher, tau), softmax(student, tau)
    expected = (p_t * (np.log(p_t) - np.log(p_s))).sum() * tau ** 2 / student.size
    got = deit_soft_loss(torch.tensor(student), torch.tensor(teacher), tau)
    assert float(got) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_deit_weights_the_two_heads_and_evaluates_their_mean(mode):
    torch.manual_seed(0)
    student = build_model(DEIT_STUDENT, 10, image_size=32)
    assert "dist_logits" in provided_outputs(student)
    teacher = build_model("resnet8", 10).eval()
    distiller = DISTILLERS.get("DEIT")(student, teacher, mode=mode, alpha=0.3, tau=2.0).train()
    image, target = torch.randn(3, 3, 32, 32), torch.tensor([4, 5, 6])
    student.eval()      # no dropout, so a second forward gives the same logits
    logits, losses = distiller.forward_train(image, target)
    _, feats = student(image)
    with torch.no_grad():
        teacher_logits = teacher(image)[0]
    distillation = (deit_hard_loss(feats["dist_logits"], teacher_logits) if mode == "hard"
                    else deit_soft_loss(feats["dist_logits"], teacher_logits, 2.0))
    assert float(losses["loss_kd"]) == pytest.approx(0.3 * float(distillation), rel=1e-5)
    assert float(losses["loss_ce"]) == pytest.approx(
        0.7 * float(torch.nn.functional.cross_entropy(logits, target)), rel=1e-5)
    assert distiller.teacher_temperatures() == ((2.0,) if mode == "soft" else None)
    # Evaluation: the mean of the heads, which is timm's own eval-mode output.
    distiller.eval()
    assert torch.allclose(distiller(image), student.network(image), atol=1e-5)
    # The distillation token's head is trained through loss_kd alone.
    distiller.train()
    _, losses = distiller.forward_train(image, target)
    losses["loss_kd"].backward()
    assert student.network.head_dist.weight.grad.abs().sum() > 0
    assert student.network.head.weight.grad is None


@pytest.mark.parametrize("method", ["NONE", "KD"])
def test_a_distilled_token_student_trains_both_heads_when_the_method_reads_one(method):
    """A method that reads only the logits trains a distillation-token student on
    the mean of its two heads (timm's default), so the head its evaluation averages
    in learns too; DeiT alone trains the class head on the labels."""
    torch.manual_seed(0)
    student = build_model(DEIT_STUDENT, 10, image_size=32)
    teacher = build_model("resnet8", 10).eval() if method != "NONE" else None
    distiller = DISTILLERS.get(method)(student, teacher).train()
    assert student.training     # deit_tiny has no dropout: each forward sees the same tokens
    image, target = torch.randn(3, 3, 32, 32), torch.tensor([4, 5, 6])
    logits, losses = distiller.forward_train(image, target)
    with torch.no_grad():
        tokens = student.network.forward_features(image)
        mean = (student.network.head(tokens[:, 0]) + student.network.head_dist(tokens[:, 1])) / 2
    assert torch.allclose(logits, mean, atol=1e-5)
    losses["loss_ce"].backward()
    assert student.network.head.weight.grad.abs().sum() > 0
    assert student.network.head_dist.weight.grad.abs().sum() > 0
    # The same model under DEIT trains the class head on the labels alone.
    deit = DISTILLERS.get("DEIT")(build_model(DEIT_STUDENT, 10, image_size=32),
                                  build_model("resnet8", 10).eval())
    assert deit.student.distilled_training and not student.distilled_training


def test_deit_refuses_an_unknown_mode():
    with pytest.raises(UserError, match=r"^DEIT.MODE 'medium' is not one of hard, soft$"):
        DISTILLERS.get("DEIT")(build_model("resnet8", 10), build_model("resnet8", 10),
                               mode="medium")


# ------------------------------------------------- through the real trainer
def make_trainer(cifar_root, teacher_file, run_dir, *extra):
    opts = tiny_opts(cifar_root, run_dir, "DISTILLER.TEACHER", "resnet20",
                     "DISTILLER.TEACHER_WEIGHTS", teacher_file, *extra)
    experiment = build_experiment(load_cfg(os.path.join(ROOT, "configs/cifar100/kd.yaml"), opts))
    os.makedirs(run_dir, exist_ok=True)
    return Trainer(experiment, str(run_dir), log=lambda text: None)


@pytest.mark.parametrize("method, student, extra", [
    ("OFA", "resnet8", ("OFA.EPS", "1.5")),
    ("DEIT", DEIT_STUDENT, ("DEIT.MODE", "hard")),
    ("DEIT", DEIT_STUDENT, ("DEIT.MODE", "soft", "DEIT.TAU", "3.0"))])
def test_two_steps_through_the_trainer(method, student, extra, cifar_root, teacher_file,
                                       tmp_path):
    trainer = make_trainer(cifar_root, teacher_file, tmp_path, "DISTILLER.TYPE", method,
                           "DISTILLER.STUDENT", student, *extra)
    before = [p.detach().clone() for p in trainer.distiller.student.parameters()]
    trainer.start_epoch(1)
    trainer.train_loader.set_epoch(1)
    values = [trainer.run_step(batch) for _, batch in zip(range(2), trainer.train_loader)]
    assert all(value is not None and all(np.isfinite(list(value.values()))) for value in values)
    after = list(trainer.distiller.student.parameters())
    assert any(not torch.equal(old, new) for old, new in zip(before, after))


def test_deit_with_a_zoo_student_is_refused_before_training(cifar_root, teacher_file, tmp_path):
    with pytest.raises(UserError, match=r"^DISTILLER.TYPE DEIT reads the student's dist_logits, "
                                        r"which DISTILLER.STUDENT resnet8 does not give") as error:
        make_trainer(cifar_root, teacher_file, tmp_path, "DISTILLER.TYPE", "DEIT",
                     "DISTILLER.STUDENT", "resnet8")
    assert "\n" not in str(error.value)


# ------------------------------------------------ stage maps of timm families
@pytest.mark.parametrize("name, strides", [
    ("swin_tiny_patch4_window7_224", [4, 8, 16, 32]),
    ("convnext_atto", [1, 2, 4, 8]),              # the patchify stem padded to stride 1
    ("deit_tiny_distilled_patch16_224", [16, 16, 16, 16])])
def test_timm_stage_maps_are_nchw_at_declared_strides(name, strides):
    model = build_model(f"timm:{name}", 10, image_size=32, small_input=True)
    infos = stage_info(model, 32)
    assert [info.stride for info in infos] == strides
    assert not any(info.stem for info in infos)
    assert model.token_maps == name.startswith("deit")
    # They pair with a zoo CNN from the deepest: resnet8's three stages (stem left out).
    assert pair_model_stages(build_model("resnet8", 10), model, 32) == [(1, 1), (2, 2), (3, 3)]
