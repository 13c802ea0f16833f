"""Pictures of compared runs, per method over seeds.

* :func:`plot_curves`: the mean test top-1 per epoch of each method, with the
  seeds' spread (lowest to highest) as a band.
* :func:`plot_bars`: best and last test top-1 of each method as horizontal bars
  with the seeds' standard deviation as error bars, sorted best first, with the
  student alone and the teacher(s) as reference lines.

Both read what :func:`~mdistill.analysis.compare.load_runs` reads, plus the
teacher's accuracy each run logs once in its ``log.txt`` (``teacher NAME ...:
test top-1 X``). Both stay readable with 25 methods: 60 distinct colours, the
legend beside the axes, one bar row per method whose figure grows with them.
They draw on the Agg canvas directly, leaving pyplot's global backend alone.

Example::

    runs = load_runs(["output/sweep_kd"])
    plot_runs(runs, "output/sweep_kd/curves.png")   # also curves_bars.png
"""
import os
import re
import statistics

from ..errors import UserError
from .compare import summarize

# The line launch.train logs for each teacher before training.
TEACHER_LINE = re.compile(r"^teacher (\S+)(?: \(.*\))?: test top-1 ([0-9.]+)")
PALETTES = ("tab20", "tab20b", "tab20c")


def _matplotlib():
    try:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib "
                        "(or pip install -e \".[dev]\")") from None
    return colormaps, FigureCanvasAgg, Figure


def colours(count):
    """``count`` colours, distinct up to 60 (tab20, tab20b, tab20c), then repeating."""
    colormaps = _matplotlib()[0]
    if count <= 10:
        palette = [colormaps["tab10"](index) for index in range(10)]
    else:       # the listed maps take an integer as the index of their colour
        palette = [colormaps[name](index) for name in PALETTES for index in range(20)]
    return [palette[index % len(palette)] for index in range(count)]


def teacher_top1(run):
    """``{teacher name: test top-1}`` as the run's log.txt reports them (empty when
    it has no log or no teacher)."""
    found = {}
    try:
        with open(os.path.join(run.path, "log.txt"), errors="replace") as handle:
            for line in handle:
                match = TEACHER_LINE.match(line.strip())
                if match:
                    found[match.group(1)] = float(match.group(2))
    except OSError:
        pass
    return found


def _several_pairs(groups):
    pairs = {(group.dataset, group.teacher, group.student) for group in groups
             if group.teacher != "-"}
    students = {(group.dataset, group.student) for group in groups}
    return len(pairs) > 1 or len(students) > 1


def method_name(group, several_pairs):
    """What one colour or one bar stands for: the group's label, and its pair when
    the runs hold several."""
    if not several_pairs:
        return group.label
    pair = group.student if group.teacher == "-" else f"{group.teacher}→{group.student}"
    return f"{pair}: {group.label}"


def epoch_band(group):
    """``(epochs, mean, lowest, highest)`` of the group's test top-1 per epoch,
    over the seeds that have finished that epoch."""
    by_epoch = {}
    for run in group.runs:
        for record in run.records:
            by_epoch.setdefault(record["epoch"], []).append(record["test"]["top1"])
    epochs = sorted(by_epoch)
    return (epochs, [statistics.fmean(by_epoch[epoch]) for epoch in epochs],
            [min(by_epoch[epoch]) for epoch in epochs], [max(by_epoch[epoch]) for epoch in epochs])


def reference_lines(groups):
    """``[(label, top-1)]``: each teacher's test top-1 (the mean of what the runs
    logged for it) and the student alone's best top-1 (mean over seeds), to
    draw across the methods."""
    teachers = {}
    for group in groups:
        for run in group.runs:
            for name, top1 in teacher_top1(run).items():
                teachers.setdefault(name, []).append(top1)
    lines = [(f"teacher {name}", statistics.fmean(values))
             for name, values in sorted(teachers.items())]
    several = len({group.student for group in groups}) > 1
    for group in groups:
        mean = group.best[0]
        if group.teacher == "-" and mean is not None:
            label = "student alone" + (f" ({group.student})" if several else "")
            if group.settings:
                label += f" ({group.settings_text})"
            lines.append((label, mean))
    return lines


def bar_rows(groups):
    """``[(name, (best mean, std), (last mean, std))]``, the best first; a group
    without a best epoch yet (an init stage) sorts last."""
    several = _several_pairs(groups)
    rows = [(method_name(group, several), group.best, group.last) for group in groups]
    return sorted(rows, key=lambda row: (row[1][0] is None, -(row[1][0] or 0.0)))


def _groups(runs, path):
    """The runs' groups, once the picture can be drawn and written."""
    _matplotlib()
    if not runs:
        raise UserError("no runs to plot")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"cannot write {path}: no folder {folder}")
    return summarize(runs, warn=lambda text: None)


def _axis(size):
    """One axis on a figure of ``size`` inches with its own Agg canvas."""
    _, FigureCanvasAgg, Figure = _matplotlib()
    figure = Figure(figsize=size)
    FigureCanvasAgg(figure)
    return figure.add_subplot()


