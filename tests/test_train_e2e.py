"""A real two-epoch CPU run through tools/train.py: files, TensorBoard, resume, eval."""
import glob
import json
import os
import subprocess
import sys

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, tiny_opts
from mdistill.engine.launch import train


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def scalar_tags(run_dir):
    tags = set()
    for path in glob.glob(os.path.join(run_dir, "events.out.tfevents.*")):
        accumulator = EventAccumulator(path, size_guidance={"scalars": 0})
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    return tags


def test_kd_run_writes_everything_resumes_and_evaluates(cifar_root, teacher_file, tmp_path):
    opts = tiny_opts(cifar_root, tmp_path / "out", "DISTILLER.TEACHER", "resnet20",
                     "DISTILLER.STUDENT", "resnet8", "DISTILLER.TEACHER_WEIGHTS", teacher_file,
                     "EXPERIMENT.NAME", "kd_run")
    config = os.path.join(ROOT, "configs/cifar100/kd.yaml")
    run_dir, history = train(config, opts)
    assert run_dir == str(tmp_path / "out" / "cifar100_baselines" / "kd_run")
    for name in ("latest", "best", "student_latest", "student_best", "epoch_2", "config.yaml",
                 "log.txt", "metrics.jsonl"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    assert [record["epoch"] for record in history] == [1, 2]
    # The schedule decays after stage 1: epoch 2 runs at LR * 0.1.
    assert history[0]["lr"] == 0.05 and abs(history[1]["lr"] - 0.005) < 1e-12
    student = torch.load(os.path.join(run_dir, "student_best"), weights_only=True)
    assert set(student) >= {"model"} and "conv1.weight" in student["model"]
    tags = scalar_tags(run_dir)
    assert {"train/loss_ce", "train/loss_kd", "train/loss", "train/lr", "test/top1", "test/top5",
            "test/loss", "perf/images_per_sec", "hparam/best_top1"} <= tags

    # Resume to a third epoch: continues from the saved state, not from scratch.
    latest = torch.load(os.path.join(run_dir, "latest"), weights_only=True)
    assert latest["epoch"] == 2 and latest["global_step"] == 10   # 160 / 32 = 5 steps per epoch
    _, history = train(config, opts[:-2] + ["EXPERIMENT.NAME", "kd_run", "SOLVER.EPOCHS", "3"],
                       resume=True)
    assert [record["epoch"] for record in history] == [1, 2, 3]
    assert torch.load(os.path.join(run_dir, "latest"), weights_only=True)["global_step"] == 15
    assert [record["epoch"] for record in read_metrics(run_dir)] == [1, 2, 3]

    # tools/eval.py on student_best / student_latest gives the accuracy the run logged
    # as best / last (evaluation in the run used the BN running statistics, as eval does).
    metrics = read_metrics(run_dir)
    best = max(record["test"]["top1"] for record in metrics)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools/eval.py"),
                             os.path.join(run_dir, "student_best"),
                             os.path.join(run_dir, "student_latest"), "--device", "cpu",
                             "--json", str(tmp_path / "eval.json")],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "eval.json") as handle:
        best_row, last_row = json.load(handle)
    assert best_row["model"] == "resnet8" and abs(best_row["top1"] - best) < 1e-6
    assert abs(last_row["top1"] - metrics[-1]["test"]["top1"]) < 1e-6
    assert abs(last_row["loss"] - metrics[-1]["test"]["loss"]) < 1e-4
    assert f"{best:.2f}" in result.stdout


def test_wandb_without_the_package_is_a_warning_not_a_crash(cifar_root, tmp_path, capsys):
    import importlib.util
    if importlib.util.find_spec("wandb") is not None:
        import pytest
        pytest.skip("wandb is installed here")
    opts = tiny_opts(cifar_root, tmp_path, "DISTILLER.TYPE", "NONE", "DISTILLER.STUDENT",
                     "resnet8", "SOLVER.EPOCHS", "1", "LOG.WANDB", "True")
    run_dir, history = train(os.path.join(ROOT, "configs/cifar100/kd.yaml"), opts)
    assert [record["epoch"] for record in history] == [1]
    assert "warning: LOG.WANDB is true but wandb is not installed" in capsys.readouterr().out
    with open(os.path.join(run_dir, "log.txt")) as handle:
        assert "wandb is not installed" in handle.read()
