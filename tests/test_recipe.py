"""The modern recipe: Mixup/CutMix and label smoothing, EMA, warm-up, clipping,
no decay on norms and biases, resizing on the device."""
import json
import os
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, tiny_opts
from mdistill.config import get_cfg
from mdistill.distillers.base import Stage
from mdistill.engine.recipe import BatchRecipe, resize_images
from mdistill.engine.schedule import stage_lr_factor
from mdistill.engine.update_rules import UPDATE_RULES, build_optimizer
from mdistill.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIG = os.path.join(ROOT, "configs/cifar100/kd.yaml")


def smoothed_one_hot(target, classes, smoothing):
    off = smoothing / classes
    return torch.full((len(target), classes), off, dtype=torch.float64).scatter_(
        1, target.view(-1, 1), 1.0 - smoothing + off)


# ----------------------------------------------------------------- mixing
@pytest.mark.parametrize("batch_size", [4, 5])
def test_mixup_mixes_mirrored_images_and_targets_as_the_formula(batch_size):
    images = torch.rand(batch_size, 3, 6, 6, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 3, 4])[:batch_size]
    recipe = BatchRecipe(5, mixup_alpha=0.4, label_smoothing=0.1)
    np.random.seed(3)
    out = recipe({"image": images, "target": target, "index": target})
    # timm's draws (mode "batch"): whether to mix, then Beta(alpha, alpha).
    np.random.seed(3)
    assert np.random.rand() < 1.0
    lam = float(np.random.beta(0.4, 0.4))
    even = batch_size - batch_size % 2
    expected = images.clone()
    expected[:even] = lam * images[:even] + (1 - lam) * images[:even].flip(0)
    one_hot = smoothed_one_hot(target, 5, 0.1)
    soft = one_hot.clone()
    soft[:even] = lam * one_hot[:even] + (1 - lam) * one_hot[:even].flip(0)
    assert torch.allclose(out["image"], expected, atol=1e-12, rtol=0)
    assert torch.allclose(out["target"].double(), soft, atol=1e-6, rtol=0)
    assert torch.equal(out["index"], target)
    assert not torch.equal(images, expected) and torch.equal(images, images.clone())


def test_cutmix_pastes_the_mirrored_box_and_weights_targets_by_its_area():
    images = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 3])
    np.random.seed(0)
    out = BatchRecipe(4, cutmix_alpha=1.0)({"image": images, "target": target})
    changed = (out["image"] != images).any(dim=1)[0]       # the box, on the first image
    area = changed.sum().item() / 64
    assert 0 < area < 1
    pasted = images.flip(0)
    assert torch.equal(out["image"][:, :, changed], pasted[:, :, changed])
    lam = 1 - area
    expected = lam * F.one_hot(target, 4).double() + (1 - lam) * F.one_hot(target.flip(0), 4)
    assert torch.allclose(out["target"].double(), expected, atol=1e-6, rtol=0)


def tiny_cfg(cifar_root, prefix, teacher_file, *extra):
    from mdistill.config import load_cfg
    return load_cfg(CONFIG, tiny_opts(cifar_root, prefix, "DISTILLER.TEACHER", "resnet20",
                                      "DISTILLER.STUDENT", "resnet8", "DISTILLER.TEACHER_WEIGHTS",
                                      teacher_file, "SOLVER.DETERMINISTIC", "True",
                                      "EXPERIMENT.NAME", "run", *extra))


def tiny_trainer(cfg, run_dir=None):
    from mdistill.engine.builder import build_experiment
    from mdistill.engine.trainer import Trainer
    return Trainer(build_experiment(cfg), run_dir, log=lambda text: None)


def record_inputs(model, seen):
    return model.register_forward_hook(
        lambda module, inputs, output: seen.append((inputs[0].detach().clone(),
                                                    output[0].detach().clone())))


