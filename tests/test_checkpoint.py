"""Checkpoints: atomic writes survive SIGKILL, crafted pickles cannot run code."""
import errno
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from mdistill.engine.checkpoint import (extract_state_dict, load_checkpoint, load_model_weights,
                                        save_checkpoint)
from mdistill.errors import UserError

WRITER = """
import sys, torch
sys.path.insert(0, {root!r})
from mdistill.engine.checkpoint import save_checkpoint
version = 0
while True:
    version += 1
    # ~24 MB per file so a kill often lands in the middle of a write.
    save_checkpoint({{"version": version, "weights": torch.full((6_000_000,), float(version))}},
                    {path!r})
    print(version, flush=True)
"""


def test_kill_during_write_leaves_a_loadable_checkpoint(tmp_path):
    path = str(tmp_path / "latest")
    save_checkpoint({"version": 0, "weights": torch.zeros(6_000_000)}, path)
    kills, mid_write = 0, 0
    # Kills after a delay land anywhere; kills as soon as the writer's temporary file
    # appears land in the middle of a write. Go on until both kinds have happened.
    while kills < 4 or (mid_write == 0 and kills < 20):
        process = subprocess.Popen([sys.executable, "-c", WRITER.format(root=ROOT, path=path)],
                                   stdout=subprocess.PIPE, text=True)
        process.stdout.readline()           # at least one full write happened
        temporary = tmp_path / f".latest.tmp{process.pid}"
        if kills % 2:
            time.sleep(0.15 * kills)
        else:
            deadline = time.time() + 30
            while not temporary.exists() and time.time() < deadline:
                pass
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        # The temporary file exists only between its open() and the rename: a kill
        # that leaves it behind landed in the middle of a write.
        mid_write += temporary.exists()
        state = load_checkpoint(path)
        # Whatever version survived is whole: every element equals its version.
        assert torch.all(state["weights"] == float(state["version"]))
    assert mid_write >= 1, f"none of {kills} kills landed in the middle of a write"
    leftovers = [name for name in os.listdir(tmp_path) if name != "latest"]
    # A killed writer may leave its temporary file, never a corrupt "latest".
    assert all(name.startswith(".latest.tmp") for name in leftovers)


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = ""


def test_crafted_pickle_is_refused_and_its_code_never_runs(tmp_path):
    global MARKER
    MARKER = str(tmp_path / "code_ran")
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": RunsCode()}, path)
    with pytest.raises(UserError, match="refusing to load .*evil.pth: it asks to run posix.system"):
        load_checkpoint(str(path))
    assert not os.path.exists(MARKER)
    # A bare pickle (not a torch zip file) is refused too.
    with open(tmp_path / "evil.pkl", "wb") as handle:
        pickle.dump(RunsCode(), handle)
    with pytest.raises(UserError):
        load_checkpoint(str(tmp_path / "evil.pkl"))
    assert not os.path.exists(MARKER)


def test_not_a_checkpoint_and_missing_file(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="notes.txt is not a readable PyTorch checkpoint"):
        load_checkpoint(str(tmp_path / "notes.txt"))
    with pytest.raises(UserError, match="checkpoint not found: .*missing.pth"):
        load_checkpoint(str(tmp_path / "missing.pth"))


def test_disk_full_is_a_clear_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "latest"
    save_checkpoint({"version": 1}, str(path))

    def no_space(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("mdistill.engine.checkpoint.os.fsync", no_space)
    with pytest.raises(UserError, match="cannot write checkpoint .*latest: No space left"):
        save_checkpoint({"version": 2}, str(path))
    monkeypatch.undo()
    assert load_checkpoint(str(path))["version"] == 1
    assert os.listdir(tmp_path) == ["latest"]          # no temporary file left behind


def test_unwritable_destination_is_a_clear_error(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match="cannot write checkpoint .*a_file/latest"):
        save_checkpoint({"version": 1}, str(tmp_path / "a_file" / "latest"))


def test_extract_state_dict_accepts_the_known_layouts():
    weights = {"conv1.weight": torch.zeros(2), "fc.bias": torch.ones(1)}
    assert extract_state_dict({"model": weights}) == weights                    # mdistiller
    prefixed = {f"module.{key}": value for key, value in weights.items()}
    assert extract_state_dict({"model": prefixed}) == weights                   # DataParallel
    run = {f"student.{key}": value for key, value in weights.items()}
    run["regressor.weight"] = torch.zeros(3)
    assert extract_state_dict({"model": run, "epoch": 3}) == weights            # our run file
    with pytest.raises(UserError, match="holds no model weights"):
        extract_state_dict({"epoch": 3, "model": "nope"}, "x.pth")


def test_wrong_architecture_names_the_model_and_the_first_mismatch():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    state = {"0.weight": torch.zeros(5, 4), "0.bias": torch.zeros(3)}
    with pytest.raises(UserError, match=r"t.pth does not hold tiny weights: shape of 0.weight "
                                        r"is \(5, 4\), tiny needs \(3, 4\)"):
        load_model_weights(model, state, "tiny", "t.pth")
    with pytest.raises(UserError, match="missing 0.bias"):
        load_model_weights(model, {"0.weight": torch.zeros(3, 4)}, "tiny", "t.pth")
