"""tools/sweep.py: expansion to tools/train.py's run names, submitit backends, status,
retries, requeue at a time limit, a run of two processes."""
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, tiny_opts
from mdistill.analysis.compare import load_runs, summarize
from mdistill.analysis.sweep import (Backend, SweepFiles, SweepRun, expand, format_status,
                                     launch, load_spec, parse_grid, sweep_status)
from mdistill.config import load_cfg
from mdistill.engine.launch import new_run_dir, train
from mdistill.errors import UserError

pytest.importorskip("submitit")

KD = os.path.join(ROOT, "configs/cifar100/kd.yaml")
VANILLA = os.path.join(ROOT, "configs/cifar100/vanilla/resnet8.yaml")
SWEEP = os.path.join(ROOT, "tools/sweep.py")


def sweep_opts(cifar_root, *extra):
    """tiny_opts without LOG.PREFIX (the sweep sets it): resnet20 -> resnet8, 2 epochs."""
    opts = tiny_opts(cifar_root, "unused", "DISTILLER.TEACHER", "resnet20",
                     "DISTILLER.STUDENT", "resnet8", *extra)
    index = opts.index("LOG.PREFIX")
    return opts[:index] + opts[index + 2:]


def read_metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def run_tool(*args, env=None):
    return subprocess.run([sys.executable, SWEEP, *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env)


# ------------------------------------------------------------------ expansion
def test_runs_are_named_and_placed_as_tools_train_places_them(tmp_path):
    out = tmp_path / "sweep"
    runs = expand([KD, VANILLA], {"SOLVER.LR": ["0.05", "0.1"]}, [0, 1],
                  ["SOLVER.EPOCHS", "3", "DISTILLER.TEACHER", "resnet20"], str(out))
    assert len(runs) == 2 * 2 * 2
    for run in runs:
        cfg = load_cfg(run.config, run.opts)
        # tools/train.py --cfg CONFIG <the same overrides> makes exactly this folder.
        assert run.folder == new_run_dir(cfg, run.opts)
        assert os.path.dirname(os.path.dirname(run.folder)) == str(out)
    names = [run.name for run in runs]
    assert names[:2] == ["kd,resnet20,resnet8x4,seed0,LR=0.05",
                         "kd,resnet20,resnet8x4,seed1,LR=0.05"]
    assert names[4] == "vanilla,resnet8,seed0,LR=0.05"
    assert runs[1].opts[-4:] == ["EXPERIMENT.SEED", "1", "LOG.PREFIX", str(out)]
    assert {run.epochs for run in runs} == {3}


def test_grid_values_keep_commas_inside_brackets():
    assert parse_grid(["SOLVER.LR_DECAY_STAGES=[30, 60],[40, 80]", "KD.TEMPERATURE=2,4"]) == {
        "SOLVER.LR_DECAY_STAGES": ["[30, 60]", "[40, 80]"], "KD.TEMPERATURE": ["2", "4"]}
    with pytest.raises(UserError, match="KEY=VALUE1,VALUE2"):
        parse_grid(["KD.TEMPERATURE"])


@pytest.mark.parametrize("grid, seeds, overrides, message", [
    ({}, [0], ["LOG.PREFIX", "elsewhere"], "LOG.PREFIX is set by the sweep"),
    ({}, [0, 1], ["EXPERIMENT.SEED", "3"], "EXPERIMENT.SEED is set by --seeds"),
    ({"KD.TEMPERATURE": ["2"]}, [0], ["KD.TEMPERATURE", "4"], "both in the grid and in the"),
    ({}, [0, 1], ["EXPERIMENT.NAME", "same"], "would share the folder"),
    ({"KD.TEMPRATURE": ["2"]}, [0], [], "KD.TEMPRATURE"),
])
def test_a_sweep_that_cannot_run_is_refused_before_any_job(tmp_path, grid, seeds, overrides,
                                                            message):
    with pytest.raises(UserError, match=message):
        expand([KD], grid, seeds, overrides, str(tmp_path))
    assert not os.path.exists(tmp_path / ".sweep")


def test_a_spec_file_gives_configs_grid_seeds_and_overrides(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(f"configs: [{KD}]\ngrid: {{KD.TEMPERATURE: [2, 8]}}\nseeds: [3]\n"
                    f"overrides: {{SOLVER.EPOCHS: 5, SOLVER.LR_DECAY_STAGES: [2, 4]}}\n")
    spec = load_spec(str(path))
    assert spec == {"configs": [KD], "grid": {"KD.TEMPERATURE": ["2", "8"]}, "seeds": [3],
                    "overrides": ["SOLVER.EPOCHS", "5", "SOLVER.LR_DECAY_STAGES", "[2, 4]"]}
    runs = expand(spec["configs"], spec["grid"], spec["seeds"], spec["overrides"], str(tmp_path))
    assert [run.name for run in runs] == ["kd,resnet32x4,resnet8x4,seed3,TEMPERATURE=2,"
                                          "LR_DECAY_STAGES=2-4",
                                          "kd,resnet32x4,resnet8x4,seed3,TEMPERATURE=8,"
                                          "LR_DECAY_STAGES=2-4"]
    assert load_cfg(runs[1].config, runs[1].opts).SOLVER.LR_DECAY_STAGES == [2, 4]
    path.write_text("config: [a.yaml]\n")
    with pytest.raises(UserError, match="unknown entries"):
        load_spec(str(path))


# ------------------------------------------------------------------- backends
def test_a_2x2_grid_runs_tabulates_and_is_skipped_when_launched_again(cifar_root, tmp_path):
    out = tmp_path / "grid"
    grid = ("--grid", "SOLVER.LR=0.05,0.1", "SOLVER.MOMENTUM=0.9,0.5")
    opts = sweep_opts(cifar_root, "SOLVER.EPOCHS", "1")
    result = run_tool("--cfg", VANILLA, *grid, "--backend", "debug", "--out", out, *opts)
    assert result.returncode == 0, result.stderr
    runs = load_runs([str(out)])
    assert len(runs) == 4
    groups = summarize(runs, warn=lambda text: None)
    assert sorted(group.label for group in groups) == [
        f"student alone (SOLVER.LR={lr}, SOLVER.MOMENTUM={momentum})"
        for lr in ("0.05", "0.1") for momentum in ("0.5", "0.9")]
    # --status: each run done, with the top-1 of its own metrics.jsonl.
    status = run_tool("--status", out)
    assert status.returncode == 0, status.stderr
    for run in runs:
        (record,) = read_metrics(run.path)
        key = os.path.relpath(run.path, out)
        top1 = f"{record['test']['top1']:.2f}"
        assert f"| {key} | done | 1 | {top1} | {top1} |  |" in status.stdout
    assert status.stdout.rstrip().endswith("4 done")
    # Launched again: nothing runs; each run is skipped as done.
    again = run_tool("--cfg", VANILLA, *grid, "--backend", "debug", "--out", out, *opts)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count(": done") == 4 and "nothing to launch" in again.stdout
    assert "run folder:" not in again.stdout


def test_a_failed_run_does_not_stop_the_others_and_is_retried(cifar_root, teacher_file,
                                                              tmp_path):
    out, weights = tmp_path / "sweep", tmp_path / "teacher.pth"   # no teacher file yet
    opts = sweep_opts(cifar_root, "DISTILLER.TEACHER_WEIGHTS", str(weights), "SOLVER.EPOCHS",
                      "1")
    result = run_tool("--cfg", KD, VANILLA, "--backend", "local", "--jobs", "2", "--out", out,
                      *opts)
    assert result.returncode == 1, result.stderr
    assert "FAILED cifar100_baselines/kd,resnet20,resnet8,seed0" in result.stdout
    statuses = {status.key.split("/")[1].split(",")[0]: status
                for status in sweep_status(str(out))}
    assert statuses["vanilla"].state == "done" and statuses["vanilla"].epochs_done == 1
    assert statuses["kd"].state == "failed" and str(weights) in statuses["kd"].note
    shown = run_tool("--status", out).stdout
    assert "| failed |" in shown and statuses["kd"].note in shown
    # The teacher file arrives; only the failed run is launched again, and finishes.
    shutil.copy(teacher_file, weights)
    retry = run_tool("--retry-failed", out)
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert "skip cifar100_vanilla/vanilla,resnet8,seed0" in retry.stdout
    assert [status.state for status in sweep_status(str(out))] == ["done", "done"]
    assert [status.attempt for status in sweep_status(str(out))] == [2, 1]


class PausingRun(SweepRun):
    """A run whose second training step, in the first process to reach it, waits for
    a signal: the time limit's SIGUSR2 then always comes in the middle of a step."""

    def __call__(self):
        from mdistill.distillers import DISTILLERS
        method = DISTILLERS.get("KD")
        forward_train, calls = method.forward_train, []
        marker = os.path.join(self.out, "paused")

        def pausing_forward_train(distiller, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2 and not os.path.exists(marker):
                open(marker, "w").close()
                signal.pause()      # until the controller's SIGUSR2 ahead of the time limit
            return forward_train(distiller, *args, **kwargs)

        method.forward_train = pausing_forward_train
        try:
            return super().__call__()
        finally:
            method.forward_train = forward_train


def epoch_losses(folder):
    return [(row["epoch"], row["train"]["loss"], row["test"]["loss"])
            for row in read_metrics(folder)]


def test_a_run_stopped_by_its_time_limit_is_requeued_and_ends_bit_identical(
        cifar_root, teacher_file, tmp_path, monkeypatch):
    opts = sweep_opts(cifar_root, "DISTILLER.TEACHER_WEIGHTS", teacher_file,
                      "SOLVER.DETERMINISTIC", "True", "SOLVER.EPOCHS", "2")
    reference, _ = train(KD, opts + ["LOG.PREFIX", str(tmp_path / "reference")])
    out = str(tmp_path / "sweep")
    (run,) = expand([KD], {}, None, opts, out)
    # The job's processes unpickle PausingRun from this module.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([os.path.join(ROOT, "tests"), ROOT]))
    # SIGUSR2 comes 20 s before the 30 s limit; however slow the start, the paused step
    # waits for it (an early one stops an earlier step: one more requeue, same result).
    backend = Backend("local", time_limit=0.5, signal_delay=20, max_requeues=10)
    result = launch([run], out, backend, run_class=PausingRun, log=lambda text: None)
    assert result["failed"] == [] and result["stopped"] == [], result
    assert os.path.exists(os.path.join(out, "paused"))
    with open(os.path.join(run.folder, "log.txt")) as handle:
        log = handle.read()
    # The trainer saved at the end of the step it was in, and the requeued job resumed.
    assert "stopped by signal 15 at epoch" in log and "resumed from" in log
    (status,) = sweep_status(out)
    assert status.state == "done" and status.attempt >= 2
    assert epoch_losses(run.folder) == epoch_losses(reference)
    ours = torch.load(os.path.join(run.folder, "student_latest"), weights_only=True)["model"]
    theirs = torch.load(os.path.join(reference, "student_latest"), weights_only=True)["model"]
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)


def test_a_run_of_two_processes_joins_through_submitits_environment(cifar_root, tmp_path):
    out = str(tmp_path / "sweep")
    (run,) = expand([VANILLA], {}, [0], sweep_opts(cifar_root, "SOLVER.EPOCHS", "1"), out)
    result = launch([run], out, Backend("local", gpus_per_run=2), log=lambda text: None)
    assert result["failed"] == [], result
    with open(os.path.join(run.folder, "log.txt")) as handle:
        assert "(2 process(es), device cpu" in handle.read()
    (status,) = sweep_status(out)
    assert status.state == "done" and status.epochs_done == 1


def test_status_reads_each_runs_state_and_whether_its_job_lives(tmp_path):
    out = str(tmp_path / "sweep")
    runs = expand([KD], {}, [0, 1, 2, 3], ["SOLVER.EPOCHS", "5"], out)
    files = SweepFiles(out)
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()            # a process id that no longer runs
    jobs = {"host": socket.gethostname(), "driver_pid": os.getpid()}
    manifest = {"backend": {"name": "local"}, "runs": {
        run.key: {**vars(run), "jobs": [{"job_id": "1", "after_attempt": attempt, **jobs}]}
        for run, attempt in zip(runs, (0, 0, 0, 1))}}
    files.write_manifest(manifest)
    os.makedirs(runs[0].folder)
    with open(os.path.join(runs[0].folder, "metrics.jsonl"), "w") as handle:
        handle.write(json.dumps({"epoch": 1, "test": {"top1": 12.5}}) + "\n")
    with open(os.path.join(runs[0].folder, "config.yaml"), "w") as handle:
        handle.write(load_cfg(runs[0].config, runs[0].opts).dump())
    files.write_state(runs[0].key, "running", pid=os.getpid())             # this process
    files.write_state(runs[1].key, "running", pid=ended.pid)               # gone
    files.write_state(runs[2].key, "failed", error="UserError: no such file")
    # runs[3]: its state (attempt 1) predates its last job: it waits for that job.
    files.write_state(runs[3].key, "failed", error="an older failure")
    states = [(status.state, status.epochs_done, status.best_top1, status.note)
              for status in sweep_status(out)]
    assert states == [("running", 1, 12.5, ""),
                      ("failed", 0, None, "the job ended without a word"),
                      ("failed", 0, None, "UserError: no such file"),
                      ("queued", 0, None, "")]
    table = format_status(sweep_status(out))
    assert "| running at epoch 2 | 1 | 12.50 | 12.50 |" in table
    assert table.endswith("1 running, 2 failed, 1 queued")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_local_driver_saves_every_run_and_a_relaunch_resumes(
        cifar_root, teacher_file, tmp_path, monkeypatch, signum):
    out = str(tmp_path / "sweep")
    opts = sweep_opts(cifar_root, "DISTILLER.TEACHER_WEIGHTS", teacher_file, "SOLVER.EPOCHS",
                      "2")
    (run,) = expand([KD], {}, [0], opts, out)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([os.path.join(ROOT, "tests"), ROOT]))
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, out, json.dumps(vars(run))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The run's second step waits for a signal: the one SIGTERM the driver forwards.
    wait_for_file(os.path.join(out, "paused"), driver)
    driver.send_signal(signum)
    stdout, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 128 + signum, stdout + stderr
    (status,) = sweep_status(out)
    assert status.state == "stopped" and "signal 15" in status.note
    with open(os.path.join(run.folder, "log.txt")) as handle:
        assert "stopped by signal 15 at epoch 1" in handle.read()
    # Launched again (in this process), the run resumes from that checkpoint.
    result = launch([run], out, Backend("debug"), log=lambda text: None)
    assert result["launched"] == [run.key] and result["failed"] == []
    with open(os.path.join(run.folder, "log.txt")) as handle:
        assert "resumed from" in handle.read()
    assert [record["epoch"] for record in read_metrics(run.folder)] == [1, 2]


# A local sweep driver whose run pauses in its second step.
DRIVER = """
import json, sys
from mdistill.analysis.sweep import Backend, RunSpec, exit_code, launch
from test_sweep import PausingRun
run = RunSpec(**json.loads(sys.argv[2]))
sys.exit(exit_code(launch([run], sys.argv[1], Backend("local"), run_class=PausingRun,
                          poll_seconds=0.2)))
"""


def wait_for_file(path, process, timeout=300):
    """Until ``path`` exists (the run writes it, then waits for a signal)."""
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.1)


