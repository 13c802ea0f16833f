"""Tables and plots across runs: which method, for which pair, by how much."""
import glob
import json
import os
import statistics
from dataclasses import dataclass, field

from ..config import cfg_from_text
from ..errors import UserError


@dataclass
class Run:
    """One run folder: its config and the per-epoch records of metrics.jsonl."""
    path: str
    cfg: object
    records: list = field(default_factory=list)

    @property
    def method(self):
        return self.cfg.DISTILLER.TYPE

    @property
    def seed(self):
        return self.cfg.EXPERIMENT.SEED


def _is_run(folder):
    return (os.path.isfile(os.path.join(folder, "config.yaml"))
            and os.path.isfile(os.path.join(folder, "metrics.jsonl")))


def load_runs(patterns, warn=print):
    """Read every run under ``patterns`` (run folders, folders of runs, or globs).

    Runs without a finished epoch are skipped with a warning.

    Raises:
        UserError: no run was found.
    """
    folders = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        for match in matches:
            if _is_run(match):
                folders.append(match)
            elif os.path.isdir(match):
                folders += sorted(os.path.dirname(path) for path in
                                  glob.glob(os.path.join(glob.escape(match), "**", "config.yaml"),
                                            recursive=True)
                                  if _is_run(os.path.dirname(path)))
    runs = []
    for folder in dict.fromkeys(folders):
        with open(os.path.join(folder, "config.yaml")) as handle:
            cfg = cfg_from_text(handle.read())
        with open(os.path.join(folder, "metrics.jsonl")) as handle:
            records = [json.loads(line) for line in handle if line.strip()]
        if not records:
            warn(f"skipping {folder}: no finished epoch yet")
            continue
        runs.append(Run(folder, cfg, records))
    if not runs:
        raise UserError(f"no runs (folders with config.yaml and metrics.jsonl) under "
                        f"{', '.join(patterns)}")
    return runs


def _mean_std(values):
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else None
    return mean, std


def summarize(runs):
    """Group runs by (dataset, teacher, student, method) over seeds.

    Returns:
        A list of dicts: dataset, teacher, student, method, seeds, best (mean,
        std), last (mean, std), epochs (finished / planned), wall_time (mean s).
    """
    groups = {}
    for run in runs:
        teacher = "-" if run.method == "NONE" else run.cfg.DISTILLER.TEACHER
        key = (run.cfg.DATASET.TYPE, teacher, run.cfg.DISTILLER.STUDENT, run.method)
        groups.setdefault(key, []).append(run)
    rows = []
    for (dataset, teacher, student, method), members in groups.items():
        best = [max(record["test"]["top1"] for record in run.records) for run in members]
        last = [run.records[-1]["test"]["top1"] for run in members]
        wall = [sum(record["epoch_time"] for record in run.records) for run in members]
        finished = min(len(run.records) for run in members)
        rows.append({"dataset": dataset, "teacher": teacher, "student": student,
                     "method": "student alone" if method == "NONE" else method,
                     "seeds": sorted(run.seed for run in members), "best": _mean_std(best),
                     "last": _mean_std(last),
                     "epochs": f"{finished}/{members[0].cfg.SOLVER.EPOCHS}",
                     "wall_time": statistics.fmean(wall)})
    rows.sort(key=lambda row: (row["dataset"], row["student"], row["method"] != "student alone",
                               row["method"]))
    return rows


def _cell(mean_std):
    mean, std = mean_std
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def format_table(rows, fmt="markdown"):
    """The summary as a Markdown table or CSV text."""
    columns = ["dataset", "teacher", "student", "method", "best top-1", "last top-1", "seeds",
               "epochs", "wall time"]
    if fmt == "csv":
        lines = [",".join(["dataset", "teacher", "student", "method", "best_mean", "best_std",
                           "last_mean", "last_std", "seeds", "epochs", "wall_time_s"])]
        for row in rows:
            lines.append(",".join(str(value) for value in (
                row["dataset"], row["teacher"], row["student"], row["method"],
                f"{row['best'][0]:.4f}", "" if row["best"][1] is None else f"{row['best'][1]:.4f}",
                f"{row['last'][0]:.4f}", "" if row["last"][1] is None else f"{row['last'][1]:.4f}",
                len(row["seeds"]), row["epochs"], f"{row['wall_time']:.1f}")))
        return "\n".join(lines)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join([row["dataset"], row["teacher"], row["student"],
                                        row["method"], _cell(row["best"]), _cell(row["last"]),
                                        str(len(row["seeds"])), row["epochs"],
                                        f"{row['wall_time']:.0f} s"]) + " |")
    return "\n".join(lines)


def plot_curves(runs, path):
    """Save a PNG of test top-1 per epoch, one line per run."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(8, 5))
    # One colour per method, one line style per seed, so methods read as bands.
    methods = sorted({run.method for run in runs})
    seeds = sorted({run.seed for run in runs})
    colors = plt.get_cmap("tab10")
    styles = ["-", "--", ":", "-."]
    for run in sorted(runs, key=lambda run: (run.method, run.seed)):
        label = "student alone" if run.method == "NONE" else run.method
        axis.plot([record["epoch"] for record in run.records],
                  [record["test"]["top1"] for record in run.records],
                  color=colors(methods.index(run.method) % 10),
                  linestyle=styles[seeds.index(run.seed) % len(styles)],
                  label=f"{label}, seed {run.seed}")
    axis.set_xlabel("epoch")
    axis.set_ylabel("test top-1 (%)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