def test_the_teacher_sees_the_students_mixed_images_and_the_ce_uses_soft_targets(
        cifar_root, teacher_file, tmp_path):
    cfg = tiny_cfg(cifar_root, tmp_path, teacher_file, "DATASET.MIXUP.ALPHA", "0.8",
                   "SOLVER.LABEL_SMOOTHING", "0.1")
    trainer = tiny_trainer(cfg)
    trainer.start_epoch(1)
    batch = next(iter(trainer.train_loader))
    student_seen, teacher_seen = [], []
    record_inputs(trainer.distiller.student, student_seen)
    record_inputs(trainer.distiller.teacher, teacher_seen)
    np.random.seed(7)
    values = trainer.run_step(batch)
    np.random.seed(7)
    np.random.rand()
    lam = float(np.random.beta(0.8, 0.8))
    image = batch["image"].double()
    mixed = lam * image + (1 - lam) * image.flip(0)
    (student_image, student_logits), = student_seen
    (teacher_image, _), = teacher_seen
    assert torch.equal(student_image, teacher_image)
    assert torch.allclose(student_image.double(), mixed, atol=1e-5, rtol=0)
    one_hot = smoothed_one_hot(batch["target"], 100, 0.1)
    soft = lam * one_hot + (1 - lam) * one_hot.flip(0)
    ce = -(soft * torch.log_softmax(student_logits.double(), dim=1)).sum(dim=1).mean()
    assert values["loss_ce"] == pytest.approx(cfg.KD.LOSS.CE_WEIGHT * ce.item(), rel=1e-5)


@pytest.mark.parametrize("method, key", [("DKD", "DATASET.MIXUP.ALPHA"),
                                         ("NKD", "DATASET.CUTMIX.ALPHA"),
                                         ("CRD", "SOLVER.LABEL_SMOOTHING")])
def test_soft_targets_are_refused_for_methods_that_read_hard_labels(
        cifar_root, teacher_file, tmp_path, method, key):
    from mdistill.engine.builder import build_experiment
    cfg = tiny_cfg(cifar_root, tmp_path, teacher_file, "DISTILLER.TYPE", method, key, "0.2",
                   "CRD.NCE.K", "8")
    with pytest.raises(UserError, match=rf"^{key} 0.2: DISTILLER.TYPE {method} reads the hard "
                                        rf"labels .*; set {key} 0$"):
        build_experiment(cfg)


