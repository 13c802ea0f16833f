"""Faults: SIGKILL and resume is exact, SIGTERM checkpoints, non-finite losses stop cleanly."""
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, tiny_opts
from mdistill.engine.launch import train

CONFIG = os.path.join(ROOT, "configs/cifar100/kd.yaml")


def run_opts(cifar_root, prefix, teacher_file, *extra):
    return tiny_opts(cifar_root, prefix, "DISTILLER.TEACHER", "resnet20", "DISTILLER.STUDENT",
                     "resnet8", "DISTILLER.TEACHER_WEIGHTS", teacher_file,
                     "SOLVER.DETERMINISTIC", "True", "SOLVER.EPOCHS", "3",
                     "LOG.SAVE_EVERY_N_ITERS", "1", "EXPERIMENT.NAME", "run", *extra)


def start(opts, cwd, *flags):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "tools/train.py"), *flags,
                             "--cfg", CONFIG, *opts], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_step(run_dir, step, timeout=120):
    """Wait until the run's `latest` checkpoint is at least at ``step``."""
    path = os.path.join(run_dir, "latest")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path):
            try:
                if torch.load(path, weights_only=True)["global_step"] >= step:
                    return
            except Exception:       # being replaced right now: look again
                pass
        time.sleep(0.05)
    raise AssertionError(f"the run never reached step {step}")


def epoch_losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return [(row["epoch"], row["train"]["loss"], row["test"]["loss"])
                for row in map(json.loads, handle)]


def weights(run_dir):
    return torch.load(os.path.join(run_dir, "student_latest"), weights_only=True)["model"]


def test_sigkill_then_resume_equals_an_uninterrupted_run(cifar_root, teacher_file, tmp_path):
    reference_dir, _ = train(CONFIG, run_opts(cifar_root, tmp_path / "a", teacher_file))
    killed_dir = str(tmp_path / "b" / "cifar100_baselines" / "run")
    rng = random.Random(0)
    for kill_after in (2, 7):            # mid-epoch 1, then mid-epoch 2 of the resumed run
        opts = run_opts(cifar_root, tmp_path / "b", teacher_file)
        process = start(opts, tmp_path, *(["--resume"] if kill_after > 2 else []))
        wait_for_step(killed_dir, kill_after)
        time.sleep(rng.uniform(0, 0.05))
        process.send_signal(signal.SIGKILL)
        process.wait()
    _, history = train(CONFIG, run_opts(cifar_root, tmp_path / "b", teacher_file), resume=True)
    assert epoch_losses(killed_dir) == epoch_losses(reference_dir)
    reference, resumed = weights(reference_dir), weights(killed_dir)
    assert all(torch.equal(reference[key], resumed[key]) for key in reference)
    # TensorBoard: the resumed event files continue; no step is logged twice in the end.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(killed_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    steps = [event.step for event in accumulator.Scalars("train/loss")]
    assert steps == list(range(1, 16))


def test_sigterm_finishes_the_step_checkpoints_and_resumes(cifar_root, teacher_file, tmp_path):
    opts = run_opts(cifar_root, tmp_path, teacher_file, "SOLVER.EPOCHS", "50")
    run_dir = str(tmp_path / "cifar100_baselines" / "run")
    process = start(opts, tmp_path)
    wait_for_step(run_dir, 3)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    assert "stopped by signal 15" in out and "--resume" in out
    state = torch.load(os.path.join(run_dir, "latest"), weights_only=True)
    stopped_at = state["global_step"]
    assert stopped_at >= 3
    _, history = train(CONFIG, opts + ["SOLVER.EPOCHS", str(state["epoch"])], resume=True)
    assert torch.load(os.path.join(run_dir, "latest"),
                      weights_only=True)["global_step"] == 5 * state["epoch"]


def test_sigint_exits_130_after_saving(cifar_root, teacher_file, tmp_path):
    opts = run_opts(cifar_root, tmp_path, teacher_file, "SOLVER.EPOCHS", "50")
    run_dir = str(tmp_path / "cifar100_baselines" / "run")
    process = start(opts, tmp_path)
    wait_for_step(run_dir, 2)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "stopped by signal 2" in out and "Traceback" not in err
    assert torch.load(os.path.join(run_dir, "latest"), weights_only=True)["global_step"] >= 2


