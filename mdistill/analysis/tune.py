"""Hyper-parameter search with Optuna on the validation split.

A study lives in one Optuna journal file (``JournalStorage`` over a
``JournalFileBackend``, file locks and no server), so workers on several
machines that see the same disk share it, and running the same command again
resumes it. Each trial trains one run in a subprocess, with the trial's values
as ``KEY VALUE`` overrides, into ``<out>/<EXPERIMENT.PROJECT>/trial0007``; as the
run finishes epochs, their validation top-1 (``metrics.jsonl``'s ``"val"``) is
reported to Optuna, whose pruner may stop the run (SIGTERM: it saves and exits)
as soon as it trails the others. A trial's value is its best validation top-1
over the final stage's epochs. The test set is never looked at to choose:
``DATASET.VAL_FRACTION`` must hold some training images out.

Example::

    settings = TuneSettings(config="configs/cifar100/dkd.yaml",
                            space=parse_space(["DKD.BETA=log:1:16", "DKD.T=int:1:8"]),
                            opts=["DATASET.VAL_FRACTION", "0.1"], storage="dkd.journal",
                            study="dkd", trials=20, out="output/tune_dkd")
    tune(settings)                      # or launch_workers(settings, Backend("local", jobs=4))
    study = load_study(settings)
    write_best_config(study, settings, "dkd_best.yaml")
"""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field

import yaml

from ..config import load_cfg
from ..errors import UserError
from .compare import Run, read_run_config
from .sweep import last_line

KINDS = ("log", "float", "int", "choice")
# Keys a trial sets itself.
RESERVED_KEYS = ("LOG.PREFIX", "EXPERIMENT.NAME")
# One trial's training, in a process of its own: tools/train.py's behaviour (a user
# error in one line, 143 after SIGTERM with a checkpoint saved) without its path.
TRAIN_SCRIPT = """
import sys
from mdistill.engine.launch import RunStopped, shutdown, train
from mdistill.utils.cli import run_main

def main(argv):
    try:
        train(argv[0], argv[1:])
    except RunStopped as stopped:
        return stopped.exit_code
    finally:
        shutdown()
    return 0

run_main(main)
"""


def _optuna():
    try:
        import optuna
    except ImportError:
        raise UserError('tuning uses Optuna: pip install -e ".[tune]"') from None
    return optuna


@dataclass
class Dimension:
    """One searched key: ``kind`` log/float/int over ``[low, high]``, or choice."""
    key: str
    kind: str
    low: float = None
    high: float = None
    choices: tuple = ()

    def suggest(self, trial):
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high))
        return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "log")


def parse_space(items):
    """``["DKD.BETA=log:1:16", "DKD.T=int:1:8", "KD.TEMPERATURE=choice:2,4,8"]`` ->
    ``{key: Dimension}``.

    Raises:
        UserError: one line naming the item and what a valid one looks like.
    """
    space = {}
    for item in items or ():
        key, equals, text = item.partition("=")
        kind, _, rest = text.partition(":")
        hint = (f"--space {item!r}: write KEY=log:LOW:HIGH, KEY=float:LOW:HIGH, "
                f"KEY=int:LOW:HIGH or KEY=choice:A,B")
        if not equals or not key or kind not in KINDS or not rest:
            raise UserError(hint)
        if key in space:
            raise UserError(f"--space names {key} twice")
        if key in RESERVED_KEYS:
            raise UserError(f"--space {key}: set by each trial itself")
        if kind == "choice":
            choices = tuple(yaml.safe_load(value) for value in rest.split(","))
            if any(isinstance(value, (list, dict)) for value in choices) or len(choices) < 2:
                raise UserError(f"--space {item!r}: choice takes two or more plain values")
            space[key] = Dimension(key, kind, choices=choices)
            continue
        bounds = rest.split(":")
        try:
            low, high = (int(value) if kind == "int" else float(value) for value in bounds)
        except ValueError:
            raise UserError(hint) from None
        if not low < high:
            raise UserError(f"--space {item!r}: LOW must be below HIGH")
        if kind == "log" and low <= 0:
            raise UserError(f"--space {item!r}: a log range needs LOW > 0")
        space[key] = Dimension(key, kind, low, high)
    if not space:
        raise UserError("--space is empty: give at least one KEY=KIND:... to search")
    return space


