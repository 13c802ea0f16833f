"""Compare finished runs: test top-1 per method over seeds, as a table.

It reads what :mod:`~mdistill.engine.launch` and the trainer write into a run
folder ``LOG.PREFIX/<EXPERIMENT.PROJECT>/<run name>/``, and nothing else:
``config.yaml`` (the frozen config) and ``metrics.jsonl`` (one JSON record per
finished epoch, ``{"epoch", "test": {"top1", ...}, "epoch_time", ...}``).

Example::

    runs = load_runs(["output/cifar100_baselines"])
    print(format_table(summarize(runs)))

Pictures of the same runs: :mod:`~mdistill.analysis.plots`.
"""
import functools
import glob
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field

import yaml

from ..config import flatten_cfg, get_cfg
from ..errors import UserError

FORMATS = ("markdown", "csv")
STUDENT_ALONE = "student alone"
# The folder of a started run holds config.yaml and log.txt at once; metrics.jsonl
# appears with the first finished epoch.
RUN_FILES = ("metrics.jsonl", "log.txt")
# Keys that say where a run's files are, how it is logged or how fast it goes, not
# what it computes: runs differing only in these (and the seed) are seeds of one row.
NEUTRAL_KEYS = {"EXPERIMENT.SEED", "EXPERIMENT.NAME", "EXPERIMENT.PROJECT", "DATASET.ROOT",
                "DATASET.DOWNLOAD", "DATASET.NUM_WORKERS", "DATASET.TEST.BATCH_SIZE", "DEVICE",
                "SOLVER.COMPILE", "SOLVER.SKIP_NONFINITE_STEPS", "DISTILLER.TEACHER_WEIGHTS",
                "DISTILLER.TEACHERS_WEIGHTS", "DISTILLER.TEACHER_CACHE"}
NEUTRAL_SECTIONS = ("LOG.",)
# A path differs from machine to machine for the same teacher, so runs are not split
# by it; a group whose runs name different teacher files gets a warning instead.
WARNED_KEYS = ("DISTILLER.TEACHER_WEIGHTS", "DISTILLER.TEACHERS_WEIGHTS")


def warn_to_stderr(text):
    print(f"warning: {text}", file=sys.stderr)