def _save(figure, path):
    try:
        figure.savefig(path, dpi=120, format="png")
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None
    return path


def _default_title(groups):
    if _several_pairs(groups):
        return None
    first = groups[-1]      # a distilled group when there is one: they sort last
    pair = first.student if first.teacher == "-" else f"{first.teacher} → {first.student}"
    return f"{first.dataset}: {pair}"


def plot_curves(runs, path, title=None):
    """Save a PNG of each method's mean test top-1 per epoch, its seeds' spread
    (lowest to highest) shaded, and the teachers as dashed lines.

    Args:
        runs: :class:`~mdistill.analysis.compare.Run` objects.
        path: the PNG file to write.
        title: the figure title; by default the pair when all runs share one.

    Returns:
        ``path``.

    Raises:
        UserError: matplotlib is not installed, no runs, or ``path`` cannot be written.
    """
    groups = _groups(runs, path)
    several = _several_pairs(groups)
    palette = colours(len(groups))
    axis = _axis((11 if len(groups) > 8 else 8, 5.5))
    figure = axis.figure
    for group, colour in zip(groups, palette):
        epochs, mean, low, high = epoch_band(group)
        seeds = len(group.runs)
        axis.plot(epochs, mean, color=colour, linewidth=1.4, marker="o" if len(epochs) == 1
                  else None, label=f"{method_name(group, several)} ({seeds} seed"
                                   f"{'s' if seeds > 1 else ''})")
        if seeds > 1:
            axis.fill_between(epochs, low, high, color=colour, alpha=0.18, linewidth=0)
    for label, top1 in reference_lines(groups):
        if label.startswith("teacher"):
            axis.axhline(top1, color="0.3", linestyle="--", linewidth=1.0,
                         label=f"{label}: {top1:.2f}")
    title = _default_title(groups) if title is None else title
    if title:
        axis.set_title(title)
    axis.set_xlabel("epoch")
    axis.set_ylabel("test top-1 (%), mean; band: lowest to highest seed")
    axis.grid(alpha=0.3)
    entries = len(groups) + len(reference_lines(groups))
    if entries > 8:     # beside the axes, so 25 methods do not cover the curves
        axis.legend(fontsize=7, ncol=1 if entries <= 24 else 2, loc="upper left",
                    bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    else:
        axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    return _save(figure, path)


def plot_bars(runs, path, title=None):
    """Save a PNG of each method's best and last test top-1 (mean over seeds,
    standard deviation as error bars), sorted best first, with the student alone
    and each teacher as vertical reference lines. Arguments, result and errors
    as :func:`plot_curves`'s; the figure grows by a row per method.
    """
    groups = _groups(runs, path)
    rows = bar_rows(groups)
    references = reference_lines(groups)
    axis = _axis((9, max(3.0, 1.6 + 0.42 * len(rows))))
    figure = axis.figure
    height = 0.38
    values = []
    for index, (name, best, last) in enumerate(rows):
        for offset, (mean, std), colour, what in ((-height / 2, best, "tab:blue", "best epoch"),
                                                  (height / 2, last, "tab:orange", "last epoch")):
            if mean is None:
                continue
            axis.barh(index + offset, mean, height=height, xerr=std or 0.0, color=colour,
                      error_kw={"elinewidth": 1.0, "capsize": 2},
                      label=what if index == 0 else None)
            axis.text(mean + (std or 0.0), index + offset, f" {mean:.2f}", va="center",
                      fontsize=7)
            values += [mean - (std or 0.0), mean + (std or 0.0)]
    styles = iter(("--", ":", "-.", (0, (5, 1)), (0, (1, 3))))
    for label, top1 in references:
        colour = "0.2" if label.startswith("teacher") else "tab:red"
        axis.axvline(top1, color=colour, linestyle=next(styles, "--"), linewidth=1.1,
                     label=f"{label}: {top1:.2f}")
        values.append(top1)
    if values:      # zoom in: differences of a fraction of a percent must show
        low, high = min(values), max(values)
        margin = max(1.0, 0.08 * (high - low))
        axis.set_xlim(max(0.0, low - margin), min(100.0, high + 2.5 * margin))
    axis.set_yticks(range(len(rows)))
    axis.set_yticklabels([name for name, _, _ in rows], fontsize=8)
    axis.invert_yaxis()     # the best on top
    axis.set_xlabel("test top-1 (%), mean over seeds ± std")
    title = _default_title(groups) if title is None else title
    if title:
        axis.set_title(title)
    axis.grid(axis="x", alpha=0.3)
    axis.legend(fontsize=7, loc="best")
    figure.tight_layout()
    return _save(figure, path)


def plot_runs(runs, path):
    """Both pictures: the curves at ``path`` and the bars beside it
    (``curves.png`` -> ``curves_bars.png``).

    Returns:
        ``[curves path, bars path]``.
    """
    stem, extension = os.path.splitext(path)
    return [plot_curves(runs, path), plot_bars(runs, f"{stem}_bars{extension or '.png'}")]