@dataclass
class TuneSettings:
    """What a study searches and where it keeps everything.

    Attributes:
        config: the experiment YAML (absolute after :func:`check_settings`).
        space: ``{key: Dimension}`` from :func:`parse_space`.
        opts: ``KEY VALUE`` overrides of every trial.
        storage: the journal file.
        study: the study's name in it.
        trials: how many finished (complete or pruned) trials the study should have.
        out: the trials' runs land in ``out/<EXPERIMENT.PROJECT>/trial<N>``.
        pruner: ``median`` (Optuna's MedianPruner) or ``none``.
        sampler_seed: seed of each worker's TPE sampler (worker ``i`` adds ``i``);
            None: random.
        poll_seconds: how often a worker reads a running trial's metrics.jsonl.
    """
    config: str
    space: dict
    opts: list
    storage: str
    study: str
    trials: int
    out: str
    pruner: str = "median"
    sampler_seed: int = None
    poll_seconds: float = 1.0
    python: str = field(default_factory=lambda: sys.executable)


def check_settings(settings):
    """Refuse, before any trial, what could not run or would tune on the test set.

    Returns:
        The frozen config of the first trial's kind (the space's keys at their
        lowest values), loaded as each trial will be.

    Raises:
        UserError: a missing config, a reserved key, DATASET.VAL_FRACTION 0, a
            searched key the config does not have, or a bad value.
    """
    if not os.path.isfile(settings.config):
        raise UserError(f"no config file {settings.config}")
    settings.config = os.path.abspath(settings.config)
    settings.storage = os.path.abspath(settings.storage)
    settings.out = os.path.abspath(settings.out)
    for key in settings.opts[::2]:
        if key in RESERVED_KEYS:
            raise UserError(f"{key} is set for each trial; choose the folder with --out")
        if key in settings.space:
            raise UserError(f"{key} is both searched (--space) and fixed; give it once")
    if settings.trials < 0:
        raise UserError("--trials must be 0 or more")
    probe = dict((key, dimension.choices[0] if dimension.kind == "choice" else dimension.low)
                 for key, dimension in settings.space.items())
    cfg = load_cfg(settings.config, trial_opts(settings, probe, 0), warn_ignored=False)
    if not cfg.DATASET.VAL_FRACTION > 0:
        raise UserError("DATASET.VAL_FRACTION is 0: tuning chooses on a validation split, "
                        "never the test set; set it, e.g. DATASET.VAL_FRACTION 0.1")
    if not os.path.isdir(os.path.dirname(settings.storage)):
        raise UserError(f"--storage {settings.storage}: no folder "
                        f"{os.path.dirname(settings.storage)}")
    return cfg


def _text(value):
    return value if isinstance(value, str) else json.dumps(value)


def trial_opts(settings, params, number):
    """A trial's overrides: the common ones, its values, its own folder."""
    opts = list(settings.opts)
    for key, value in params.items():
        opts += [key, _text(value)]
    return opts + ["LOG.PREFIX", settings.out, "EXPERIMENT.NAME", f"trial{number:04d}"]


def open_storage(path):
    """The journal storage in ``path`` (JournalFileBackend since Optuna 4.0,
    JournalFileStorage before)."""
    optuna = _optuna()
    journal = getattr(optuna.storages, "journal", None)
    backend = getattr(journal, "JournalFileBackend", None) or optuna.storages.JournalFileStorage
    return optuna.storages.JournalStorage(backend(path))


def load_study(settings, worker=0, create=True, pruner=None):
    """The study in the settings' journal (created on first use), with the
    settings' pruner unless ``pruner`` (an Optuna pruner) is given.

    Raises:
        UserError: without ``create``, no such study in the journal.
    """
    optuna = _optuna()
    storage = open_storage(settings.storage)
    if not create:
        names = [summary.study_name for summary in optuna.get_all_study_summaries(storage)]
        if settings.study not in names:
            raise UserError(f"no study {settings.study!r} in {settings.storage} (it has: "
                            f"{', '.join(names) or 'none'})")
    seed = None if settings.sampler_seed is None else settings.sampler_seed + worker
    if pruner is None:
        pruner = (optuna.pruners.MedianPruner() if settings.pruner == "median"
                  else optuna.pruners.NopPruner())
    return optuna.create_study(study_name=settings.study, storage=storage,
                               direction="maximize", load_if_exists=True, pruner=pruner,
                               sampler=optuna.samplers.TPESampler(seed=seed))


def finished_trials(study):
    """Trials that count towards ``trials``: complete or pruned."""
    optuna = _optuna()
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return [trial for trial in study.get_trials(deepcopy=False) if trial.state in states]


def fail_abandoned_trials(study, settings):
    """Mark FAIL the trials left running by a worker on this machine that is gone
    (killed, machine restarted): the journal cannot tell, and they would stay
    running forever. Returns their numbers."""
    optuna = _optuna()
    storage, failed = open_storage(settings.storage), []
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in study.get_trials(deepcopy=False,
                                  states=(optuna.trial.TrialState.RUNNING,)):
        if trial.user_attrs.get("host") != socket.gethostname():
            continue
        try:
            os.kill(int(trial.user_attrs.get("worker_pid", -1)), 0)
            continue
        except ProcessLookupError:
            pass
        except (PermissionError, ValueError, OverflowError):
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
        failed.append(trial.number)
    return failed