@dataclass
class Run:
    """One run folder.

    Attributes:
        path: the folder.
        config: its config.yaml flattened to ``{"DISTILLER.TYPE": "KD", ...}``
            (keys a run written by an older version lacks take today's defaults).
        records: the metrics.jsonl records, one per finished epoch, by epoch.
    """
    path: str
    config: dict
    records: list = field(default_factory=list)

    @property
    def switches(self):
        """The switch sections turned on (``SDD`` for SD-KD), in config order."""
        return [key.split(".")[0] for key, value in self.config.items()
                if key.count(".") == 1 and key.endswith(".ENABLE") and value is True
                and key.split(".")[0] in _method_sections()]

    @property
    def method(self):
        """DISTILLER.TYPE, with the switches turned on: ``KD+SDD`` (as run names)."""
        return "+".join([self.config["DISTILLER.TYPE"], *self.switches])

    @property
    def is_student_alone(self):
        return self.config["DISTILLER.TYPE"].upper() == "NONE"

    @property
    def dataset(self):
        return self.config["DATASET.TYPE"]

    @property
    def teachers(self):
        """The teachers' model names: DISTILLER.TEACHERS when it lists several, else
        DISTILLER.TEACHER; empty for the student alone."""
        if self.is_student_alone:
            # A run without a teacher still has the key (a default, or the teacher of
            # the config it was started from); it means nothing there.
            return []
        return list(self.config["DISTILLER.TEACHERS"]) or [self.config["DISTILLER.TEACHER"]]

    @property
    def teacher(self):
        """The teachers joined by ``+`` as in the run's folder name
        (``resnet56+wrn_40_2``), or ``-`` for the student alone."""
        return "+".join(self.teachers) or "-"

    @property
    def student(self):
        return self.config["DISTILLER.STUDENT"]

    @property
    def seed(self):
        return self.config["EXPERIMENT.SEED"]

    @property
    def planned_epochs(self):
        return self.config["SOLVER.EPOCHS"]

    @property
    def final_stage_records(self):
        """The records of the final stage's epochs, among which the trainer picks its
        best: a method with an init stage (FSP, AB, FT) first trains other
        parameters, and those epochs' accuracies are not the method's result.

        Records name their stage; the trainer's ``best_top1`` is negative until the
        final stage starts, which tells a run still in an init stage (no final
        epoch yet: empty) from a method whose one stage is its last. Records
        written before they named the stage all count.
        """
        last = self.records[-1]
        if "stage" not in last:
            return list(self.records)
        if last.get("best_top1", 0.0) < 0:
            return []
        return [record for record in self.records if record.get("stage") == last["stage"]]

    @property
    def best_top1(self):
        """Test top-1 of the best epoch of the final stage (None before it starts)."""
        records = self.final_stage_records
        if not records:
            return None
        if all("val" in record for record in records):
            # A validation split chose the best epoch: its test top-1 (the last of ties).
            return max(reversed(records), key=lambda record: record["val"]["top1"])[
                "test"]["top1"]
        return max(record["test"]["top1"] for record in records)

    @property
    def last_top1(self):
        return self.records[-1]["test"]["top1"]

    @property
    def train_time(self):
        """Seconds spent in the training loop (``epoch_time``; evaluation excluded)."""
        return sum(record.get("epoch_time", 0.0) for record in self.records)

    @property
    def label(self):
        return STUDENT_ALONE if self.is_student_alone else self.method

    @property
    def settings(self):
        """The config entries that make this run what it is: every key except the
        seed and :data:`NEUTRAL_KEYS`, and of the method sections only its own
        (a KD run's CRD.* values mean nothing). Values are hashable."""
        sections = _method_sections()
        own = {self.config["DISTILLER.TYPE"].upper(), *self.switches}
        items = {}
        for key, value in self.config.items():
            section = key.split(".")[0]
            # DISTILLER.TEACHER means nothing without a teacher or with TEACHERS set.
            unused_teacher = key == "DISTILLER.TEACHER" and (
                self.is_student_alone or self.config["DISTILLER.TEACHERS"])
            if (key in NEUTRAL_KEYS or key.startswith(NEUTRAL_SECTIONS) or unused_teacher
                    or (section in sections and section not in own)):
                continue
            items[key] = tuple(value) if isinstance(value, list) else value
        return items

    @property
    def finished_at(self):
        """When its last epoch record was written (to pick the newest of duplicates)."""
        path = os.path.join(self.path, "metrics.jsonl")
        return os.path.getmtime(path) if os.path.isfile(path) else 0.0


@functools.lru_cache(maxsize=1)
def _method_sections():
    """The config sections of methods (KD, CRD, ...): all but the general ones."""
    return frozenset(key.split(".")[0] for key in flatten_cfg(get_cfg())) - {
        "EXPERIMENT", "DATASET", "SOLVER", "DISTILLER", "DEVICE", "LOG"}


def _is_run(folder):
    return (os.path.isfile(os.path.join(folder, "config.yaml"))
            and any(os.path.isfile(os.path.join(folder, name)) for name in RUN_FILES))


def _run_folders(path):
    """``path`` itself if it is a run, else every run below it (runs do not nest)."""
    if _is_run(path):
        return [path]
    found = []
    for folder, subfolders, _ in os.walk(path):
        if _is_run(folder):
            found.append(folder)
            subfolders.clear()
        else:
            subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
    return found


def read_run_config(folder):
    """A run folder's config.yaml, flattened, over today's defaults."""
    with open(os.path.join(folder, "config.yaml")) as handle:
        values = yaml.safe_load(handle)
    if not isinstance(values, dict):
        raise ValueError("config.yaml holds no mapping of keys")
    config = flatten_cfg(get_cfg())
    config.update(flatten_cfg(values))
    return config