def test_mixed_images_are_refused_with_the_teacher_cache(cifar_root, teacher_file, tmp_path):
    from mdistill.engine.builder import build_experiment
    cfg = tiny_cfg(cifar_root, tmp_path, teacher_file, "DATASET.MIXUP.ALPHA", "0.2",
                   "DISTILLER.TEACHER_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="DISTILLER.TEACHER_CACHE holds the logits"):
        build_experiment(cfg)


# ------------------------------------------------------------------ resize
@pytest.mark.parametrize("size", [20, 48])
def test_resize_matches_torchvision(size):
    from torchvision.transforms.v2 import functional as TF
    images = torch.rand(2, 3, 32, 32)
    resized = resize_images(images, size)
    assert resized.shape == (2, 3, size, size)
    reference = TF.resize(images, [size, size], antialias=True)
    assert torch.allclose(resized, reference, atol=1e-6, rtol=0)


def test_resize_feeds_both_models_and_the_evaluation_at_the_new_size(cifar_root, teacher_file,
                                                                     tmp_path):
    trainer = tiny_trainer(tiny_cfg(cifar_root, tmp_path, teacher_file, "DATASET.RESIZE", "24"))
    trainer.start_epoch(1)
    student_seen, teacher_seen = [], []
    record_inputs(trainer.distiller.student, student_seen)
    record_inputs(trainer.distiller.teacher, teacher_seen)
    batch = next(iter(trainer.train_loader))
    trainer.run_step(batch)
    assert student_seen[0][0].shape[-2:] == teacher_seen[0][0].shape[-2:] == (24, 24)
    assert torch.equal(student_seen[0][0], resize_images(batch["image"], 24))
    trainer.evaluate_epoch()
    assert all(image.shape[-2:] == (24, 24) for image, _ in student_seen[1:])


@pytest.mark.parametrize("method, student, extra", [
    ("OFA", "resnet8", ("OFA.STAGES", "[1, 2, 3]")),
    ("OFA", "timm:test_vit", ("OFA.STAGES", "[1, 2]")),
    ("FITNET", "resnet8", ()),
    ("KD", "timm:test_vit", ())])
def test_resize_builds_the_models_and_the_methods_modules_for_the_new_size(
        method, student, extra, cifar_root, teacher_file, tmp_path):
    """OFA-KD's CIFAR protocol resizes 32-px images to the teacher's 224: the models
    (a ViT's patch grid) and the method's modules (OFA's branches, FitNet's
    regressor) are built for the resized images, so feature methods train too."""
    cfg = tiny_cfg(cifar_root, tmp_path, teacher_file, "DISTILLER.TYPE", method,
                   "DISTILLER.STUDENT", student, "DATASET.RESIZE", "48", *extra)
    trainer = tiny_trainer(cfg)
    network = getattr(trainer.distiller.student, "network", None)
    if network is not None:
        assert tuple(network.patch_embed.img_size) == (48, 48)
    seen = []
    record_inputs(trainer.distiller.student, seen)
    trainer.start_epoch(1)
    values = trainer.run_step(next(iter(trainer.train_loader)))
    assert values is not None and all(np.isfinite(list(values.values())))
    assert seen[0][0].shape[-2:] == (48, 48)
    test, _ = trainer.evaluate_epoch()
    assert test["count"] > 0 and seen[-1][0].shape[-2:] == (48, 48)


def test_the_teachers_test_pass_sees_the_resized_images(cifar_root, teacher_file, tmp_path):
    from mdistill.engine.builder import build_experiment
    from mdistill.engine.launch import evaluate_teacher
    experiment = build_experiment(tiny_cfg(cifar_root, tmp_path, teacher_file,
                                           "DATASET.RESIZE", "24"))
    seen = []
    record_inputs(experiment.distiller.teacher, seen)
    result = evaluate_teacher(experiment.distiller.teacher, "resnet20", experiment)
    assert result["count"] == len(experiment.data.test)
    assert seen and all(image.shape[-2:] == (24, 24) for image, _ in seen)


def test_resize_is_refused_naming_a_model_that_does_not_take_the_size():
    from mdistill.engine.combinations import check_resized_inputs
    from mdistill.models import build_model
    vit = build_model("timm:test_vit", 10, dataset="synthetic", image_size=32, small_input=True)
    student = build_model("resnet8", 10)
    cfg = get_cfg()
    cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT, cfg.DATASET.RESIZE = "timm:test_vit", "resnet8", 40
    distiller = SimpleNamespace(student=student, teacher_models=lambda: [vit])
    with pytest.raises(UserError, match=r"^DATASET.RESIZE 40: DISTILLER.TEACHER timm:test_vit "
                                        r"does not take 40x40 images \(Input height \(40\)"):
        check_resized_inputs(cfg, distiller)
    cfg.DATASET.RESIZE = 48
    check_resized_inputs(cfg, SimpleNamespace(student=student, teacher_models=lambda: []))


# --------------------------------------------------------------------- EMA
def test_ema_is_the_hand_computed_average_over_three_steps_and_skips_skipped_steps(
        cifar_root, teacher_file, tmp_path):
    cfg = tiny_cfg(cifar_root, tmp_path, teacher_file, "SOLVER.EMA.ENABLE", "True",
                   "SOLVER.EMA.DECAY", "0.75", "SOLVER.SKIP_NONFINITE_STEPS", "1")
    trainer = tiny_trainer(cfg)
    trainer.start_epoch(1)
    batches = iter(trainer.train_loader)
    students = []
    for _ in range(3):
        assert trainer.run_step(next(batches)) is not None
        students.append({key: value.double() if value.is_floating_point() else value.clone()
                         for key, value in trainer.distiller.student.state_dict().items()})
    expected = dict(students[0])           # timm's first update copies the student
    for student in students[1:]:
        expected = {key: 0.75 * expected[key] + 0.25 * student[key]
                    if student[key].is_floating_point() else student[key]
                    for key in expected}
    average = trainer.ema.module.state_dict()
    for key, value in expected.items():
        assert torch.allclose(average[key].to(value.dtype), value, atol=1e-6, rtol=0), key
    before = {key: value.clone() for key, value in average.items()}
    original = trainer.distiller.forward_train

    def poisoned(image, target, **batch):
        logits, losses = original(image, target, **batch)
        return logits, {name: value * float("nan") for name, value in losses.items()}
    trainer.distiller.forward_train = poisoned
    assert trainer.run_step(next(batches)) is None
    assert all(torch.equal(before[key], value)
               for key, value in trainer.ema.module.state_dict().items())


def test_a_stopped_and_resumed_run_with_ema_is_bit_identical(cifar_root, teacher_file, tmp_path,
                                                             monkeypatch):
    from mdistill.engine.launch import RunStopped, train
    from mdistill.engine.trainer import Trainer
    extra = ["SOLVER.EMA.ENABLE", "True", "SOLVER.EMA.DECAY", "0.9", "SOLVER.EMA.WARMUP", "True",
             "DATASET.MIXUP.ALPHA", "0.5", "DATASET.CUTMIX.ALPHA", "1.0",
             "SOLVER.WARMUP_EPOCHS", "1", "SOLVER.WARMUP_PER_ITER", "True"]

    def opts(prefix):
        return tiny_opts(cifar_root, prefix, "DISTILLER.TEACHER", "resnet20",
                         "DISTILLER.STUDENT", "resnet8", "DISTILLER.TEACHER_WEIGHTS",
                         teacher_file, "SOLVER.DETERMINISTIC", "True", "EXPERIMENT.NAME", "run",
                         *extra)
    reference_dir, _ = train(CONFIG, opts(tmp_path / "a"))
    run_step = Trainer.run_step

    def stop_after_third(self, batch):
        values = run_step(self, batch)
        if self.global_step == 3:
            self.stop_signal = signal.SIGTERM       # as the handler would record it
        return values
    monkeypatch.setattr(Trainer, "run_step", stop_after_third)
    with pytest.raises(RunStopped):
        train(CONFIG, opts(tmp_path / "b"))
    monkeypatch.setattr(Trainer, "run_step", run_step)
    resumed_dir, _ = train(CONFIG, opts(tmp_path / "b"), resume=True)
    assert resumed_dir != reference_dir
    for name in ("student_latest", "student_ema_latest", "student_ema_best"):
        reference = torch.load(os.path.join(reference_dir, name), weights_only=True)["model"]
        resumed = torch.load(os.path.join(resumed_dir, name), weights_only=True)["model"]
        assert all(torch.equal(reference[key], resumed[key]) for key in reference), name

    def ema_rows(run_dir):
        with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
            return [(row["train"]["loss"], row["test_ema"]) for row in map(json.loads, handle)]
    assert ema_rows(resumed_dir) == ema_rows(reference_dir)


def test_eval_picks_the_ema_checkpoint_of_a_run_folder(tmp_path):
    from mdistill.analysis.eval_runs import expand_paths
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "student_best").write_bytes(b"")
    with pytest.raises(UserError, match="has no student_ema_best or student_ema_latest "
                                        r"\(was it trained with SOLVER.EMA.ENABLE True\?\)"):
        expand_paths([str(run_dir)], ema=True)
    (run_dir / "student_ema_best").write_bytes(b"")
    assert expand_paths([str(run_dir)], ema=True) == [str(run_dir / "student_ema_best")]
    assert expand_paths([str(run_dir)]) == [str(run_dir / "student_best")]