# A run whose second training step blocks for a minute, after writing a marker file.
SLOW_STEP = """
import os, runpy, sys, time
sys.path.insert(0, {root!r})
from mdistill.distillers import DISTILLERS
method = DISTILLERS.get("NONE")
forward_train = method.forward_train
calls = []
def slow_forward_train(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        open({marker!r}, "w").close()
        time.sleep(60)
    return forward_train(self, *args, **kwargs)
method.forward_train = slow_forward_train
sys.argv = ["train.py", "--cfg", {config!r}, *{opts!r}]
runpy.run_path({tool!r}, run_name="__main__")
"""


def test_a_second_signal_exits_at_once_without_saving(tmp_path):
    marker = str(tmp_path / "in_step_2")
    opts = ["DATASET.TYPE", "synthetic", "DATASET.SYNTHETIC.NUM_TRAIN", "64",
            "DATASET.SYNTHETIC.NUM_TEST", "16", "DATASET.SYNTHETIC.NUM_CLASSES", "10",
            "DATASET.NUM_WORKERS", "0", "DEVICE", "cpu", "SOLVER.BATCH_SIZE", "16",
            "LOG.PREFIX", str(tmp_path), "EXPERIMENT.NAME", "run", "LOG.SAVE_EVERY_N_ITERS", "1"]
    script = SLOW_STEP.format(root=ROOT, marker=marker, opts=opts,
                              config=os.path.join(ROOT, "configs/cifar100/vanilla/resnet8.yaml"),
                              tool=os.path.join(ROOT, "tools/train.py"))
    process = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not os.path.exists(marker) and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert os.path.exists(marker), process.communicate()[1]
    process.send_signal(signal.SIGINT)          # first: stop after this step...
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)         # ...second: leave now, mid-step
    out, err = process.communicate(timeout=30)  # far less than the step's minute
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "stopped by signal" not in out
    # Nothing was saved after the first step: the blocked step never finished.
    state = torch.load(tmp_path / "cifar100_vanilla" / "run" / "latest", weights_only=True)
    assert state["global_step"] == 1


def _poison(trainer, at_step, name="loss_kd"):
    """Make the distiller return a NaN loss from optimizer step ``at_step`` on."""
    original = trainer.distiller.forward_train

    def forward_train(image, target, **batch):
        logits, losses = original(image, target, **batch)
        if trainer.global_step + 1 >= at_step:
            losses[name] = losses[name] * float("nan")
        return logits, losses

    trainer.distiller.forward_train = forward_train


def _trainer(cifar_root, teacher_file, run_dir, *extra):
    from mdistill.config import load_cfg
    from mdistill.engine.builder import build_experiment
    from mdistill.engine.trainer import Trainer
    cfg = load_cfg(CONFIG, run_opts(cifar_root, run_dir, teacher_file, *extra))
    os.makedirs(run_dir, exist_ok=True)
    return Trainer(build_experiment(cfg), str(run_dir), log=lambda text: None)


def test_non_finite_loss_stops_naming_the_term_and_keeps_the_checkpoint(cifar_root, teacher_file,
                                                                        tmp_path):
    from mdistill.engine.trainer import TrainingStopped
    trainer = _trainer(cifar_root, teacher_file, tmp_path)
    _poison(trainer, at_step=4)
    with pytest.raises(TrainingStopped, match=r"loss loss_kd is not finite at epoch 1, step 4; "
                                              r"stopping"):
        trainer.train()
    latest = tmp_path / "latest"
    digest = hashlib.sha256(latest.read_bytes()).hexdigest()
    state = torch.load(latest, weights_only=True)
    assert state["global_step"] == 3                   # the last good step
    assert all(torch.isfinite(value).all() for value in state["model"].values()
               if value.is_floating_point())
    assert hashlib.sha256(latest.read_bytes()).hexdigest() == digest


def test_non_finite_steps_can_be_skipped_up_to_a_limit(cifar_root, teacher_file, tmp_path):
    from mdistill.engine.trainer import TrainingStopped
    trainer = _trainer(cifar_root, teacher_file, tmp_path, "SOLVER.SKIP_NONFINITE_STEPS", "2")
    before = {key: value.clone() for key, value in trainer.distiller.student.state_dict().items()}
    _poison(trainer, at_step=1)
    with pytest.raises(TrainingStopped, match="step 1; stopping"):
        trainer.train()                                 # the third bad step stops the run
    assert trainer.skipped_steps == 3 and trainer.global_step == 0
    after = trainer.distiller.student.state_dict()
    # Skipped steps change nothing (BN statistics aside, which the forward updates).
    assert all(torch.equal(before[key], after[key]) for key in before if "running" not in key
               and "num_batches" not in key)
