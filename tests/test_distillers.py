"""Every registered distiller through the real trainer, and method-specific behaviour."""
import copy
import glob
import os
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, tiny_opts
from mdistill.config import load_cfg
from mdistill.distillers import DISTILLERS, build_distiller
from mdistill.distillers.advkd import generator_loss
from mdistill.engine.builder import build_experiment
from mdistill.engine.trainer import Trainer
from mdistill.models import build_model

CONFIG = os.path.join(ROOT, "configs/cifar100/kd.yaml")


def make_trainer(method, cifar_root, teacher_file, run_dir, *extra):
    opts = tiny_opts(cifar_root, run_dir, "DISTILLER.TYPE", method, "DISTILLER.TEACHER",
                     "resnet20", "DISTILLER.STUDENT", "resnet8", "DISTILLER.TEACHER_WEIGHTS",
                     teacher_file, "CRD.NCE.K", "64", "CRD.FEAT.DIM", "16", *extra)
    experiment = build_experiment(load_cfg(CONFIG, opts))
    os.makedirs(run_dir, exist_ok=True)
    return Trainer(experiment, str(run_dir), log=lambda text: None)


def two_steps(trainer):
    trainer.distiller.train()
    trainer.distiller.on_epoch_start(1)
    trainer.train_loader.set_epoch(1)
    values = []
    for _, batch in zip(range(2), trainer.train_loader):
        values.append(trainer.run_step(batch))
    return values


@pytest.mark.parametrize("method", DISTILLERS.names())
def test_two_steps_through_the_trainer(method, cifar_root, teacher_file, tmp_path):
    trainer = make_trainer(method, cifar_root, teacher_file, tmp_path / "a")
    distiller = trainer.distiller
    teacher_before = ({k: v.clone() for k, v in distiller.teacher.state_dict().items()}
                      if distiller.teacher is not None else {})
    values = two_steps(trainer)
    assert all(v is not None and all(map(torch.isfinite, map(torch.tensor, v.values())))
               for v in values)
    # Gradients reach the student and every module the method trains ...
    assert all(p.grad is not None for p in distiller.student.parameters())
    for name, module in distiller.trainable_named_modules():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name
    for name in distiller.auxiliary_module_names():
        assert any(p.grad is not None for p in getattr(distiller, name).parameters()), name
    # ... and never the teacher, whose weights and BN statistics stay put, in eval mode.
    if distiller.teacher is not None:
        assert all(p.grad is None and not p.requires_grad for p in distiller.teacher.parameters())
        assert not distiller.teacher.training and distiller.student.training
        after = distiller.teacher.state_dict()
        assert all(torch.equal(teacher_before[key], after[key]) for key in teacher_before)

    # The run checkpoint round-trips: extra modules, buffers (CRD's memory), optimizers (D's).
    trainer.save(epoch_complete=False)
    state = torch.load(tmp_path / "a" / "latest", weights_only=True)
    assert not any(key.startswith("teacher.") for key in state["model"])
    fresh = make_trainer(method, cifar_root, teacher_file, tmp_path / "b")
    fresh.load_state_dict(state)
    saved, restored = distiller.state_dict_to_save(), fresh.distiller.state_dict_to_save()
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[key], restored[key]) for key in saved)
    for name, optimizer in trainer.aux_optimizers.items():
        original = optimizer.state_dict()["state"]
        loaded = fresh.aux_optimizers[name].state_dict()["state"]
        assert original and all(torch.equal(original[i]["exp_avg"], loaded[i]["exp_avg"])
                                for i in original)
    assert fresh.global_step == 2 and fresh.train_loader.position == 2


def test_probing_feature_shapes_leaves_the_teacher_untouched():
    teacher, student = build_model("resnet32x4", 100), build_model("resnet8x4", 100)
    teacher.train()
    stats = {k: v.clone() for k, v in teacher.state_dict().items()}
    for method in ("FITNET", "CRD", "ADVKD"):
        cfg = load_cfg(None, ["DISTILLER.TYPE", method, "ADVKD.INPUT", "feature"])
        data = SimpleNamespace(num_classes=100, image_size=32, train_targets=torch.arange(100))
        build_distiller(cfg, student, teacher, data)
        assert all(torch.equal(stats[k], v) for k, v in teacher.state_dict().items())


@pytest.mark.parametrize("pair", [("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"),
                                  ("vgg13", "vgg8"), ("resnet56", "resnet20"),
                                  ("resnet110", "resnet32")])