def test_eval_reports_what_the_run_measured_for_the_student_and_its_ema(cifar_root, teacher_file,
                                                                        tmp_path):
    from mdistill.analysis.eval_runs import evaluate_checkpoints
    from mdistill.engine.launch import train
    run_dir, history = train(CONFIG, tiny_opts(
        cifar_root, tmp_path, "DISTILLER.TEACHER", "resnet20", "DISTILLER.STUDENT", "resnet8",
        "DISTILLER.TEACHER_WEIGHTS", teacher_file, "EXPERIMENT.NAME", "run", "SOLVER.EPOCHS", "1",
        "SOLVER.EMA.ENABLE", "True", "SOLVER.EMA.DECAY", "0.5", "DATASET.RESIZE", "24"))
    (student,) = evaluate_checkpoints([run_dir], device="cpu")
    (average,) = evaluate_checkpoints([run_dir], device="cpu", ema=True)
    assert average["path"].endswith("student_ema_best")
    assert student["loss"] == pytest.approx(history[-1]["test"]["loss"], rel=1e-5)
    assert average["loss"] == pytest.approx(history[-1]["test_ema"]["loss"], rel=1e-5)
    assert student["loss"] != pytest.approx(average["loss"], rel=1e-5)


# ------------------------------------------------------------------ warm-up
def solver(**values):
    node = get_cfg().SOLVER
    node.LR_SCHEDULER = "cosine"
    for key, value in values.items():
        setattr(node, key, value)
    return node


def cosine(epoch, epochs):
    return (1 + np.cos(np.pi * (epoch - 1) / epochs)) / 2


