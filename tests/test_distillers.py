"""Every registered distiller through the real trainer, and every config file builds.

Method-specific behaviour and loss formulas: test_distiller_losses.py."""
import glob
import os
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, tiny_opts
from mdistill.config import load_cfg
from mdistill.distillers import DISTILLERS, build_distiller
from mdistill.engine.builder import build_experiment
from mdistill.engine.trainer import Trainer
from mdistill.models import build_model

CONFIG = os.path.join(ROOT, "configs/cifar100/kd.yaml")


#: Students for methods that need one the zoo has not (DeiT's distillation token).
STUDENT_FOR = {"DEIT": ["DISTILLER.STUDENT", "timm:deit_tiny_distilled_patch16_224",
                        "MODEL.SMALL_INPUT", "True"]}


def make_trainer(method, cifar_root, teacher_file, run_dir, *extra):
    opts = tiny_opts(cifar_root, run_dir, "DISTILLER.TYPE", method, "DISTILLER.TEACHER",
                     "resnet20", "DISTILLER.STUDENT", "resnet8", "DISTILLER.TEACHER_WEIGHTS",
                     teacher_file, "CRD.NCE.K", "64", "CRD.FEAT.DIM", "16",
                     # ReviewKD's lists default to resnet32x4 -> resnet8x4's widths.
                     "REVIEWKD.IN_CHANNELS", "[16, 32, 64, 64]",
                     "REVIEWKD.OUT_CHANNELS", "[16, 32, 64, 64]",
                     *STUDENT_FOR.get(method, ()), *extra)
    experiment = build_experiment(load_cfg(CONFIG, opts))
    os.makedirs(run_dir, exist_ok=True)
    return Trainer(experiment, str(run_dir), log=lambda text: None)


def two_steps(trainer, stage=0):
    """Two training steps at the start of the method's ``stage`` (an index into its stages)."""
    trainer.start_epoch(1 + sum(previous.epochs for previous in trainer.stages[:stage]))
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
    for index, stage in enumerate(trainer.stages):     # one for most methods
        distiller.zero_grad(set_to_none=True)
        values = two_steps(trainer, index)
        assert all(v is not None and all(map(torch.isfinite, map(torch.tensor, v.values())))
                   for v in values)
        # Gradients reach every module the stage trains, and no parameter it leaves alone ...
        trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
        for name, module in distiller.trainable_named_modules():
            if any(id(p) in trained for p in module.parameters()):
                assert any(p.grad is not None and p.grad.abs().sum() > 0
                           for p in module.parameters()), (stage.name, name)
        assert all(p.grad is None for p in distiller.get_learnable_parameters()
                   if id(p) not in trained), stage.name
    # ... the whole student in the last stage ...
    assert all(p.grad is not None for p in distiller.student.parameters())
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
    assert fresh.global_step == trainer.global_step and fresh.train_loader.position == 2


def is_sweep_spec(path):
    """A tools/sweep.py spec (its configs, seeds, overrides), not an experiment."""
    with open(path) as handle:
        return any(line.startswith("configs:") for line in handle)


CONFIGS = sorted(path for path in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"),
                                           recursive=True)
                 if os.path.basename(path) != "_base_.yaml" and not is_sweep_spec(path))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_config_loads_and_builds_its_distiller(path):
    cfg = load_cfg(path)
    imagenet = cfg.DATASET.TYPE == "imagenet"
    classes = 1000 if imagenet else 10 if cfg.DATASET.TYPE == "digits" else 100
    # Built as the builder builds them: for the images the models are fed.
    size = cfg.DATASET.RESIZE or cfg.DATASET.IMAGE_SIZE or (224 if imagenet else 32)
    data = SimpleNamespace(num_classes=classes, image_size=size,
                           train_targets=torch.arange(200) % classes)
    dataset, options = cfg.DATASET.TYPE, {"small_input": cfg.MODEL.SMALL_INPUT}
    student = build_model(cfg.DISTILLER.STUDENT, classes, dataset=dataset, image_size=size,
                          **options)
    method = DISTILLERS.get(cfg.DISTILLER.TYPE)
    teacher = build_model(cfg.DISTILLER.TEACHER, classes, dataset=dataset, image_size=size,
                          **options) if method.requires_teacher else None
    distiller = build_distiller(cfg, student, teacher, data)
    assert isinstance(distiller, method)