def _read_records(folder, warn):
    """The per-epoch records, tolerating a line a killed process left half-written."""
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as handle:
        lines = [line for line in handle.read().splitlines() if line.strip()]
    by_epoch = {}
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            top1 = float(record["test"]["top1"])
            epoch = int(record["epoch"])
        except (ValueError, KeyError, TypeError):
            what = "its unfinished last line" if number == len(lines) else f"line {number}"
            warn(f"{path}: ignoring {what} (not a complete epoch record)")
            continue
        if math.isfinite(top1):
            by_epoch[epoch] = record       # a resumed run's rewrite of an epoch wins
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def load_runs(paths, warn=None):
    """Read the runs that ``paths`` name.

    Args:
        paths: run folders, folders holding runs at any depth (such as
            ``LOG.PREFIX`` or ``LOG.PREFIX/<project>``), or glob patterns of either.
            A folder is a run when it holds ``config.yaml`` and ``metrics.jsonl``
            (or, before its first epoch ends, ``log.txt``).
        warn: called with one line of text for each run skipped (no finished
            epoch yet, unreadable config); prints to stderr by default.

    Returns:
        A list of :class:`Run`, in the order found, each folder once.

    Raises:
        UserError: a path that does not exist, a pattern that matches nothing,
            or no run with a finished epoch at all.
    """
    warn = warn or warn_to_stderr
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [os.fspath(path) for path in paths]
    if not paths:
        raise UserError("no run folders given")
    folders = []
    for path in paths:
        if glob.has_magic(path):
            matches = sorted(match for match in glob.glob(path) if os.path.isdir(match))
            if not matches:
                raise UserError(f"no folder matches {path!r}")
        elif os.path.isdir(path):
            matches = [path]
        elif os.path.exists(path):
            raise UserError(f"{path} is a file; give run folders or folders holding runs")
        else:
            raise UserError(f"no such folder: {path}")
        found = [folder for match in matches for folder in _run_folders(match)]
        if not found and len(paths) > 1:
            warn(f"no runs under {path}")
        folders += found
    runs, seen, unfinished = [], set(), 0
    for folder in folders:
        if os.path.realpath(folder) in seen:
            continue
        seen.add(os.path.realpath(folder))
        try:
            config = read_run_config(folder)
        except (OSError, ValueError, yaml.YAMLError) as error:
            warn(f"skipping {folder}: cannot read config.yaml ({error})")
            continue
        records = _read_records(folder, warn)
        if not records:
            unfinished += 1
            warn(f"skipping {folder}: no finished epoch yet")
            continue
        runs.append(Run(folder, config, records))
    if not runs:
        where = ", ".join(paths)
        if unfinished:
            raise UserError(f"no runs with a finished epoch under {where} "
                            f"({unfinished} started, none has finished an epoch)")
        raise UserError(f"no runs under {where} (a run folder holds config.yaml and "
                        f"metrics.jsonl)")
    return runs


def mean_std(values):
    """``(mean, sample standard deviation)`` of the values that are not None; the
    deviation is None for one value, both are None for none."""
    values = [float(value) for value in values if value is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


@dataclass
class Group:
    """The runs of one configuration, one per seed.

    Runs belong to one group when their configs agree on everything but the
    seed and :data:`NEUTRAL_KEYS`. ``best`` and ``last`` are ``(mean, sample
    std)`` over the runs of the best epoch's and the last finished epoch's test
    top-1 (mdistiller reports the former, RepDistiller the latter); the std is
    None for a single run. The best epoch is one of the final stage's (see
    :attr:`Run.final_stage_records`); a run still in an init stage has none and
    is left out of ``best`` (both None when every run is).

    Attributes:
        settings: ``{key: value}`` of the keys that tell this group apart from
            the other groups of the same method on the same pair (empty when it
            is the only one), e.g. ``{"KD.TEMPERATURE": 8.0}``.
        duplicates: runs left out because another run of the group has their seed.
    """
    dataset: str
    teacher: str
    student: str
    method: str
    runs: list
    settings: dict = field(default_factory=dict)
    duplicates: list = field(default_factory=list)

    @property
    def label(self):
        """The method, and the settings that tell it apart: ``KD (KD.TEMPERATURE=8.0)``."""
        if not self.settings:
            return self.runs[0].label
        return f"{self.runs[0].label} ({self.settings_text})"

    @property
    def settings_text(self):
        return ", ".join(f"{key}={_value_text(value)}" for key, value in self.settings.items())

    @property
    def seeds(self):
        return sorted(run.seed for run in self.runs)

    @property
    def best(self):
        return mean_std(run.best_top1 for run in self.runs)

    @property
    def last(self):
        return mean_std(run.last_top1 for run in self.runs)

    @property
    def epochs_finished(self):
        """``(fewest, most)`` epochs finished by a run of the group."""
        counts = [len(run.records) for run in self.runs]
        return min(counts), max(counts)

    @property
    def epochs_planned(self):
        return max(run.planned_epochs for run in self.runs)

    @property
    def train_time(self):
        """Mean over the runs of the seconds each spent training."""
        return statistics.fmean(run.train_time for run in self.runs)

    @property
    def name(self):
        pair = self.student if self.teacher == "-" else f"{self.teacher} -> {self.student}"
        return f"{self.label} ({self.dataset}, {pair})"


def _value_text(value):
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value_text(item) for item in value) + "]"
    return str(value)


