"""The stage protocol: a method's stages (RepDistiller's initialisation, then distillation)
run in one trainer, each with its own parameters and learning rate, and resume exactly."""
import json
import os

import pytest
import torch

from conftest import ROOT, tiny_opts
from mdistill.config import load_cfg
from mdistill.distillers.base import Stage
from mdistill.distillers.kd import KD
from mdistill.engine.builder import build_experiment
from mdistill.engine.trainer import Trainer, lr_factor
from mdistill.engine.launch import shutdown

CONFIG = os.path.join(ROOT, "configs/cifar100/kd.yaml")


class TwoStageKD(KD):
    """KD after an "init" stage that trains only the classifier on the KD loss,
    with the student's BatchNorm in eval mode and a constant learning rate."""

    def stages(self, epochs):
        return [Stage("init", 1, parameters=lambda: list(self.student.fc.parameters()),
                      lr=0.02, schedule=False, eval_modules=("student",)),
                Stage("distill", epochs)]

    def forward_train(self, image, target, **batch):
        logits, losses = super().forward_train(image, target, **batch)
        if self.stage == "init":
            return logits, {"loss_kd": losses["loss_kd"]}
        return logits, losses


def make(cifar_root, teacher_file, run_dir):
    cfg = load_cfg(CONFIG, tiny_opts(cifar_root, run_dir, "DISTILLER.TYPE", "KD",
                                     "DISTILLER.TEACHER", "resnet20", "DISTILLER.STUDENT",
                                     "resnet8", "DISTILLER.TEACHER_WEIGHTS", teacher_file,
                                     "SOLVER.DETERMINISTIC", "True", "SOLVER.EPOCHS", "2",
                                     "SOLVER.LR_DECAY_STAGES", "[1]"))
    torch.manual_seed(0)
    experiment = build_experiment(cfg)
    old = experiment.distiller
    experiment.distiller = TwoStageKD(old.student, old.teacher)
    os.makedirs(run_dir, exist_ok=True)
    return Trainer(experiment, str(run_dir), log=lambda text: None)


def test_stages_train_their_own_parameters_with_their_own_lr(cifar_root, teacher_file, tmp_path):
    trainer = make(cifar_root, teacher_file, tmp_path / "run")
    student = trainer.distiller.student
    before = {name: value.clone() for name, value in student.state_dict().items()}
    assert trainer.total_epochs == 3 and trainer.distiller.stage == "init"
    lrs = []
    trainer.phase_hook = lambda phase: lrs.append(trainer.optimizer.param_groups[0]["lr"])
    trainer.train_epoch()
    after = student.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"fc.weight", "fc.bias"}           # BN statistics too stayed put (eval)
    assert set(lrs) == {0.02}
    trainer.epoch += 1
    trainer.train_epoch()                               # distill, epoch 1 of 2: SOLVER.LR
    assert trainer.distiller.stage == "distill" and trainer.distiller.epoch == 1
    assert lrs[-1] == pytest.approx(0.05)
    assert len(trainer.optimizer.param_groups[0]["params"]) == len(list(student.parameters()))
    after = student.state_dict()
    assert not torch.equal(after["conv1.weight"], before["conv1.weight"])
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [record["stage"] for record in records] == ["init", "distill"]
    # "best" is chosen among the final stage's epochs only.
    assert trainer.best_acc == records[1]["test"]["top1"]


def test_a_two_stage_run_stopped_in_the_first_stage_resumes_exactly(cifar_root, teacher_file,
                                                                   tmp_path):
    whole = make(cifar_root, teacher_file, tmp_path / "whole")
    whole.train()

    first = make(cifar_root, teacher_file, tmp_path / "cut")
    steps = []

    def stop_after_two(phase):
        if phase == "step":
            steps.append(1)
            if len(steps) == 2:
                first.stop_signal = 15          # as SIGTERM: finish the step, checkpoint
    first.phase_hook = stop_after_two
    assert first.train() is None and first.epoch == 1 and first.distiller.stage == "init"

    resumed = make(cifar_root, teacher_file, tmp_path / "resumed")
    resumed.load_state_dict(torch.load(tmp_path / "cut" / "latest", weights_only=True))
    assert resumed.distiller.stage == "init" and resumed.mid_epoch
    resumed.train()
    final, expected = resumed.distiller.student.state_dict(), whole.distiller.student.state_dict()
    assert all(torch.equal(final[key], expected[key]) for key in expected)
    assert [r["train"]["loss"] for r in resumed.history] == \
        pytest.approx([r["train"]["loss"] for r in whole.history], rel=1e-6)


def test_lr_factor_follows_mdistiller_and_cosine():
    class Solver:
        LR_SCHEDULER, LR_DECAY_STAGES, LR_DECAY_RATE = "multistep", [150, 180, 210], 0.1
    assert [lr_factor(Solver, e, 240) for e in (1, 150, 151, 181, 211)] == \
        pytest.approx([1, 1, 0.1, 0.01, 0.001])
    Solver.LR_SCHEDULER = "cosine"
    assert [lr_factor(Solver, e, 4) for e in (1, 2, 3, 4)] == \
        pytest.approx([1.0, 0.853553, 0.5, 0.146447], rel=1e-5)
    assert lr_factor(Solver, 7, 10, schedule=False) == 1.0


def _ddp_stage_worker(rank, world, port, opts, out_path):
    from test_distributed import _join
    import torch.distributed as dist
    _join(rank, world, port)
    from mdistill.engine.launch import train
    train(CONFIG, opts)
    shutdown()
    if rank == 0:
        with open(out_path, "w") as handle:
            handle.write("ok")


def test_a_method_with_stages_trains_under_two_processes(cifar_root, teacher_file, tmp_path):
    # FSP's init stage leaves the student's classifier without a gradient: DDP must
    # be told that some parameters go unused, or the second step fails.
    import torch.multiprocessing as mp
    from test_distributed import free_port
    opts = tiny_opts(cifar_root, tmp_path, "DISTILLER.TYPE", "FSP", "DISTILLER.TEACHER",
                     "resnet20", "DISTILLER.STUDENT", "resnet8", "DISTILLER.TEACHER_WEIGHTS",
                     teacher_file, "SOLVER.EPOCHS", "1", "FSP.INIT_EPOCHS", "1")
    out = tmp_path / "done"
    mp.start_processes(_ddp_stage_worker, args=(2, free_port(), opts, str(out)), nprocs=2,
                       join=True, start_method="spawn")
    assert out.read_text() == "ok"
    records = [json.loads(line) for path in tmp_path.rglob("metrics.jsonl") for line in open(path)]
    assert [record["stage"] for record in records] == ["init", "distill"]
