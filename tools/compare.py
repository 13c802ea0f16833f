"""Tabulate runs: best and last test top-1 per method, mean ± std over seeds.

    python tools/compare.py output/cifar100_baselines
    python tools/compare.py "output/table_*/kd,*" "output/table_*/vanilla,*" --format csv
    python tools/compare.py output/cifar100_baselines --out table.md --plot curves.png
    python tools/compare.py output/cifar100_baselines --timing

--plot curves.png writes two pictures: curves.png (each method's mean test top-1
per epoch, the seeds' spread as a band) and curves_bars.png (best and last top-1
per method with error bars, sorted, the student alone and the teacher as lines).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mdistill.analysis.compare import (FORMATS, format_table, load_runs,  # noqa: E402
                                       save_text, summarize, timing_summary)
from mdistill.analysis.plots import plot_runs  # noqa: E402
from mdistill.utils.cli import run_main  # noqa: E402


def main(argv):
    parser = argparse.ArgumentParser(
        description="Group runs whose configs differ only in the seed (each run's "
                    "config.yaml is read; paths and logging keys aside) and print test top-1 "
                    "(best epoch and last epoch) as mean ± std over seeds. A seed run twice "
                    "is counted once, with a warning.")
    parser.add_argument("runs", nargs="+", metavar="RUN_OR_GLOB",
                        help="run folders, folders holding runs (e.g. output/<project>), or "
                             "quoted glob patterns")
    parser.add_argument("--format", choices=FORMATS, default="markdown")
    parser.add_argument("--out", metavar="FILE", help="also write the table to FILE")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="save each method's curve (mean over seeds, the spread as a "
                             "band) there and its bars of best/last top-1 beside it as "
                             "FILE_bars.png (needs matplotlib)")
    parser.add_argument("--timing", action="store_true",
                        help="also print where the runs' wall time went (start-up, the "
                             "teacher's test pass, training, evaluation, checkpoints), from "
                             "each run's timing.json")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    args = parser.parse_args(argv)
    runs = load_runs(args.runs)
    table = format_table(summarize(runs), args.format)
    print(table)
    if args.timing:
        print("\n" + (timing_summary(runs) or "no run has a timing.json"))
    if args.out:
        save_text(table, args.out)
    if args.plot:
        curves, bars = plot_runs(runs, args.plot)
        print(f"curves: {curves}\nbars: {bars}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
