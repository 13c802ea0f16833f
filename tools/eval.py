"""Evaluate checkpoints on a test set: top-1, top-5, loss, parameters.

    python tools/eval.py output/distill/kd,resnet32x4,resnet8x4,seed0
    python tools/eval.py "output/distill/*/student_best" --csv results.csv
    python tools/eval.py download_ckpts/cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth
"""
import argparse
import csv
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mdistill.analysis.eval_runs import evaluate_checkpoints  # noqa: E402
from mdistill.utils.cli import run_main  # noqa: E402

COLUMNS = ("path", "model", "dataset", "top1", "top5", "loss", "params", "images_per_sec")


def main(argv):
    parser = argparse.ArgumentParser(description="Evaluate checkpoints on a test set.")
    parser.add_argument("checkpoints", nargs="+",
                        help="checkpoint files, run folders or globs (quote them)")
    parser.add_argument("--model", help="architecture, when the checkpoint does not say")
    parser.add_argument("--dataset", help="dataset name (default: the run's, else cifar100)")
    parser.add_argument("--cfg", help="experiment YAML giving the model and dataset")
    parser.add_argument("--data-root", help="dataset folder (default: the run's DATASET.ROOT)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--throughput", action="store_true", help="also time inference")
    parser.add_argument("--ema", action="store_true",
                        help="run folders: evaluate the student's weight average "
                             "(student_ema_best; runs with SOLVER.EMA.ENABLE)")
    parser.add_argument("--csv", help="write the table as CSV to this file")
    parser.add_argument("--json", help="write the results as JSON to this file")
    args = parser.parse_args(argv)
    rows = evaluate_checkpoints(args.checkpoints, model=args.model, dataset=args.dataset,
                                cfg_path=args.cfg, data_root=args.data_root,
                                batch_size=args.batch_size, device=args.device,
                                throughput=args.throughput, ema=args.ema)
    columns = [column for column in COLUMNS if any(column in row for row in rows)]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(_cell(row.get(column, "")) for column in columns) + " |")
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return 0


def _cell(value):
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


if __name__ == "__main__":
    run_main(main)
