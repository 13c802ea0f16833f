"""Every user mistake: exit status 2, one line naming what to fix, nothing written."""
import hashlib
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_opts

_spec = importlib.util.spec_from_file_location("train_tool", os.path.join(ROOT, "tools/train.py"))
train_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_tool)
KD = os.path.join(ROOT, "configs/cifar100/kd.yaml")


def snapshot(folder):
    """Path -> content hash of every file under ``folder``."""
    result = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as handle:
                result[path] = hashlib.sha256(handle.read()).hexdigest()
    return result


@pytest.fixture()
def earlier_run(tmp_path):
    """An earlier run's outputs that a failing command must not touch."""
    folder = tmp_path / "out" / "cifar100_baselines" / "earlier"
    folder.mkdir(parents=True)
    torch.save({"model": {"w": torch.ones(2)}}, folder / "student_best")
    (folder / "config.yaml").write_text("SOLVER:\n  LR: 0.1\n")
    (folder / "metrics.jsonl").write_text('{"epoch": 1}\n')
    return tmp_path / "out"


def run_train(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        from mdistill.utils.cli import run_main
        run_main(train_tool.main, argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.err.strip()


def expect_error(argv, capsys, earlier_run, *fragments):
    before = snapshot(earlier_run)
    code, err = run_train(argv, capsys)
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert snapshot(earlier_run) == before          # nothing written, nothing changed
    return err


def base_opts(cifar_root, earlier_run, teacher_file, *extra):
    return tiny_opts(cifar_root, earlier_run, "DISTILLER.TEACHER", "resnet20",
                     "DISTILLER.STUDENT", "resnet8", "DISTILLER.TEACHER_WEIGHTS", teacher_file,
                     *extra)


def test_config_mistakes(tmp_path, capsys, earlier_run, cifar_root, teacher_file):
    opts = base_opts(cifar_root, earlier_run, teacher_file)
    expect_error(["--cfg", KD, *opts, "SOLVER.LEARNING_RATE", "0.1"], capsys, earlier_run,
                 "unknown config key SOLVER.LEARNING_RATE", "SOLVER.LR")
    expect_error(["--cfg", KD, *opts, "SOLVER.EPOCHS", "ten"], capsys, earlier_run,
                 "SOLVER.EPOCHS must be an integer")
    broken = tmp_path / "broken.yaml"
    broken.write_text("SOLVER:\n  LR: [0.1\n")
    expect_error(["--cfg", str(broken)], capsys, earlier_run, "broken.yaml", "not valid YAML")
    expect_error(["--cfg", str(tmp_path / "missing.yaml")], capsys, earlier_run,
                 "config file not found", "missing.yaml")
    (tmp_path / "a.yaml").write_text("_BASE_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_BASE_: a.yaml\n")
    expect_error(["--cfg", str(tmp_path / "a.yaml")], capsys, earlier_run, "_BASE_ cycle")


@pytest.mark.parametrize("key,value,fragments", [
    ("DISTILLER.STUDENT", "resnet9", ["unknown CIFAR model 'resnet9'", "resnet8"]),
    ("DISTILLER.TYPE", "KDD", ["unknown distiller 'KDD'", "KD"]),
    ("DATASET.TYPE", "cifar1000", ["unknown dataset 'cifar1000'", "cifar100"]),
    ("SOLVER.TYPE", "LBFGS", ["SOLVER.TYPE", "'LBFGS'", "SGD"]),
    ("SOLVER.LR_SCHEDULER", "linear", ["SOLVER.LR_SCHEDULER", "multistep", "cosine"]),
    ("DEVICE", "cuda", ["DEVICE 'cuda'", "CUDA is not available"]),
    ("SOLVER.AMP", "fp16", ["SOLVER.AMP fp16 needs a CUDA device", "bf16"]),
    ("SOLVER.BATCH_SIZE", "0", ["SOLVER.BATCH_SIZE must be positive"]),
])
def test_bad_names_and_settings(key, value, fragments, capsys, earlier_run, cifar_root,
                                teacher_file):
    if key == "DEVICE" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    opts = base_opts(cifar_root, earlier_run, teacher_file, key, value)
    expect_error(["--cfg", KD, *opts], capsys, earlier_run, *fragments)


def test_teacher_checkpoint_mistakes(tmp_path, capsys, earlier_run, cifar_root, teacher_file):
    missing = str(tmp_path / "nowhere.pth")
    expect_error(["--cfg", KD, *base_opts(cifar_root, earlier_run, missing)], capsys,
                 earlier_run, f"teacher checkpoint {missing} not found",
                 "configs/cifar100/vanilla/resnet20.yaml", "cifar_teachers")
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    expect_error(["--cfg", KD, *base_opts(cifar_root, earlier_run, str(text))], capsys,
                 earlier_run, "notes.pth is not a readable PyTorch checkpoint")
    # resnet20 weights given for a resnet32x4 teacher: name the architecture and the keys.
    opts = base_opts(cifar_root, earlier_run, teacher_file, "DISTILLER.TEACHER", "resnet32x4")
    expect_error(["--cfg", KD, *opts], capsys, earlier_run, "does not hold resnet32x4 weights")


def test_dataset_mistakes(tmp_path, capsys, earlier_run, teacher_file):
    empty = tmp_path / "empty"
    empty.mkdir()
    opts = base_opts(str(empty), earlier_run, teacher_file)
    expect_error(["--cfg", KD, *opts], capsys, earlier_run, str(empty / "cifar-100-python"),
                 "DATASET.DOWNLOAD")
    (empty / "cifar-100-python").mkdir()
    (empty / "cifar-100-python" / "train").write_bytes(b"\x80\x04garbage")
    (empty / "cifar-100-python" / "test").write_bytes(b"")
    (empty / "cifar-100-python" / "meta").write_bytes(b"")
    expect_error(["--cfg", KD, *opts], capsys, earlier_run, "cifar-100-python")


def test_resume_mistakes(tmp_path, capsys, earlier_run, cifar_root, teacher_file):
    opts = base_opts(cifar_root, earlier_run, teacher_file, "EXPERIMENT.NAME", "fresh")
    expect_error(["--cfg", KD, "--resume", *opts], capsys, earlier_run, "no run to resume",
                 os.path.join("cifar100_baselines", "fresh"))
    from mdistill.engine.launch import train
    run_dir, _ = train(KD, opts + ["SOLVER.EPOCHS", "1"])
    expect_error(["--cfg", KD, "--resume", *opts, "SOLVER.LR", "0.2", "KD.TEMPERATURE", "2"],
                 capsys, earlier_run, "config differs", "KD.TEMPERATURE", "SOLVER.LR")


def test_method_needs_features_the_model_lacks(capsys, earlier_run, cifar_root, teacher_file):
    opts = base_opts(cifar_root, earlier_run, teacher_file, "DISTILLER.TYPE", "FITNET",
                     "FITNET.HINT_LAYER", "9")
    expect_error(["--cfg", KD, *opts], capsys, earlier_run, "FITNET.HINT_LAYER")


def test_real_command_line_prints_one_line_and_debug_shows_the_traceback(tmp_path):
    command = [sys.executable, os.path.join(ROOT, "tools/train.py"), "--cfg",
               os.path.join(ROOT, "configs/cifar100/kd.yaml"), "SOLVER.LRR", "1"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown config key SOLVER.LRR; closest valid keys: SOLVER.LR, SOLVER.TRAINER, "
        "SOLVER.AMP"]
    result = subprocess.run(command + ["--debug"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr
