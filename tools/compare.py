"""Compare runs: best and last test top-1 (mean ± std over seeds) per method.

    python tools/compare.py output/cifar100_baselines
    python tools/compare.py "output/demo/digits_students/*" --format csv --out table.csv
    python tools/compare.py output/demo/digits_students --plot curves.png
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mdistill.engine.compare import format_table, load_runs, plot_curves, summarize  # noqa: E402
from mdistill.utils.cli import run_main  # noqa: E402


def main(argv):
    parser = argparse.ArgumentParser(description="Tabulate runs by method, over seeds.")
    parser.add_argument("runs", nargs="+", help="run folders, folders of runs, or globs")
    parser.add_argument("--format", choices=["markdown", "csv"], default="markdown")
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--plot", metavar="PNG", help="save test top-1 per epoch curves here")
    args = parser.parse_args(argv)
    runs = load_runs(args.runs, warn=lambda text: print(f"warning: {text}", file=sys.stderr))
    table = format_table(summarize(runs), args.format)
    print(table)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(table + "\n")
    if args.plot:
        print(f"curves: {plot_curves(runs, args.plot)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