def test_warmup_multiplies_the_schedule_per_epoch_and_per_step():
    stages = [Stage("distill", 10)]
    per_epoch = solver(WARMUP_EPOCHS=4)
    for epoch in range(1, 8):
        expected = min(epoch / 4, 1.0) * cosine(epoch, 10)
        assert stage_lr_factor(per_epoch, stages, epoch) == pytest.approx(expected, abs=1e-12)
    per_step = solver(WARMUP_EPOCHS=4, WARMUP_PER_ITER=True)
    assert stage_lr_factor(per_step, stages, 2, progress=0.25) == pytest.approx(
        1.25 / 4 * cosine(2, 10), abs=1e-12)
    assert stage_lr_factor(per_step, stages, 5, progress=0.25) == pytest.approx(
        cosine(5, 10), abs=1e-12)


def test_the_trainer_warms_up_each_step(cifar_root, teacher_file, tmp_path):
    cfg = tiny_cfg(cifar_root, tmp_path, teacher_file, "SOLVER.WARMUP_EPOCHS", "2",
                   "SOLVER.WARMUP_PER_ITER", "True", "SOLVER.LR_SCHEDULER", "cosine")
    trainer = tiny_trainer(cfg)
    trainer.start_epoch(1)
    steps = len(trainer.train_loader)
    rates = []
    for batch in trainer.train_loader:
        trainer.run_step(batch)
        rates.append(trainer.optimizer.param_groups[0]["lr"])
    expected = [cfg.SOLVER.LR * (step / steps) / 2 for step in range(1, steps + 1)]
    assert rates == pytest.approx(expected, rel=1e-12)


def test_warmup_composes_with_resume_segments_and_leaves_init_stages_alone():
    stages = [Stage("init", 3, schedule=False), Stage("distill", 10)]
    warm = solver(WARMUP_EPOCHS=4)
    assert stage_lr_factor(warm, stages, 2) == 1.0                # the init stage
    assert stage_lr_factor(warm, stages, 4) == pytest.approx(0.25, abs=1e-12)
    # A resume that lengthened the stage from its epoch 3: factor 0.8 from there.
    segments = [(3, 0.8, 20)]
    assert stage_lr_factor(warm, stages, 6, segments) == pytest.approx(0.75 * 0.8, abs=1e-12)


# ----------------------------------------------------------- clip and decay
def test_clipping_is_by_global_norm_and_the_same_under_a_gradient_scaler():
    updates = []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        start = [param.detach().clone() for param in model.parameters()]
        rule = UPDATE_RULES.get("base")(solver(TYPE="SGD", LR=1.0, MOMENTUM=0.0,
                                               WEIGHT_DECAY=0.0, CLIP_GRAD=0.5))
        optimizer = rule.build_optimizer(model.parameters())
        scaler = torch.amp.GradScaler("cpu", enabled=enabled, init_scale=1024.0)
        loss = 100 * model(torch.ones(2, 4)).pow(2).sum()
        grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
        assert rule.backward_and_step({"loss": loss}, optimizer, scaler)
        update = [before - after.detach() for before, after in zip(start, model.parameters())]
        norm = torch.cat([value.flatten() for value in update]).norm()
        assert norm.item() == pytest.approx(0.5, rel=1e-5)
        total = torch.cat([grad.flatten() for grad in grads]).norm()
        for value, grad in zip(update, grads):
            assert torch.allclose(value, grad * 0.5 / total, atol=1e-6)
        updates.append(update)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*updates))


def test_clipping_is_refused_with_dot():
    with pytest.raises(UserError, match="^SOLVER.CLIP_GRAD 1.0 cannot be used with "
                                        "SOLVER.TRAINER dot"):
        UPDATE_RULES.get("dot")(solver(TRAINER="dot", CLIP_GRAD=1.0))


@pytest.mark.parametrize("kind", ["AdamW", "SGD"])
def test_no_decay_on_norms_and_biases(kind):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.Flatten(), torch.nn.Linear(4, 2))
    settings = solver(TYPE=kind, WEIGHT_DECAY=0.05, NO_DECAY_NORM_BIAS=True)
    optimizer = build_optimizer(settings, model.parameters())
    decay = {id(param): group["weight_decay"] for group in optimizer.param_groups
             for param in group["params"]}
    names = {name: decay[id(param)] for name, param in model.named_parameters()}
    assert names == {"0.weight": 0.05, "0.bias": 0.0, "1.weight": 0.0, "1.bias": 0.0,
                     "3.weight": 0.05, "3.bias": 0.0}
    settings.NO_DECAY_NORM_BIAS = False
    plain = build_optimizer(settings, model.parameters())
    assert [group["weight_decay"] for group in plain.param_groups] == [0.05]