class TrialFailed(Exception):
    """A trial's training exited with an error (the trial is marked FAIL; the
    study goes on)."""


def _new_records(path, consumed):
    """Complete lines of ``path`` after the first ``consumed`` bytes:
    ``(records, bytes consumed)``; a line still being written waits."""
    try:
        with open(path, "rb") as handle:
            handle.seek(consumed)
            data = handle.read()
    except OSError:
        return [], consumed
    end = data.rfind(b"\n") + 1
    records = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return records, consumed + end


def objective(settings, trial):
    """Train one trial; its value is the best validation top-1 of the final stage.

    Raises:
        optuna.TrialPruned: the pruner stopped it (its run saved and exited).
        TrialFailed: the training failed (the last line of its output says why).
    """
    optuna = _optuna()
    params = {key: dimension.suggest(trial) for key, dimension in settings.space.items()}
    opts = trial_opts(settings, params, trial.number)
    cfg = load_cfg(settings.config, opts, warn_ignored=False)
    folder = os.path.join(settings.out, cfg.EXPERIMENT.PROJECT, cfg.EXPERIMENT.NAME)
    if os.path.exists(folder):      # an earlier attempt of this number: start afresh
        os.replace(folder, f"{folder}.old-{os.getpid()}-{int(time.time())}")
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    trial.set_user_attr("run_dir", folder)
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("worker_pid", os.getpid())
    output = f"{folder}.out"
    with open(output, "w") as log:
        process = subprocess.Popen([settings.python, "-c", TRAIN_SCRIPT, settings.config, *opts],
                                   stdout=log, stderr=subprocess.STDOUT)
    metrics, consumed = os.path.join(folder, "metrics.jsonl"), 0
    try:
        while True:
            exited = process.poll() is not None
            records, consumed = _new_records(metrics, consumed)
            for record in records:
                value = record["val"]["top1"]
                trial.report(value, record["epoch"])
                if trial.should_prune():
                    raise optuna.TrialPruned(f"validation top-1 {value:.2f} at epoch "
                                             f"{record['epoch']}")
            if exited:
                break
            time.sleep(settings.poll_seconds)
    finally:
        if process.poll() is None:      # pruned, or this worker is stopping: save and exit
            process.send_signal(signal.SIGTERM)
            process.wait()
    if process.returncode != 0:
        why = f"{last_line(output)} (output in {output})"
        trial.set_user_attr("error", why)
        if process.returncode == 2:
            # A user error (tools/train.py's status for one): every trial would repeat it.
            raise UserError(f"trial {trial.number} stopped the study: {why}")
        raise TrialFailed(f"trial {trial.number}: training exited with {process.returncode}: "
                          f"{why}")
    run = Run(folder, read_run_config(folder), _new_records(metrics, 0)[0])
    records = run.final_stage_records
    return max(record["val"]["top1"] for record in records) if records else math.nan


def report_trial(study, trial, log=print):
    """One line per finished trial (Optuna's own log is silenced: a failure would
    print a traceback for what one line says)."""
    if trial.state.name == "COMPLETE":
        what = f"validation top-1 {trial.value:.2f}"
    elif trial.state.name == "PRUNED":
        what = f"pruned after epoch {max(trial.intermediate_values, default=0)}"
    else:
        what = f"{trial.state.name.lower()}: {trial.user_attrs.get('error', '')}"
    values = ", ".join(f"{key}={_param_text(value)}" for key, value in trial.params.items())
    log(f"trial {trial.number} ({values}): {what}")


def tune(settings, worker=0, trials=None, log=print, pruner=None):
    """Run trials in this process until it has run ``trials`` (default: as many
    as the study lacks); ``pruner`` replaces the settings' one. Returns the study.

    Raises:
        UserError: a trial's training failed on a user error (the study stops).
    """
    optuna = _optuna()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    check_settings(settings)
    study = load_study(settings, worker, pruner=pruner)
    fail_abandoned_trials(study, settings)
    if trials is None:
        trials = max(0, settings.trials - len(finished_trials(study)))
    if trials:
        study.optimize(lambda trial: objective(settings, trial), n_trials=trials,
                       catch=(TrialFailed,),
                       callbacks=[lambda study, trial: report_trial(study, trial, log)])
    return study


