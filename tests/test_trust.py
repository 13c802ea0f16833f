"""A run does what was asked: resume finds the right run, devices and keys that
would be silently ignored are refused or warned about."""
import json
import os

import pytest
import yaml

from conftest import ROOT, tiny_opts
from test_user_errors import run_train

KD = os.path.join(ROOT, "configs/cifar100/kd.yaml")


def kd_opts(cifar_root, prefix, teacher_file, *extra):
    return tiny_opts(cifar_root, prefix, "DISTILLER.TEACHER", "resnet20", "DISTILLER.STUDENT",
                     "resnet8", "DISTILLER.TEACHER_WEIGHTS", teacher_file, "SOLVER.EPOCHS", "1",
                     *extra)


def epochs_in(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return [json.loads(line)["epoch"] for line in handle]


def test_resume_finds_a_run_started_with_overrides_in_both_argument_orders(
        cifar_root, teacher_file, tmp_path, capsys):
    from mdistill.engine.launch import train
    opts = kd_opts(cifar_root, tmp_path, teacher_file)
    plain_dir, _ = train(KD, opts)                               # same config, no override
    run_dir, _ = train(KD, opts + ["KD.TEMPERATURE", "8"])
    assert run_dir != plain_dir and "TEMPERATURE=8" in os.path.basename(run_dir)
    # The options after the overrides: --resume is an option, not a key.
    code, err = run_train(["--cfg", KD, *opts, "KD.TEMPERATURE", "8", "SOLVER.EPOCHS", "2",
                           "--resume"], capsys)
    assert code == 0, err
    assert epochs_in(run_dir) == [1, 2] and epochs_in(plain_dir) == [1]
    # The options first. config.yaml now holds the new number of epochs.
    with open(os.path.join(run_dir, "config.yaml")) as handle:
        assert yaml.safe_load(handle)["SOLVER"]["EPOCHS"] == 2
    code, err = run_train(["--resume", "--cfg", KD, *opts, "KD.TEMPERATURE", "8",
                           "SOLVER.EPOCHS", "3"], capsys)
    assert code == 0, err
    assert epochs_in(run_dir) == [1, 2, 3] and epochs_in(plain_dir) == [1]


def test_resume_without_a_matching_run_names_the_closest_and_its_differences(
        cifar_root, teacher_file, tmp_path, capsys):
    from mdistill.engine.launch import train
    opts = kd_opts(cifar_root, tmp_path, teacher_file)
    run_dir, _ = train(KD, opts + ["KD.TEMPERATURE", "8"])
    code, err = run_train(["--cfg", KD, *opts, "KD.TEMPERATURE", "2", "--resume"], capsys)
    assert code == 2 and err.startswith("error: --resume: no run to resume")
    assert f"closest run's ({run_dir}) in KD.TEMPERATURE;" in err


def test_a_gpu_index_under_torchrun_is_refused_naming_local_rank(monkeypatch):
    from mdistill.engine.builder import resolve_device
    from mdistill.errors import UserError
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UserError, match=r"DEVICE 'cuda:1' under torchrun: .*LOCAL_RANK"):
        resolve_device("cuda:1")


@pytest.fixture()
def fresh_warnings(monkeypatch):
    import mdistill.config
    monkeypatch.setattr(mdistill.config, "_warned_ignored", set())