def test_fitnet_regressor_maps_student_hint_to_teacher_shape(pair):
    teacher, student = (build_model(name, 100) for name in pair)
    distiller = DISTILLERS.get("FITNET")(student, teacher)
    image = torch.randn(2, 3, 32, 32)
    distiller.eval()
    hint = distiller.regressor(student(image)[1]["feats"][2])
    assert hint.shape == teacher(image)[1]["feats"][2].shape


def test_crd_updates_only_the_batch_rows_and_fixes_z_after_the_first_batch(
        cifar_root, teacher_file, tmp_path):
    trainer = make_trainer("CRD", cifar_root, teacher_file, tmp_path)
    distiller = trainer.distiller
    memory = distiller.memory_student.clone()
    assert distiller.z_student.item() < 0
    trainer.train_loader.set_epoch(1)
    distiller.train()
    batch = next(iter(trainer.train_loader))
    trainer.run_step(batch)
    changed = (distiller.memory_student != memory).any(dim=1)
    expected = torch.zeros_like(changed)
    expected[batch["index"]] = True
    assert torch.equal(changed, expected)
    z = distiller.z_student.item()
    assert z > 0
    trainer.run_step(next(iter(trainer.train_loader)))
    assert distiller.z_student.item() == z
    # Each updated row is unit length (momentum update, then re-normalised).
    norms = distiller.memory_student[batch["index"]].norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def _advkd_pair(**options):
    torch.manual_seed(0)
    student, teacher = build_model("resnet8", 10), build_model("resnet20", 10)
    advkd = DISTILLERS.get("ADVKD")(copy.deepcopy(student), copy.deepcopy(teacher), 10, **options)
    kd = DISTILLERS.get("KD")(copy.deepcopy(student), copy.deepcopy(teacher))
    return advkd, kd


def test_advkd_with_zero_adversarial_weight_is_kd():
    advkd, kd = _advkd_pair(adv_weight=0.0)
    image, target = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    advkd.train().on_epoch_start(30)
    kd.train()
    _, adv_losses = advkd(image, target)
    _, kd_losses = kd(image, target)
    assert torch.equal(adv_losses["loss_ce"], kd_losses["loss_ce"])
    assert torch.equal(adv_losses["loss_kd"], kd_losses["loss_kd"])
    assert adv_losses["loss_adv"].item() == 0.0


def test_advkd_discriminator_learns_and_student_learns_to_fool_it():
    advkd, _ = _advkd_pair()
    torch.manual_seed(1)
    real = torch.randn(64, 10) * 3                       # "teacher" logits
    fake = torch.randn(64, 10)                           # a frozen "student"
    losses = [advkd.discriminator_step(real, fake)[0].item() for _ in range(30)]
    assert losses[-1] < losses[0] * 0.8
    # D frozen: optimise student logits alone against it.
    advkd.discriminator.requires_grad_(False)
    frozen = [p.clone() for p in advkd.discriminator.parameters()]
    logits = fake.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=0.05)
    adversarial = []
    for _ in range(30):
        loss = generator_loss(advkd.discriminator(logits), "bce")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        adversarial.append(loss.item())
    assert adversarial[-1] < adversarial[0] * 0.8
    assert all(torch.equal(a, b) for a, b in zip(frozen, advkd.discriminator.parameters()))


def test_advkd_warmup_of_the_adversarial_weight():
    advkd, _ = _advkd_pair(adv_weight=0.5, warmup_epochs=20)
    assert [advkd.adversarial_weight(epoch) for epoch in (1, 10, 20, 30)] == \
        [0.025, 0.25, 0.5, 0.5]
    advkd_now, _ = _advkd_pair(adv_weight=0.5, warmup_epochs=0)
    assert advkd_now.adversarial_weight(1) == 0.5


CONFIGS = sorted(path for path in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"),
                                           recursive=True)
                 if os.path.basename(path) != "_base_.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_config_loads_and_builds_its_distiller(path):
    cfg = load_cfg(path)
    imagenet = cfg.DATASET.TYPE == "imagenet"
    classes = 1000 if imagenet else 10 if cfg.DATASET.TYPE == "digits" else 100
    data = SimpleNamespace(num_classes=classes, image_size=224 if imagenet else 32,
                           train_targets=torch.arange(200) % classes)
    dataset = cfg.DATASET.TYPE
    student = build_model(cfg.DISTILLER.STUDENT, classes, dataset=dataset)
    method = DISTILLERS.get(cfg.DISTILLER.TYPE)
    teacher = build_model(cfg.DISTILLER.TEACHER, classes, dataset=dataset) \
        if method.requires_teacher else None
    distiller = build_distiller(cfg, student, teacher, data)
    assert isinstance(distiller, method)