FAKE_SBATCH = """#!/bin/sh
cp "$1" {copy}
echo "Submitted batch job 4242"
"""


def test_slurm_backend_submits_one_array_with_the_options(tmp_path, monkeypatch):
    bin_dir, copy = tmp_path / "bin", tmp_path / "submitted.sh"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(copy=copy))
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = str(tmp_path / "sweep")
    runs = expand([KD], {}, [0, 1, 2], ["SOLVER.EPOCHS", "3"], out)
    backend = Backend("slurm", jobs=2, gpus_per_run=4, time_limit=600, partition="gpu",
                      sbatch={"mem": "64G", "exclusive": True}, signal_delay=180)
    lines = []
    result = launch(runs, out, backend, log=lines.append)
    assert len(result["launched"]) == 3
    script = copy.read_text()
    for flag in ("--array=0-2%2", "--partition=gpu", "--gpus-per-node=4",
                 "--ntasks-per-node=4", "--nodes=1", "--time=600", "--signal=USR2@180",
                 "--mem=64G", "--exclusive", "--job-name=mdistill"):
        assert f"#SBATCH {flag}" in script, flag
    assert "SLURM array 4242 (at most 2 at once)" in lines[-1]
    # Without sacct nothing says more than "queued".
    assert [(status.state, status.attempt) for status in sweep_status(out)] == [("queued", 0)] * 3
    with open(os.path.join(out, ".sweep", "runs.json")) as handle:
        manifest = json.load(handle)
    assert [entry["jobs"][-1]["job_id"] for entry in manifest["runs"].values()] == [
        "4242_0", "4242_1", "4242_2"]
    with pytest.raises(UserError, match="--time-limit MINUTES"):
        Backend("slurm")