def test_keys_that_change_nothing_warn_once_naming_the_key_and_why(fresh_warnings, capsys):
    from mdistill.config import load_cfg
    load_cfg(KD, ["FITNET.INPUT_SIZE", "[64, 64]", "CRD.FEAT.STUDENT_DIM", "512"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "warning: FITNET.INPUT_SIZE is [64, 64] but is ignored: the shapes are probed from "
        "the models at the dataset's image size (the key is kept so mdistiller's YAML files "
        "load)",
        "warning: CRD.FEAT.STUDENT_DIM is 512 but is ignored: the embedding's input width is "
        "probed from the student's pooled feature (the key is kept so mdistiller's YAML "
        "files load)"]
    load_cfg(KD, ["FITNET.INPUT_SIZE", "[64, 64]", "CRD.FEAT.STUDENT_DIM", "512"])
    load_cfg(KD, ["CRD.FEAT.TEACHER_DIM", "256"])            # the default: nothing to say
    assert capsys.readouterr().err == ""


def _ignored_keys_of_registered_methods():
    from mdistill.config import IGNORED_KEYS
    from mdistill.distillers import DISTILLERS
    return [key for key in IGNORED_KEYS if key.split(".")[0] in DISTILLERS]


@pytest.mark.parametrize("key", _ignored_keys_of_registered_methods())
def test_ignored_keys_are_declared_and_really_change_nothing(key, fresh_warnings, capsys):
    import torch
    from mdistill.config import get_cfg, load_cfg
    from mdistill.engine.builder import build_experiment
    default = get_cfg()
    for part in key.split("."):
        default = default[part]
    changed = "[64, 64]" if isinstance(default, (list, tuple)) else str(default * 2)
    opts = ["DISTILLER.TYPE", key.split(".")[0], "DISTILLER.TEACHER", "resnet20",
            "DISTILLER.STUDENT", "resnet8", "DATASET.TYPE", "synthetic",
            "DATASET.SYNTHETIC.NUM_TRAIN", "64", "DATASET.SYNTHETIC.NUM_TEST", "16",
            "DATASET.NUM_WORKERS", "0", "DEVICE", "cpu", "CRD.NCE.K", "16"]
    shapes = []
    for extra in ([], [key, changed]):
        cfg = load_cfg(KD, opts + extra)
        torch.manual_seed(0)
        distiller = build_experiment(cfg, load_teacher_weights=False).distiller
        shapes.append({name: tuple(value.shape) for name, value in
                       distiller.state_dict().items()})
    assert shapes[0] == shapes[1]
    assert f"warning: {key} is " in capsys.readouterr().err


# ------------------------------------------------------------------ schedules on resume
def lrs(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return [json.loads(line)["lr"] for line in handle]


def test_a_resumed_cosine_schedule_anneals_on_from_the_rate_reached(cifar_root, teacher_file,
                                                                     tmp_path):
    import math
    from mdistill.engine.launch import train
    opts = kd_opts(cifar_root, tmp_path, teacher_file, "SOLVER.LR_SCHEDULER", "cosine",
                   "SOLVER.EPOCHS", "2", "EXPERIMENT.NAME", "cosine")
    run_dir, _ = train(KD, opts)
    train(KD, opts + ["SOLVER.EPOCHS", "4"], resume=True)
    lr = 0.05
    # Epochs 1-2 of a 2-epoch cosine; then from the rate of epoch 2 (0.5 of the base)
    # a cosine over the two epochs left (engine/schedule.py): 0.05, 0.025, 0.025, 0.0125.
    reached = (1 + math.cos(math.pi / 2)) / 2
    expected = [lr, lr * reached] + [lr * reached * (1 + math.cos(math.pi * (epoch - 3) / 2)) / 2
                                     for epoch in (3, 4)]
    assert lrs(run_dir) == pytest.approx(expected)
    assert all(later <= earlier for earlier, later in zip(lrs(run_dir), lrs(run_dir)[1:]))


def test_a_resumed_multistep_schedule_takes_new_milestones_only_after_the_epochs_run(
        cifar_root, teacher_file, tmp_path, capsys):
    from mdistill.engine.launch import train
    opts = kd_opts(cifar_root, tmp_path, teacher_file, "SOLVER.EPOCHS", "2",
                   "SOLVER.LR_DECAY_STAGES", "[1]", "EXPERIMENT.NAME", "steps")
    run_dir, _ = train(KD, opts)
    code, err = run_train(["--cfg", KD, *opts, "SOLVER.LR_DECAY_STAGES", "[2]", "--resume"],
                          capsys)
    assert code == 2 and err == (
        "error: --resume: SOLVER.LR_DECAY_STAGES [2] changes the learning rate of epoch 2, "
        "already run; only milestones after epoch 2 can change")
    code, err = run_train(["--cfg", KD, *opts, "SOLVER.EPOCHS", "1", "--resume"], capsys)
    assert code == 2 and "SOLVER.EPOCHS 1 gives 1 epochs but the run has reached epoch 2" in err
    train(KD, opts + ["SOLVER.EPOCHS", "4", "SOLVER.LR_DECAY_STAGES", "[1, 3]"], resume=True)
    assert lrs(run_dir) == pytest.approx([0.05, 0.005, 0.005, 0.0005])


# -------------------------------------------------------------- what a run shows of itself
def _trainer(cifar_root, teacher_file, run_dir, *extra, writer=None, log=None):
    from mdistill.config import load_cfg
    from mdistill.engine.builder import build_experiment
    from mdistill.engine.trainer import Trainer
    cfg = load_cfg(KD, kd_opts(cifar_root, run_dir, teacher_file, *extra))
    os.makedirs(run_dir, exist_ok=True)
    return Trainer(build_experiment(cfg), str(run_dir), writer=writer,
                   log=log or (lambda text: None))


def test_without_a_terminal_a_progress_line_every_print_freq_steps(cifar_root, teacher_file,
                                                                   tmp_path):
    import re
    lines = []
    trainer = _trainer(cifar_root, teacher_file, tmp_path, "LOG.PRINT_FREQ", "2",
                       log=lines.append)
    trainer.train()                         # under pytest stderr is not a terminal
    progress = [line for line in lines if " step " in line]
    # 160 images, batch 32: 5 steps; a line after steps 2 and 4.
    assert [line.split(" |")[0] for line in progress] == ["epoch 1/1 step 2/5",
                                                          "epoch 1/1 step 4/5"]
    for line in progress:
        assert re.fullmatch(r"epoch 1/1 step \d/5 \| loss \d+\.\d{4} \| lr 0\.05 \| \d+ img/s",
                            line), line


def test_hparams_are_written_when_the_run_starts(cifar_root, teacher_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter
    from mdistill.engine.trainer import TrainingStopped
    writer = SummaryWriter(str(tmp_path))
    trainer = _trainer(cifar_root, teacher_file, tmp_path, writer=writer)
    forward_train = trainer.distiller.forward_train

    def failing_forward(image, target, **batch):        # the run dies in its second step
        logits, losses = forward_train(image, target, **batch)
        if trainer.global_step == 1:
            losses["loss_kd"] = losses["loss_kd"] * float("nan")
        return logits, losses

    trainer.distiller.forward_train = failing_forward
    with pytest.raises(TrainingStopped):
        trainer.train()
    writer.close()
    accumulator = EventAccumulator(str(tmp_path))
    accumulator.Reload()
    plugins = accumulator.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in plugins
    assert "_hparams_/session_end_info" not in plugins           # it has not finished
    from tensorboard.plugins.hparams import plugin_data_pb2
    start = plugin_data_pb2.HParamsPluginData.FromString(
        plugins["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["method"].string_value == "KD"


def test_wandb_starts_before_the_tensorboard_writer_and_syncs_it(cifar_root, tmp_path,
                                                                 monkeypatch):
    import sys
    import types
    calls = []

    def init(**options):
        events = [name for name in os.listdir(options["dir"]) if "tfevents" in name]
        calls.append(("init", options["sync_tensorboard"], events))
        return types.SimpleNamespace(finish=lambda: calls.append(("finish",)))

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    from mdistill.engine.launch import train
    opts = tiny_opts(cifar_root, tmp_path, "DISTILLER.TYPE", "NONE", "DISTILLER.STUDENT",
                     "resnet8", "SOLVER.EPOCHS", "1", "LOG.WANDB", "True")
    run_dir, _ = train(KD, opts)
    # No event file existed when wandb started, so its TensorBoard sync saw the writer made.
    assert calls == [("init", True, []), ("finish",)]
    assert any("tfevents" in name for name in os.listdir(run_dir))


def test_with_amp_the_logged_accuracy_is_what_eval_py_reports(cifar_root, teacher_file,
                                                               tmp_path):
    import subprocess
    import sys
    from mdistill.engine.launch import train
    run_dir, history = train(KD, kd_opts(cifar_root, tmp_path, teacher_file, "SOLVER.AMP",
                                         "bf16"))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools/eval.py"),
                             os.path.join(run_dir, "student_best"), "--device", "cpu", "--json",
                             str(tmp_path / "eval.json")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "eval.json") as handle:
        (row,) = json.load(handle)
    # Both in fp32: the same predictions, and the same loss to float precision (a bf16
    # evaluation differs from fp32 in the loss's third digit).
    assert row["top1"] == history[-1]["test"]["top1"]
    assert row["loss"] == pytest.approx(history[-1]["test"]["loss"], rel=1e-5)


# ------------------------------------------------------------------------ SyncBatchNorm
def test_sync_bn_converts_every_batchnorm_the_method_trains(cifar_root, teacher_file,
                                                            tmp_path):
    import torch
    from mdistill.config import load_cfg
    from mdistill.engine.builder import build_experiment
    from mdistill.utils.dist import convert_sync_batchnorm
    cfg = load_cfg(KD, kd_opts(cifar_root, tmp_path, teacher_file, "DISTILLER.TYPE", "FITNET"))
    distiller = build_experiment(cfg).distiller
    trained = {name for name, module in distiller.named_modules()
               if isinstance(module, torch.nn.BatchNorm2d) and not name.startswith("teacher")}
    assert any(name.startswith("regressor") for name in trained)     # FitNet's own BN
    state = {key: value.clone() for key, value in distiller.state_dict().items()}
    convert_sync_batchnorm(distiller)
    kinds = {name: type(module) for name, module in distiller.named_modules()}
    assert all(kinds[name] is torch.nn.SyncBatchNorm for name in trained)
    assert all(kind is torch.nn.BatchNorm2d for name, kind in kinds.items()
               if name.startswith("teacher") and "bn" in name.split(".")[-1])
    after = distiller.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[key], state[key]) for key in state)


def test_sync_bn_on_cpu_processes_is_a_clear_error(cifar_root, teacher_file, tmp_path,
                                                    monkeypatch):
    import mdistill.engine.trainer
    from mdistill.errors import UserError
    monkeypatch.setattr(mdistill.engine.trainer, "is_distributed", lambda: True)
    with pytest.raises(UserError, match="SOLVER.SYNC_BN needs CUDA devices"):
        _trainer(cifar_root, teacher_file, tmp_path, "SOLVER.SYNC_BN", "True")
