"""tools/tune.py: the search space, the validation-only objective reported per epoch, a
study in a journal file shared and resumed, pruning, the best config as a YAML."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from mdistill.analysis.tune import TuneSettings, load_study, parse_space, tune
from mdistill.config import config_differences, load_cfg
from mdistill.errors import UserError

optuna = pytest.importorskip("optuna")

VANILLA = os.path.join(ROOT, "configs/cifar100/vanilla/resnet8.yaml")
TOOL = os.path.join(ROOT, "tools/tune.py")
# Ten synthetic classes, 64 training images of which a quarter is the validation split.
DATA = ["DATASET.TYPE", "synthetic", "DATASET.SYNTHETIC.NUM_TRAIN", "64",
        "DATASET.SYNTHETIC.NUM_TEST", "16", "DATASET.SYNTHETIC.NUM_CLASSES", "10",
        "DATASET.VAL_FRACTION", "0.25", "DATASET.NUM_WORKERS", "0", "DEVICE", "cpu",
        "SOLVER.BATCH_SIZE", "16", "SOLVER.EPOCHS", "2", "SOLVER.LR_DECAY_STAGES", "[1]"]
SPACE = ["SOLVER.LR=log:0.01:0.1", "SOLVER.MOMENTUM=choice:0.5,0.9"]


def read_metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def run_tool(*args, cwd=ROOT):
    return subprocess.run([sys.executable, TOOL, *map(str, args)], capture_output=True,
                          text=True, cwd=cwd)


def test_the_space_takes_four_kinds_and_refuses_the_rest():
    space = parse_space(["DKD.BETA=log:1:16", "DKD.T=int:1:8", "SOLVER.LR=float:0.01:0.1",
                         "KD.TEMPERATURE=choice:2,4,8"])
    assert [(d.kind, d.low, d.high, d.choices) for d in space.values()] == [
        ("log", 1.0, 16.0, ()), ("int", 1, 8, ()), ("float", 0.01, 0.1, ()),
        ("choice", None, None, (2, 4, 8))]
    for bad, message in (("DKD.BETA=log:0:16", "LOW > 0"), ("DKD.T=int:8:1", "below HIGH"),
                         ("DKD.T=normal:1:2", "KEY=log:LOW:HIGH"), ("DKD.T", "KEY=log"),
                         ("KD.TEMPERATURE=choice:4", "two or more"),
                         ("LOG.PREFIX=choice:a,b", "set by each trial")):
        with pytest.raises(UserError, match=message):
            parse_space([bad])


def test_without_a_validation_split_the_tool_refuses_in_one_line(tmp_path):
    opts = [value for value in DATA]
    opts[opts.index("DATASET.VAL_FRACTION") + 1] = "0"
    result = run_tool("--cfg", VANILLA, "--space", *SPACE, "--trials", 1, "--storage",
                      tmp_path / "s.journal", "--out", tmp_path / "out", *opts)
    assert result.returncode == 2
    assert result.stderr.startswith("error: DATASET.VAL_FRACTION is 0") and \
        len(result.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "s.journal") and not os.path.exists(tmp_path / "out")


def test_a_study_in_a_journal_file_is_shared_resumed_and_gives_a_config_that_trains(tmp_path):
    journal, out = tmp_path / "study.journal", tmp_path / "out"
    common = ("--cfg", VANILLA, "--space", *SPACE, "--storage", journal, "--out", out,
              "--seed", 0, *DATA)
    # Two workers (local submitit jobs) share the journal: one trial each.
    first = run_tool(*common, "--trials", 2, "--backend", "local", "--jobs", 2)
    assert first.returncode == 0, first.stdout + first.stderr
    settings = TuneSettings(VANILLA, parse_space(SPACE), DATA, str(journal), "resnet8", 2,
                            str(out))
    study = load_study(settings, create=False)
    assert [trial.state.name for trial in study.trials] == ["COMPLETE", "COMPLETE"]
    for trial in study.trials:
        records = read_metrics(trial.user_attrs["run_dir"])
        # Reported per epoch: the validation top-1 (never the test set's) of each epoch.
        assert trial.intermediate_values == {r["epoch"]: r["val"]["top1"] for r in records}
        assert trial.value == max(r["val"]["top1"] for r in records)
    assert len({trial.user_attrs["worker_pid"] for trial in study.trials}) == 2
    # The same command with --trials 3 resumes the study: one more trial, in this process.
    again = run_tool(*common, "--trials", 3, "--plot")
    assert again.returncode == 0, again.stdout + again.stderr
    study = load_study(settings, create=False)
    assert len(study.trials) == 3 and study.trials[2].state.name == "COMPLETE"
    assert "trial 2 (SOLVER.LR=" in again.stdout
    # The trials table and the best config, which loads as the best trial's config ...
    best = study.best_trial
    table = (out / "trials.md").read_text()
    assert table.splitlines()[2].startswith(f"| {best.number} | complete | {best.value:.2f} | 2 |")
    expected = load_cfg(VANILLA, DATA + [token for key, value in best.params.items()
                                         for token in (key, json.dumps(value))])
    assert config_differences(load_cfg(str(out / "best.yaml")), expected) == []
    import matplotlib.image
    for name in ("history", "intermediate", "slice"):
        assert matplotlib.image.imread(str(out / f"study_{name}.png")).ndim == 3
    # ... and trains with tools/train.py as it is.
    train = subprocess.run([sys.executable, os.path.join(ROOT, "tools/train.py"), "--cfg",
                            str(out / "best.yaml")], capture_output=True, text=True, cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    (run_dir,) = [os.path.join(root, "") for root, _, files in os.walk(tmp_path / "output")
                  if "metrics.jsonl" in files]
    assert len(read_metrics(run_dir)) == 2


def test_the_pruner_stops_a_trial_after_the_epoch_it_judged(tmp_path):
    settings = TuneSettings(VANILLA, parse_space(SPACE), DATA + ["SOLVER.EPOCHS", "50"],
                            str(tmp_path / "s.journal"), "pruned", 1, str(tmp_path / "out"),
                            poll_seconds=0.2)
    lines = []
    study = tune(settings, log=lines.append, pruner=optuna.pruners.ThresholdPruner(lower=101.0))
    (trial,) = study.trials
    # Judged on the first epoch's validation top-1 and stopped there: nothing else reported.
    assert trial.state.name == "PRUNED" and list(trial.intermediate_values) == [1]
    records = read_metrics(trial.user_attrs["run_dir"])
    assert trial.intermediate_values[1] == records[0]["val"]["top1"] and len(records) < 50
    with open(os.path.join(trial.user_attrs["run_dir"], "log.txt")) as handle:
        assert "stopped by signal 15" in handle.read()     # it saved and exited
    assert lines == [f"trial 0 (SOLVER.LR={trial.params['SOLVER.LR']:.4g}, SOLVER.MOMENTUM="
                     f"{trial.params['SOLVER.MOMENTUM']}): pruned after epoch 1"]
