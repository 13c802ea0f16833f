"""A run records the teacher it started with; --resume refuses a teacher whose weights
changed since, naming the file."""
import json
import os
import shutil

import torch

from conftest import ROOT, tiny_opts
from test_user_errors import run_train

KD = os.path.join(ROOT, "configs/cifar100/kd.yaml")


def test_resume_refuses_a_teacher_file_whose_weights_changed(cifar_root, teacher_file,
                                                             tmp_path, capsys):
    from mdistill.engine.launch import train
    from mdistill.engine.teacher_cache import teacher_fingerprint
    from mdistill.models import build_model
    weights = str(tmp_path / "teacher.pth")
    shutil.copy(teacher_file, weights)
    opts = tiny_opts(cifar_root, tmp_path / "out", "DISTILLER.TEACHER", "resnet20",
                     "DISTILLER.STUDENT", "resnet8", "DISTILLER.TEACHER_WEIGHTS", weights,
                     "SOLVER.EPOCHS", "1", "EXPERIMENT.NAME", "kd")
    run_dir, _ = train(KD, opts)
    with open(os.path.join(run_dir, "teacher.json")) as handle:
        [record] = json.load(handle)["teachers"]
    original = build_model("resnet20", 100)
    original.load_state_dict(torch.load(weights, weights_only=True)["model"])
    assert record == {"name": "resnet20", "weights": weights,
                      "fingerprint": teacher_fingerprint(original)}

    # The file is overwritten by another training of the teacher: one weight differs.
    state = torch.load(weights, weights_only=True)
    state["model"]["fc.bias"][0] += 1e-3
    torch.save(state, weights)
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        metrics = handle.read()
    code, err = run_train(["--cfg", KD, *opts, "SOLVER.EPOCHS", "2", "--resume"], capsys)
    changed = build_model("resnet20", 100)
    changed.load_state_dict(state["model"])
    assert code == 2 and err == (
        f"error: --resume: the teacher weights {weights} changed since the run started "
        f"(fingerprint {record['fingerprint'][:12]} then, {teacher_fingerprint(changed)[:12]} "
        f"now); put back the weights the run started with, or start a new run")
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        assert handle.read() == metrics                      # refused before anything ran

    # The weights put back: the run goes on.
    shutil.copy(teacher_file, weights)
    train(KD, opts + ["SOLVER.EPOCHS", "2"], resume=True)
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        assert [json.loads(line)["epoch"] for line in handle] == [1, 2]


def test_a_method_without_a_teacher_records_none(cifar_root, tmp_path):
    from mdistill.engine.launch import train
    opts = tiny_opts(cifar_root, tmp_path, "DISTILLER.TYPE", "NONE", "DISTILLER.STUDENT",
                     "resnet8", "SOLVER.EPOCHS", "1")
    run_dir, _ = train(KD, opts)
    assert not os.path.exists(os.path.join(run_dir, "teacher.json"))