def worker_shares(total, workers):
    """How many trials each worker runs: ``total`` spread as evenly as can be."""
    return [total // workers + (index < total % workers) for index in range(workers)]


class TuneWorker:
    """A submitit job that runs its share of a study's trials."""

    def __init__(self, settings, worker, trials):
        self.settings, self.worker, self.trials = settings, worker, trials

    def __call__(self):
        study = tune(self.settings, self.worker, self.trials)
        return len(study.trials)


def launch_workers(settings, backend, log=print):
    """Run the trials the study lacks in ``backend.jobs`` workers sharing its
    journal: local workers each with their own GPUs (when there are GPUs), or one
    SLURM array. Local returns when they have all ended; SLURM when submitted.

    Returns:
        The submitit jobs.
    """
    from . import sweep
    check_settings(settings)
    study = load_study(settings)
    fail_abandoned_trials(study, settings)
    missing = max(0, settings.trials - len(finished_trials(study)))
    shares = [share for share in worker_shares(missing, backend.jobs) if share]
    if not shares:
        log(f"the study has its {settings.trials} trials")
        return []
    files = sweep.SweepFiles(os.path.join(settings.out, "tune_workers"))
    workers = [TuneWorker(settings, index, share) for index, share in enumerate(shares)]
    if backend.name == "slurm":
        executor = sweep.slurm_executor(files, backend)
        with executor.batch():
            jobs = [executor.submit(worker) for worker in workers]
        log(f"submitted {len(jobs)} workers ({missing} trials) as SLURM array "
            f"{str(jobs[0].job_id).split('_')[0]}")
        return jobs
    if backend.name == "debug":     # in this process, one worker after another
        jobs = [sweep._submitit().DebugExecutor(files.jobs).submit(worker) for worker in workers]
        for job in jobs:
            job.results()
        return jobs
    gpus = sweep.available_gpus()
    jobs = []
    for index, worker in enumerate(workers):
        mine = gpus[index * backend.gpus_per_run:(index + 1) * backend.gpus_per_run]
        jobs.append(sweep.local_executor(files, backend, mine).submit(worker))
        log(f"worker {index}: {worker.trials} trials "
            f"({'GPU ' + ','.join(map(str, mine)) if mine else 'CPU'}; job {jobs[-1].job_id})")
    for job in jobs:
        try:
            job.results()
        except Exception as error:      # one worker's crash leaves the others' trials
            log(f"a worker failed: {str(error).strip().splitlines()[-1]}")
    return jobs


def trials_table(study):
    """A Markdown table of the study's trials, the best first."""
    keys = []
    for trial in study.trials:
        keys += [key for key in trial.params if key not in keys]
    rows = sorted(study.trials, key=lambda trial: (trial.value is None,
                                                   -(trial.value or 0.0), trial.number))
    lines = ["| trial | state | best val top-1 | epochs reported | " + " | ".join(keys) + " |",
             "|" + "---|" * (4 + len(keys))]
    for trial in rows:
        value = "-" if trial.value is None else f"{trial.value:.2f}"
        params = [_param_text(trial.params.get(key, "-")) for key in keys]
        lines.append(f"| {trial.number} | {trial.state.name.lower()} | {value} | "
                     f"{len(trial.intermediate_values)} | " + " | ".join(params) + " |")
    return "\n".join(lines)


def _param_text(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def best_trial(study):
    optuna = _optuna()
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise UserError(f"study {study.study_name!r} has no complete trial yet")
    return study.best_trial


def write_best_config(study, settings, path):
    """Write the best trial's whole config as YAML that ``tools/train.py --cfg``
    runs as it is: the config, the common overrides and the trial's values
    (not the trial's folder: LOG.PREFIX and EXPERIMENT.NAME keep the config's).

    Returns:
        ``(path, trial)``.
    """
    trial = best_trial(study)
    opts = list(settings.opts)
    for key, value in trial.params.items():
        opts += [key, _text(value)]
    cfg = load_cfg(settings.config, opts, warn_ignored=False)
    header = (f"# Best trial {trial.number} of study {study.study_name!r} ({settings.storage}): "
              f"validation top-1 {trial.value:.2f}\n# "
              + ", ".join(f"{key}={_param_text(value)}" for key, value in trial.params.items())
              + "\n")
    try:
        with open(path, "w") as handle:
            handle.write(header + cfg.dump())
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror}") from None
    return path, trial


def plot_study(study, prefix):
    """Save Optuna's optimization history, intermediate values (pruning) and
    slice plots as ``<prefix>_history.png``, ... Returns the paths written.

    Raises:
        UserError: matplotlib is not installed.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        from optuna.visualization import matplotlib as optuna_plots
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install matplotlib") from None
    paths = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # the matplotlib plots are "experimental"
        for name, draw in (("history", optuna_plots.plot_optimization_history),
                           ("intermediate", optuna_plots.plot_intermediate_values),
                           ("slice", optuna_plots.plot_slice)):
            axis = draw(study)
            figure = (axis.flat[0] if hasattr(axis, "flat") else axis).figure
            path = f"{prefix}_{name}.png"
            figure.savefig(path, dpi=110, bbox_inches="tight")
            import matplotlib.pyplot as pyplot
            pyplot.close(figure)
            paths.append(path)
    return paths