def _sort_key(value):
    """Numbers in numeric order, before anything else in text order."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, repr(value))


def _one_run_per_seed(group, warn):
    """Keep one run of each seed (the one that got furthest, then the newest)."""
    by_seed = {}
    for run in group.runs:
        by_seed.setdefault(run.seed, []).append(run)
    kept = []
    for seed, runs in sorted(by_seed.items()):
        runs.sort(key=lambda run: (len(run.records), run.finished_at), reverse=True)
        kept.append(runs[0])
        if len(runs) > 1:
            group.duplicates += runs[1:]
            warn(f"{group.name}: seed {seed} was run {len(runs)} times; counting it once, "
                 f"with {runs[0].path} (the furthest, then newest), not "
                 f"{', '.join(run.path for run in runs[1:])}")
    group.runs = kept


def _warn_about_neutral_differences(group, warn):
    for key in WARNED_KEYS:
        values = sorted({str(run.config.get(key)) for run in group.runs})
        if len(values) > 1:
            warn(f"{group.name}: its runs name different {key} ({', '.join(values)}); they "
                 f"are averaged as seeds of one row, as if the teachers were the same")


def summarize(runs, warn=None):
    """Group runs by their config, over seeds.

    Two runs are seeds of one group when their configs agree on every key but
    the seed and :data:`NEUTRAL_KEYS` (of the method sections, only the run's
    own counts). So KD at ``KD.TEMPERATURE`` 4 and 8 are two groups, labelled
    with the keys that tell them apart.

    Args:
        runs: :class:`Run` objects from :func:`load_runs`.
        warn: called with one line for each seed run more than once in a group
            (it is counted once) and for a group whose runs name different
            teacher files; prints to stderr by default.

    Returns:
        A list of :class:`Group`: per dataset and student, the student alone
        first, then each teacher's methods in alphabetical order.
    """
    warn = warn or warn_to_stderr
    grouped = {}
    for run in runs:
        settings = run.settings
        key = tuple(sorted(settings.items(), key=lambda item: item[0]))
        grouped.setdefault(key, (settings, []))[1].append(run)
    groups = [Group(members[0].dataset, members[0].teacher, members[0].student,
                    members[0].method, sorted(members, key=lambda run: run.seed))
              for _, members in grouped.values()]
    # Label each group with the keys on which it differs from its siblings (the
    # groups of the same method on the same pair).
    families = {}
    for group, (settings, _) in zip(groups, grouped.values()):
        families.setdefault((group.dataset, group.teacher, group.student, group.method),
                            []).append((group, settings))
    for members in families.values():
        if len(members) < 2:
            continue
        keys = sorted({key for _, settings in members for key in settings
                       if len({repr(other.get(key)) for _, other in members}) > 1})
        for group, settings in members:
            group.settings = {key: settings.get(key) for key in keys}
    groups.sort(key=lambda group: (group.dataset, group.student, group.teacher != "-",
                                   group.teacher, group.method.lower(),
                                   [_sort_key(value) for value in group.settings.values()]))
    for group in groups:
        _one_run_per_seed(group, warn)
        _warn_about_neutral_differences(group, warn)
    return groups


TIMING_PARTS = ("start_up", "teacher_test", "training", "evaluation", "checkpoints", "other")


def timing_summary(runs):
    """Where the runs' wall time went, from each run's timing.json (its last
    session): one line per part with the total over the runs, the mean per run
    and the share of the total; runs without the file are counted and left out.

    Returns:
        The text, or "" when no run has a timing.json.
    """
    totals, counted = dict.fromkeys(TIMING_PARTS + ("total",), 0.0), 0
    for run in runs:
        try:
            with open(os.path.join(run.path, "timing.json")) as handle:
                seconds = json.load(handle)
        except (OSError, ValueError):
            continue
        counted += 1
        for part in totals:
            totals[part] += float(seconds.get(part, 0.0))
    if not counted:
        return ""
    whole = max(totals["total"], 1e-9)
    lines = [f"time of {counted} run(s) (timing.json; {len(runs) - counted} without one):",
             "| part | total | per run | share |", "|---|---|---|---|"]
    for part in TIMING_PARTS + ("total",):
        lines.append(f"| {part.replace('_', '-')} | {_duration(totals[part])} | "
                     f"{totals[part] / counted:.1f} s | {100 * totals[part] / whole:.1f}% |")
    return "\n".join(lines)


def _duration(seconds):
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _epochs(group):
    fewest, most = group.epochs_finished
    done = str(fewest) if fewest == most else f"{fewest}-{most}"
    return f"{done}/{group.epochs_planned}"


def _mean_std_cell(mean_std_pair):
    mean, std = mean_std_pair
    if mean is None:
        return "n/a"
    return f"{mean:.2f} ± {'n/a' if std is None else f'{std:.2f}'}"


def _number(value, decimals=4):
    return "n/a" if value is None else f"{value:.{decimals}f}"


MARKDOWN_COLUMNS = ("dataset", "teacher", "student", "method", "best top-1", "last top-1",
                    "seeds", "epochs", "train time")
CSV_COLUMNS = ("dataset", "teacher", "student", "method", "settings", "best_top1_mean",
               "best_top1_std", "last_top1_mean", "last_top1_std", "seeds", "seed_list",
               "epochs_finished", "epochs_planned", "train_time_s")


def format_table(groups, fmt="markdown"):
    """The groups as a Markdown table or as CSV text (no trailing newline).

    Markdown shows the method with the settings that tell its rows apart,
    ``mean ± std`` with two decimals (``± n/a`` for one seed), the number of
    seeds, epochs finished/planned (a range when the seeds differ) and the mean
    training time. CSV has the method and its settings in two columns, separate
    mean and std columns (``n/a`` for one seed), the seeds, the fewest epochs
    finished, and seconds.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if fmt == "csv":
        import csv
        import io
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for group in groups:
            (best, best_std), (last, last_std) = group.best, group.last
            writer.writerow([
                group.dataset, group.teacher, group.student, group.runs[0].label,
                group.settings_text, _number(best), _number(best_std),
                _number(last), _number(last_std),
                len(group.runs), " ".join(str(seed) for seed in group.seeds),
                group.epochs_finished[0], group.epochs_planned, f"{group.train_time:.1f}"])
        return text.getvalue().rstrip("\n")
    lines = ["| " + " | ".join(MARKDOWN_COLUMNS) + " |",
             "|" + "|".join("---" for _ in MARKDOWN_COLUMNS) + "|"]
    for group in groups:
        cells = (group.dataset, group.teacher, group.student, group.label,
                 _mean_std_cell(group.best), _mean_std_cell(group.last), str(len(group.runs)),
                 _epochs(group), _duration(group.train_time))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_text(text, path):
    """Write ``text`` and a final newline to ``path``."""
    try:
        with open(path, "w") as handle:
            handle.write(text + "\n")
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror}") from None
    return path
