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
