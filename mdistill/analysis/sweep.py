"""Many runs from one command: configs x grid x seeds, as SLURM or local jobs.

A sweep expands to runs named as ``tools/train.py`` names them
(:func:`~mdistill.config.default_run_name`), with ``LOG.PREFIX`` set to the
sweep's folder, so ``tools/compare.py DIR`` tabulates it directly::

    DIR/<EXPERIMENT.PROJECT>/<run name>/   each run: config.yaml, metrics.jsonl, log.txt, latest
    DIR/.sweep/runs.json                   the sweep: each run's config and overrides, its jobs
    DIR/.sweep/state/<project>/<name>.json each run's state, as its job last wrote it
    DIR/.sweep/jobs/<job id>/              submitit's pickles and each job's stdout/stderr

(the folder starting with a dot is one ``tools/compare.py`` does not walk into).

Every job is a :class:`SweepRun`, a callable submitit runs. It trains in its
own process through :func:`mdistill.engine.launch.train`, resuming from the
run's ``latest`` checkpoint when there is one, so a job that SLURM requeues
after preemption, or that submitit requeues at its time limit, goes on where
the run stopped. On a run of several processes (one per GPU) each task joins
the process group from submitit's job environment
(``submitit.helpers.TorchDistributedEnvironment``), the variables torchrun
would set.

Who saves at a time limit: SLURM (``--signal=USR2@<delay>``) and submitit's
local controller send SIGUSR2 ahead of the limit, and submitit's handler would
checkpoint and requeue right away, in the middle of an optimizer step. A
:class:`SweepRun` takes SIGUSR2 first and hands it to the trainer as its
SIGTERM: the step finishes, the trainer writes its exact mid-epoch ``latest``
and stops (:class:`~mdistill.engine.launch.RunStopped`); only then is
submitit's handler called, whose :meth:`SweepRun.checkpoint` resubmits the
same run, which resumes from that ``latest``. A SIGTERM of its own
(``scancel``, a preemption without requeue, Ctrl-C through the local driver)
saves the same way and ends the job as "stopped"; launching the sweep again
resumes it.

Example::

    runs = expand(["configs/cifar100/kd.yaml"], {"KD.TEMPERATURE": ["2", "4"]}, [0, 1],
                  ["SOLVER.EPOCHS", "240"], "output/sweep_kd")
    launch(runs, "output/sweep_kd", Backend("local", jobs=2))
    print(format_status(sweep_status("output/sweep_kd")))
"""
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime

import yaml

from ..config import default_run_name, flatten_cfg, get_cfg, load_cfg
from ..errors import UserError
from .compare import load_runs

BACKENDS = ("local", "slurm", "debug")
SWEEP_FOLDER = ".sweep"
# Keys the sweep sets itself: the folder from --out, the seed from --seeds.
RESERVED_KEYS = ("LOG.PREFIX",)
# What a finished run's state file says, and the states of a run that ended unfinished.
DONE = "done"
UNFINISHED = ("failed", "stopped", "not started")
# SLURM's states of a job that is still waiting or running (sacct's words).
SLURM_ALIVE = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING",
               "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED")


def _now():
    return datetime.now().isoformat(timespec="seconds")


def _write_json(path, value):
    """Write atomically: a reader (``--status``) never sees half a file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as handle:
        json.dump(value, handle, indent=1, sort_keys=True)
    os.replace(temporary, path)


def _read_json(path):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------ expansion
@dataclass
class RunSpec:
    """One run of a sweep.

    Attributes:
        config: the YAML file (absolute path).
        opts: every ``KEY VALUE`` override of the run, as ``tools/train.py``
            would be given them (the grid's, the common ones, the seed, LOG.PREFIX).
        project, name: ``EXPERIMENT.PROJECT`` and the run's folder name.
        folder: ``<sweep folder>/<project>/<name>``.
        epochs: its SOLVER.EPOCHS (a run done with fewer is resumed to these).
    """
    config: str
    opts: list
    project: str
    name: str
    folder: str
    epochs: int

    @property
    def key(self):
        return entry_key(asdict(self))


def split_values(text):
    """``"1,2,[30, 60]"`` -> ``["1", "2", "[30, 60]"]``: commas inside brackets stay."""
    values, depth, current = [], 0, ""
    for character in text:
        if character in "[{(":
            depth += 1
        elif character in "]})":
            depth -= 1
        if character == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += character
    values.append(current.strip())
    return values


def parse_grid(items):
    """``["KD.TEMPERATURE=2,4", ...]`` -> ``{"KD.TEMPERATURE": ["2", "4"], ...}``.

    Raises:
        UserError: an item without ``=``, an empty value, or a key given twice.
    """
    grid = {}
    for item in items or ():
        key, equals, text = item.partition("=")
        key = key.strip()
        if not equals or not key:
            raise UserError(f"--grid {item!r}: write KEY=VALUE1,VALUE2 (e.g. KD.TEMPERATURE=2,4)")
        values = split_values(text)
        if any(value == "" for value in values):
            raise UserError(f"--grid {item!r}: an empty value; write KEY=VALUE1,VALUE2")
        if key in grid:
            raise UserError(f"--grid names {key} twice; give all its values in one KEY=V1,V2")
        grid[key] = values
    return grid


def value_text(value):
    """A YAML value as the text of a command-line override (which is parsed as YAML)."""
    return value if isinstance(value, str) else json.dumps(value)


def load_spec(path):
    """Read a sweep spec file.

    The file is YAML with any of ``configs`` (a list of files, relative to the
    current folder as ``--cfg`` is), ``grid`` (``{KEY: [values]}``), ``seeds``
    (a list) and ``overrides`` (``{KEY: value}``)::

        configs: [configs/cifar100/kd.yaml, configs/cifar100/dkd.yaml]
        grid: {SOLVER.LR: [0.05, 0.1]}
        seeds: [0, 1, 2]
        overrides: {SOLVER.EPOCHS: 240}

    Returns:
        ``{"configs": [...], "grid": {KEY: [text]}, "seeds": [...] or None,
        "overrides": [KEY, VALUE, ...]}``, values as override text.

    Raises:
        UserError: an unreadable file, an unknown entry, or an entry of the wrong kind.
    """
    try:
        with open(path) as handle:
            values = yaml.safe_load(handle) or {}
    except OSError as error:
        raise UserError(f"--spec {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise UserError(f"--spec {path}: not YAML ({str(error).splitlines()[0]})") from None
    known = ("configs", "grid", "seeds", "overrides")
    if not isinstance(values, dict) or set(values) - set(known):
        extra = sorted(set(values) - set(known)) if isinstance(values, dict) else values
        raise UserError(f"--spec {path}: unknown entries {extra}; a spec has {', '.join(known)}")
    configs = values.get("configs") or []
    if isinstance(configs, str):
        configs = [configs]
    grid = values.get("grid") or {}
    overrides = values.get("overrides") or {}
    seeds = values.get("seeds")
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise UserError(f"--spec {path}: grid maps each KEY to a non-empty list of values")
    if not isinstance(overrides, dict):
        raise UserError(f"--spec {path}: overrides maps KEY to a value")
    if seeds is not None and (not isinstance(seeds, list)
                              or not all(isinstance(seed, int) for seed in seeds)):
        raise UserError(f"--spec {path}: seeds is a list of whole numbers")
    return {"configs": [str(config) for config in configs],
            "grid": {str(key): [value_text(value) for value in grid_values]
                     for key, grid_values in grid.items()},
            "seeds": seeds,
            "overrides": [text for key, value in overrides.items()
                          for text in (str(key), value_text(value))]}


def expand(configs, grid, seeds, overrides, out):
    """The runs of a sweep: every config x every grid point x every seed.

    Each run's overrides are the grid point's, then ``overrides``, then
    ``EXPERIMENT.SEED`` and ``LOG.PREFIX out``; its folder is the one
    ``tools/train.py`` would make for them. Every config is loaded here, so a
    bad key or value stops the sweep before any job starts.

    Args:
        configs: YAML files.
        grid: ``{KEY: [value text, ...]}`` (an empty dict: one point).
        seeds: seeds, or None/empty for each config's own EXPERIMENT.SEED.
        overrides: ``[KEY, VALUE, ...]`` applied to every run.
        out: the sweep's folder.

    Returns:
        A list of :class:`RunSpec`, configs outermost, seeds innermost.

    Raises:
        UserError: no config, a missing file, a key the sweep sets itself
            (LOG.PREFIX; EXPERIMENT.SEED with ``seeds``), a key both in the grid
            and the overrides, a bad key or value, or two runs that would share
            a folder.
    """
    if not configs:
        raise UserError("no configs: give --cfg FILE [FILE ...] or a --spec file listing them")
    overrides = list(overrides or [])
    if len(overrides) % 2:
        raise UserError(f"overrides come as KEY VALUE pairs; {overrides[-1]!r} has no value")
    common = dict(zip(overrides[::2], overrides[1::2]))
    for key in list(grid) + list(common):
        if key in RESERVED_KEYS:
            raise UserError(f"{key} is set by the sweep; choose the folder with --out")
        if key == "EXPERIMENT.SEED" and seeds:
            raise UserError("EXPERIMENT.SEED is set by --seeds; give the seeds there")
    both = sorted(set(grid) & set(common))
    if both:
        raise UserError(f"{', '.join(both)} is both in the grid and in the overrides; give it once")
    out = os.path.abspath(out)
    points = [list(zip(grid, values)) for values in itertools.product(*grid.values())]
    runs, by_folder = [], {}
    for config in configs:
        if not os.path.isfile(config):
            raise UserError(f"no config file {config}")
        for point in points:
            for seed in (seeds or [None]):
                opts = [text for pair in point for text in pair] + overrides
                if seed is not None:
                    opts += ["EXPERIMENT.SEED", str(seed)]
                opts += ["LOG.PREFIX", out]
                cfg = load_cfg(config, opts, warn_ignored=False)
                name = cfg.EXPERIMENT.NAME or default_run_name(cfg, opts)
                folder = os.path.join(out, cfg.EXPERIMENT.PROJECT, name)
                run = RunSpec(os.path.abspath(config), opts, cfg.EXPERIMENT.PROJECT, name,
                              folder, int(cfg.SOLVER.EPOCHS))
                if folder in by_folder:
                    other = by_folder[folder]
                    raise UserError(
                        f"two runs of the sweep would share the folder {folder}: {other.config} "
                        f"{' '.join(other.opts[:-2])} and {config} {' '.join(opts[:-2])}; give "
                        f"the configs different EXPERIMENT.PROJECT values or drop "
                        f"EXPERIMENT.NAME")
                by_folder[folder] = run
                runs.append(run)
    return runs


# A config key (DEVICE, SOLVER.LR, or anything dotted in capitals, so a misspelt key
# reaches the config's own error): it and the token after it are an override
# wherever they stand, so they never end up in --cfg's or --grid's list.
DOTTED_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")


def separate_overrides(argv):
    """``(options, overrides)``: every ``KEY VALUE`` pair pulled out of a command
    line, wherever it stands (so ``--cfg A.yaml SOLVER.LR 0.1`` does not hand the
    override to ``--cfg``'s list of files)."""
    keys = set(flatten_cfg(get_cfg()))
    options, overrides, index = [], [], 0
    while index < len(argv):
        token = argv[index]
        if token in keys or DOTTED_KEY.match(token):
            if index + 1 == len(argv):
                raise UserError(f"overrides come as KEY VALUE pairs; {token!r} has no value")
            overrides += [token, argv[index + 1]]
            index += 2
        else:
            options.append(token)
            index += 1
    return options, overrides


# ---------------------------------------------------------------------- files
class SweepFiles:
    """Where a sweep keeps its own records (``DIR/.sweep``)."""

    def __init__(self, out):
        self.out = os.path.abspath(out)
        self.root = os.path.join(self.out, SWEEP_FOLDER)
        self.manifest_path = os.path.join(self.root, "runs.json")
        self.jobs = os.path.join(self.root, "jobs")

    def state_path(self, key):
        return os.path.join(self.root, "state", key + ".json")

    def read_state(self, key):
        return _read_json(self.state_path(key))

    def write_state(self, key, state, **values):
        previous = self.read_state(key) or {}
        attempt = previous.get("attempt", 0) + (1 if state == "running" else 0)
        record = {"state": state, "time": _now(), "attempt": max(attempt, 1), **values}
        _write_json(self.state_path(key), record)
        return record

    def read_manifest(self):
        manifest = _read_json(self.manifest_path)
        if manifest is None:
            raise UserError(f"{self.out} holds no sweep (no {self.manifest_path}); launch one "
                            f"with tools/sweep.py --cfg FILE --out {self.out}")
        return manifest

    def write_manifest(self, manifest):
        _write_json(self.manifest_path, manifest)


# ------------------------------------------------------------------- the job
def _one_line(error):
    lines = [line for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if not isinstance(error, UserError):
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text[:400]


def _job_id():
    """The submitit job id inside a job (None outside one)."""
    try:
        import submitit
        return str(submitit.JobEnvironment().job_id)
    except Exception:           # not in a submitit job, or no submitit: no id to report
        return None


class SweepRun:
    """One run of a sweep, as the callable of a submitit job.

    It trains the run, or resumes it from its ``latest`` checkpoint when the
    folder has one, and writes the run's state file (running, done, failed,
    stopped, requeued) from its first process. See the module docstring for
    how SIGUSR2 (time limit, preemption) and SIGTERM are shared with the trainer.

    Args:
        run: a :class:`RunSpec`.
        out: the sweep's folder.
    """

    def __init__(self, run, out):
        self.run = run
        self.out = out
        self._preempted = False

    # submitit requeues a callable that has this method: the same run again, which
    # finds the `latest` the trainer has just saved.
    def checkpoint(self, *args, **kwargs):
        """The submission to requeue after a time limit or preemption: this run again."""
        from submitit.helpers import DelayedSubmission
        fresh = type(self)(self.run, self.out)
        return DelayedSubmission(fresh, *args, **kwargs)

    def __call__(self):
        from ..engine.launch import RunStopped, shutdown, train
        files, run = SweepFiles(self.out), self.run
        self._join_job_environment()
        main = os.environ.get("RANK", "0") == "0"
        resume = run.folder if os.path.isfile(os.path.join(run.folder, "latest")) else None
        if main:
            files.write_state(run.key, "running", job_id=_job_id(), host=socket.gethostname(),
                              pid=os.getpid(), resumed=resume is not None, epochs=run.epochs)
            if resume is None:
                _set_aside(run.folder)
        outside_training = signal.getsignal(signal.SIGTERM)
        submitit_handler = self._take_preemption_signal(outside_training)
        try:
            try:
                run_dir, _ = train(run.config, list(run.opts), resume=resume)
            except RunStopped as stopped:
                if not (self._preempted and callable(submitit_handler)):
                    if main:
                        files.write_state(run.key, "stopped", epochs=run.epochs,
                                          signal=stopped.signal, error=str(stopped))
                    raise
                shutdown()
                # The trainer has saved: submitit's own handler now. It calls
                # checkpoint() and requeues (exiting); on the processes after the
                # first it does nothing, and they leave here.
                submitit_handler(_preemption_signal(), None)
                raise SystemExit(stopped.exit_code) from None
        except BaseException as error:
            if main and not isinstance(error, RunStopped):
                # A SystemExit after SIGUSR2 is submitit requeueing the job.
                requeued = self._preempted and isinstance(error, SystemExit)
                files.write_state(run.key, "requeued" if requeued else "failed",
                                  epochs=run.epochs, error="" if requeued else _one_line(error))
            raise
        finally:
            if submitit_handler is not None:
                signal.signal(_preemption_signal(), submitit_handler)
            shutdown()
        result = {"run_dir": run_dir}
        if main:
            result.update(_top1(run_dir))
            files.write_state(run.key, DONE, epochs=run.epochs, **result)
        return result

    def _join_job_environment(self):
        """Export RANK, WORLD_SIZE, MASTER_ADDR, ... for a job of several tasks, as
        torchrun would; on the local backend also leave the terminal's process group,
        so a Ctrl-C reaches the sweep's driver, which sends each run one SIGTERM."""
        executor = os.environ.get("SUBMITIT_EXECUTOR", "")
        if executor == "local":
            with contextlib.suppress(OSError):
                os.setpgrp()
        try:
            import submitit
            tasks = submitit.JobEnvironment().num_tasks
        except Exception:       # not inside a submitit job (called directly): one process
            return
        if tasks > 1:
            from submitit.helpers import TorchDistributedEnvironment
            # Each task keeps every GPU of the job in sight and picks LOCAL_RANK's, as
            # under torchrun (init_distributed), so CUDA_VISIBLE_DEVICES is left alone.
            TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)

    def _take_preemption_signal(self, outside_training):
        """Install the SIGUSR2 handler that lets the trainer save first; returns
        the handler it replaces (submitit's), or None where none can be set."""
        def on_preemption(signum, frame):
            self._preempted = True
            current = signal.getsignal(signal.SIGTERM)
            if callable(current) and current is not outside_training:
                current(signal.SIGTERM, frame)  # the trainer's: finish the step, save, stop
            elif callable(previous):
                previous(signum, frame)         # not training: nothing to save, requeue now
        try:
            previous = signal.signal(_preemption_signal(), on_preemption)
        except ValueError:      # not the main thread: no handlers
            return None
        return previous


def _preemption_signal():
    """The signal submitit uses for time limits and preemption (SIGUSR2 unless
    SUBMITIT_PREEMPT_SIGNAL says otherwise)."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


def _set_aside(folder):
    """Move a run folder without a checkpoint (a start that failed) out of the way,
    so the new start gets the same name; compare and status skip hidden folders."""
    if not os.path.exists(folder):
        return
    parent, name = os.path.split(folder)
    number = 1
    while os.path.exists(os.path.join(parent, f".{name}.failed-{number}")):
        number += 1
    os.replace(folder, os.path.join(parent, f".{name}.failed-{number}"))


def _top1(folder):
    """``{"best_top1", "last_top1", "epochs_done"}`` of a run folder (empty when
    it has no finished epoch)."""
    try:
        (run,) = load_runs([folder], warn=lambda text: None)
    except (UserError, ValueError):
        return {}
    return {"best_top1": run.best_top1, "last_top1": run.last_top1,
            "epochs_done": len(run.records)}


# ------------------------------------------------------------------- status
@dataclass
class RunStatus:
    """Where one run of a sweep stands.

    Attributes:
        key: ``<project>/<name>``.
        state: ``not started``, ``queued``, ``running``, ``requeued``, ``done``,
            ``failed`` or ``stopped``.
        epochs_done: finished epochs in its metrics.jsonl.
        best_top1, last_top1: test top-1 of its best and last epochs (None
            before the first epoch).
        note: the error line of a failed run, the signal of a stopped one, ...
    """
    key: str
    state: str
    epochs_done: int = 0
    epochs: int = 0
    best_top1: float = None
    last_top1: float = None
    note: str = ""
    attempt: int = 0

    @property
    def in_flight(self):
        return self.state in ("queued", "running", "requeued")


def _alive(job, backend):
    """True when the job still runs or waits, False when it ended, None when unknown."""
    if not job or not job.get("job_id"):
        return None
    if backend in ("local", "debug"):
        if job.get("host") != socket.gethostname():
            return None
        # The local driver waits for every job it starts: a job lives while it does.
        for pid in (job.get("driver_pid"), job.get("pid")):
            if pid is None:
                continue
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                pass
        return True
    if shutil.which("sacct") is None:
        return None
    try:
        import submitit
        state = submitit.SlurmJob(job.get("folder", "."), job["job_id"]).state
    except Exception:           # sacct unreachable: cannot tell
        return None
    if state.upper().startswith("UNKNOWN"):
        return None
    return state.upper().split()[0] in SLURM_ALIVE


def last_line(path):
    """The last non-blank line of a text file ("" when there is none)."""
    try:
        with open(path, errors="replace") as handle:
            lines = [line.strip() for line in handle if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def _job_log(files, job):
    """The stderr file submitit keeps for a job's first task."""
    if not job or not job.get("job_id"):
        return ""
    job_id = job["job_id"]
    return os.path.join(files.jobs, job_id, f"{job_id}_0_log.err")


def run_status(files, entry, backend):
    """The :class:`RunStatus` of one manifest entry."""
    key = entry_key(entry)
    state = files.read_state(key)
    job = (entry.get("jobs") or [None])[-1]
    top1 = _top1(entry["folder"]) if os.path.isdir(entry["folder"]) else {}
    status = RunStatus(key, "not started", top1.get("epochs_done", 0), entry.get("epochs", 0),
                       top1.get("best_top1"), top1.get("last_top1"))
    if state is None or (job and state.get("attempt", 0) <= job.get("after_attempt", 0)):
        # Submitted again since its state was written: it waits for its new job.
        alive = _alive(job, backend)
        status.state = "not started" if job is None or alive is False else "queued"
        if state is not None:
            status.attempt = state.get("attempt", 0)
        return status
    status.attempt = state.get("attempt", 0)
    status.state = state["state"]
    if status.state == DONE and state.get("epochs", status.epochs) != status.epochs:
        status.state, status.note = "stopped", (f"done with SOLVER.EPOCHS {state.get('epochs')}; "
                                                f"launch again to resume to {status.epochs}")
    elif status.state in ("running", "requeued"):
        alive = _alive({**(job or {}), "pid": state.get("pid")}, backend)
        if alive is False:
            status.state = "failed"
            status.note = last_line(_job_log(files, job)) or "the job ended without a word"
        elif status.state == "requeued":
            status.note = "requeued after a time limit or preemption"
    elif status.state == "failed":
        status.note = state.get("error") or last_line(_job_log(files, job))
    elif status.state == "stopped":
        status.note = f"stopped by signal {state.get('signal')}; launch again to resume"
    return status


def sweep_status(out):
    """The :class:`RunStatus` of every run of the sweep in ``out``, in launch order.

    Raises:
        UserError: ``out`` holds no sweep.
    """
    files = SweepFiles(out)
    manifest = files.read_manifest()
    backend = manifest.get("backend", {}).get("name", "local")
    return [run_status(files, entry, backend) for entry in manifest["runs"].values()]


def format_status(statuses):
    """A Markdown table of :func:`sweep_status`, then a count per state."""
    def number(value):
        return "-" if value is None else f"{value:.2f}"
    lines = ["| run | state | epochs | best top-1 | last top-1 | note |",
             "|---|---|---|---|---|---|"]
    for status in statuses:
        state = status.state
        if state == "running":
            state = f"running at epoch {status.epochs_done + 1}"
        lines.append(f"| {status.key} | {state} | {status.epochs_done} | "
                     f"{number(status.best_top1)} | {number(status.last_top1)} | "
                     f"{status.note.replace('|', '/')} |")
    counts = {}
    for status in statuses:
        counts[status.state] = counts.get(status.state, 0) + 1
    lines.append("")
    lines.append(", ".join(f"{count} {state}" for state, count in counts.items()))
    return "\n".join(lines)


# ------------------------------------------------------------------ backends
@dataclass
class Backend:
    """Where and how the jobs run.

    Attributes:
        name: ``local`` (jobs on this machine, ``jobs`` at once, each with its
            own GPUs when there are GPUs), ``slurm`` (one job array) or
            ``debug`` (in this process, one after another; a failure opens pdb).
        jobs: runs at once (local) or the array's parallelism (slurm).
        gpus_per_run: processes per run, one per GPU; on a machine without
            GPUs (local) that many CPU processes joined over gloo.
        time_limit: minutes per job (SLURM's --time, the local controller's
            limit); at its end the run saves, is requeued and resumes.
        partition, cpus_per_task: SLURM's.
        sbatch: further ``#SBATCH`` flags, ``{"mem": "32G", "account": "x"}``.
        signal_delay: seconds between SIGUSR2 and the time limit; a step and a
            checkpoint must fit.
        max_requeues: time limits or preemptions a run may meet before it fails.
    """
    name: str = "local"
    jobs: int = 1
    gpus_per_run: int = 1
    time_limit: float = None
    partition: str = None
    cpus_per_task: int = None
    sbatch: dict = field(default_factory=dict)
    signal_delay: int = 120
    max_requeues: int = 5

    def __post_init__(self):
        if self.name not in BACKENDS:
            raise UserError(f"--backend {self.name!r}: use one of {', '.join(BACKENDS)}")
        if self.jobs < 1 or self.gpus_per_run < 1:
            raise UserError("--jobs and --gpus-per-run must be at least 1")
        if self.name == "slurm" and not self.time_limit:
            raise UserError("--backend slurm needs --time-limit MINUTES (the cluster's limit "
                            "for one job; a run longer than it is requeued and resumes)")
        if self.time_limit is not None and self.time_limit * 60 <= self.signal_delay:
            raise UserError(f"--time-limit {self.time_limit} min leaves no time before the "
                            f"{self.signal_delay} s --signal-delay; give a longer limit")


def _submitit():
    try:
        import submitit
    except ImportError:
        raise UserError('sweeps run through submitit: pip install -e ".[cluster]"') from None
    return submitit


def available_gpus():
    """The GPU indices this process may use (its CUDA_VISIBLE_DEVICES, or all)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [entry.strip() for entry in visible.split(",") if entry.strip()]
        if not all(entry.isdigit() for entry in entries):
            raise UserError(f"CUDA_VISIBLE_DEVICES={visible!r}: the local backend hands out "
                            f"GPUs by index; give indices (0,1,...) or unset it")
        return [int(entry) for entry in entries]
    try:
        import torch
        return list(range(torch.cuda.device_count()))
    except Exception:           # no usable CUDA: CPU runs
        return []


def slurm_executor(files, backend):
    """A submitit executor for SLURM with the backend's settings (one task per GPU)."""
    submitit = _submitit()
    executor = submitit.AutoExecutor(folder=os.path.join(files.jobs, "%j"), cluster="slurm",
                                     slurm_max_num_timeout=backend.max_requeues)
    parameters = {"timeout_min": int(backend.time_limit), "nodes": 1,
                  "tasks_per_node": backend.gpus_per_run, "gpus_per_node": backend.gpus_per_run,
                  "slurm_array_parallelism": backend.jobs,
                  "slurm_signal_delay_s": backend.signal_delay, "name": "mdistill"}
    if backend.partition:
        parameters["slurm_partition"] = backend.partition
    if backend.cpus_per_task:
        parameters["cpus_per_task"] = backend.cpus_per_task
    if backend.sbatch:
        parameters["slurm_additional_parameters"] = dict(backend.sbatch)
    executor.update_parameters(**parameters)
    return executor


def local_executor(files, backend, gpus):
    """A submitit local executor for one slot: ``gpus`` are its GPUs (none: CPU)."""
    submitit = _submitit()
    executor = submitit.LocalExecutor(folder=os.path.join(files.jobs, "%j"),
                                      max_num_timeout=backend.max_requeues)
    # Without a limit of its own the controller stops a job after its default (minutes).
    minutes = backend.time_limit or 60 * 24 * 365
    executor.update_parameters(timeout_min=minutes, tasks_per_node=backend.gpus_per_run,
                               gpus_per_node=len(gpus), visible_gpus=tuple(gpus),
                               signal_delay_s=backend.signal_delay)
    return executor


@contextlib.contextmanager
def _children_ignore_sigint():
    """Processes started inside ignore SIGINT (it stays ignored across exec): the
    local controllers must not take a terminal's Ctrl-C as theirs, which would make
    them kill their tasks before the trainer has saved. The driver forwards one
    SIGTERM instead."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:          # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# --------------------------------------------------------------------- launch
def _entry(run):
    return {**asdict(run), "jobs": []}


def launch(runs, out, backend, retry_failed=False, run_class=SweepRun, log=print,
           poll_seconds=1.0):
    """Launch the runs of a sweep that are not done and not in flight.

    Runs whose state is done (with the same SOLVER.EPOCHS) are skipped, as are
    runs whose job still waits or runs; a run with a ``latest`` checkpoint
    resumes from it. ``local`` and ``debug`` return when every run has ended
    (a failure never stops the others); ``slurm`` returns once the array is
    submitted.

    Args:
        runs: :class:`RunSpec` objects (merged into the sweep's record), or None
            with ``retry_failed`` to use the recorded ones.
        out: the sweep's folder.
        backend: a :class:`Backend`.
        retry_failed: launch only the runs that failed, were stopped, or never
            started.
        run_class: the callable each job runs (a :class:`SweepRun` subclass).
        log: called with each line of progress.
        poll_seconds: how often the local driver looks at its jobs.

    Returns:
        ``{"launched": [keys], "skipped": [keys], "failed": [keys], "stopped": [keys]}``
        (failed and stopped: local and debug only).
    """
    files = SweepFiles(out)
    os.makedirs(files.root, exist_ok=True)
    manifest = _read_json(files.manifest_path) or {"runs": {}}
    for run in runs or ():
        entry = manifest["runs"].get(run.key)
        manifest["runs"][run.key] = {**_entry(run), "jobs": entry["jobs"] if entry else []}
    if not manifest["runs"]:
        raise UserError(f"{out} holds no sweep to retry; launch one with --cfg")
    previous_backend = manifest.get("backend", {}).get("name", backend.name)
    manifest["backend"] = asdict(backend)
    wanted = set(run.key for run in runs) if runs else set(manifest["runs"])
    todo, skipped = [], []
    for key, entry in manifest["runs"].items():
        if key not in wanted:
            continue
        status = run_status(files, entry, previous_backend)
        if status.state == DONE or status.in_flight or (
                retry_failed and status.state not in UNFINISHED):
            skipped.append(key)
            log(f"skip {key}: {status.state}")
            continue
        todo.append(entry)
    files.write_manifest(manifest)
    result = {"launched": [entry_key(entry) for entry in todo], "skipped": skipped,
              "failed": [], "stopped": []}
    if not todo:
        log("nothing to launch: every run is done or in flight")
        return result
    specs = [RunSpec(**{name: entry[name] for name in RunSpec.__dataclass_fields__})
             for entry in todo]
    if backend.name == "slurm":
        _launch_slurm(files, manifest, specs, backend, run_class, log)
    else:
        _run_here(files, manifest, specs, backend, run_class, log, poll_seconds, result)
    return result


def entry_key(entry):
    """``<project>/<name>``, or the name alone for an empty EXPERIMENT.PROJECT."""
    return "/".join(part for part in (entry["project"], entry["name"]) if part)


def _attempts(files, run):
    """The run's attempt count now. Read before submitting: a state written by the
    new job has a higher one (a count, not a clock, tells whose state it is)."""
    return (files.read_state(run.key) or {}).get("attempt", 0)


def _record_job(files, manifest, run, job, backend, attempt, **extra):
    manifest["runs"][run.key]["jobs"].append(
        {"job_id": str(job.job_id), "backend": backend.name, "submitted": _now(),
         "after_attempt": attempt, "host": socket.gethostname(),
         "folder": os.path.join(files.jobs, "%j"), **extra})
    files.write_manifest(manifest)


def _launch_slurm(files, manifest, specs, backend, run_class, log):
    executor = slurm_executor(files, backend)
    submitit = _submitit()
    attempts = [_attempts(files, spec) for spec in specs]
    with submitit.helpers.clean_env():      # a sweep started inside a job: not its variables
        with executor.batch():
            jobs = [executor.submit(run_class(spec, files.out)) for spec in specs]
    for spec, job, attempt in zip(specs, jobs, attempts):
        _record_job(files, manifest, spec, job, backend, attempt)
    first = str(jobs[0].job_id).split("_")[0]
    log(f"submitted {len(jobs)} runs as SLURM array {first} (at most {backend.jobs} at once); "
        f"follow them with: python tools/sweep.py --status {files.out}")


def _run_here(files, manifest, specs, backend, run_class, log, poll_seconds, result):
    """Run on this machine: ``backend.jobs`` slots, each with its own GPUs."""
    submitit = _submitit()
    if backend.name == "debug":
        executor = submitit.DebugExecutor(folder=os.path.join(files.jobs, "%j"))
        for spec in specs:
            attempt = _attempts(files, spec)
            job = executor.submit(run_class(spec, files.out))
            _record_job(files, manifest, spec, job, backend, attempt, driver_pid=os.getpid())
            log(f"== {spec.key}")
            _finish(files, spec, job, log, result)
        return
    gpus = available_gpus()
    slots = []
    for index in range(backend.jobs):
        mine = gpus[index * backend.gpus_per_run:(index + 1) * backend.gpus_per_run]
        if gpus and len(mine) < backend.gpus_per_run:
            raise UserError(f"--jobs {backend.jobs} x --gpus-per-run {backend.gpus_per_run} "
                            f"needs {backend.jobs * backend.gpus_per_run} GPUs; this machine "
                            f"has {len(gpus)}")
        slots.append(mine)
    pending, running, stop = list(specs), {}, []

    def request_stop(signum, frame):
        stop.append(signum)
    # Ctrl-C or SIGTERM: launch nothing more, forward one SIGTERM to each run (they
    # are out of the terminal's process group), wait for their checkpoints.
    previous = {}
    with contextlib.suppress(ValueError):       # not the main thread: no handlers
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, request_stop)
    forwarded = False
    try:
        while pending or running:
            for slot, slot_gpus in enumerate(slots):
                if slot in running or not pending or stop:
                    continue
                spec = pending.pop(0)
                attempt = _attempts(files, spec)
                with _children_ignore_sigint():
                    job = local_executor(files, backend, slot_gpus).submit(
                        run_class(spec, files.out))
                _record_job(files, manifest, spec, job, backend, attempt,
                            driver_pid=os.getpid())
                where = f"GPU {','.join(map(str, slot_gpus))}" if slot_gpus else "CPU"
                log(f"== {spec.key} ({where}; job {job.job_id})")
                running[slot] = (spec, job)
            if stop and not forwarded:
                forwarded = True
                log("stopping: each run saves a checkpoint at the end of its step")
                for _, job in running.values():
                    with contextlib.suppress(Exception):
                        job._process.send_signal(signal.SIGTERM)   # the controller forwards it
            time.sleep(poll_seconds)
            for slot, (spec, job) in list(running.items()):
                if job.done():
                    del running[slot]
                    _finish(files, spec, job, log, result)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if stop:
        result["interrupted"] = stop[0]


def _finish(files, spec, job, log, result):
    """Note how a job ended; a failure is reported and the sweep goes on."""
    try:
        job.results()
    except Exception as error:
        state = files.read_state(spec.key) or {}
        kind = "stopped" if state.get("state") == "stopped" else "failed"
        result[kind].append(spec.key)
        why = state.get("error") or _one_line(error)
        log(f"{kind.upper()} {spec.key}: {why}")
        return
    state = files.read_state(spec.key) or {}
    best = state.get("best_top1")
    log(f"done {spec.key}" + ("" if best is None else f": best top-1 {best:.2f}, last "
                                                       f"{state.get('last_top1'):.2f}"))


def describe_runs(runs):
    """One line per run: its folder, config and overrides (for --dry-run)."""
    return "\n".join(f"{run.folder}  <-  {os.path.relpath(run.config)} "
                     f"{' '.join(run.opts[:-2])}".rstrip() for run in runs)


def exit_code(result):
    """The sweep command's status: 0 when every launched run ended well (or was
    submitted), 130/143 after Ctrl-C/SIGTERM, 1 after a failure."""
    if result.get("interrupted"):
        return 128 + result["interrupted"]
    return 1 if result["failed"] or result["stopped"] else 0


if __name__ == "__main__":      # pragma: no cover
    sys.exit("use tools/sweep.py")
