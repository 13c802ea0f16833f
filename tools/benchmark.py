"""Measure training speed of a config for each AMP and channels_last setting.

    python tools/benchmark.py --cfg configs/cifar100/kd.yaml
    python tools/benchmark.py --cfg configs/cifar100/kd.yaml --amp none bf16 \
        --channels-last on --append docs/benchmarks.md

Each setting runs in its own process (so peak memory and kernel caches are its
own) on synthetic CIFAR-sized data through the real trainer step.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mdistill.config import load_cfg  # noqa: E402
from mdistill.engine.benchmark import bare_compute, benchmark_setting, format_rows, report  # noqa: E402
from mdistill.engine.builder import resolve_device  # noqa: E402
from mdistill.utils.cli import run_main  # noqa: E402


def main(argv):
    parser = argparse.ArgumentParser(description="Benchmark training throughput of a config.")
    parser.add_argument("--cfg", required=True, help="experiment YAML file")
    parser.add_argument("--amp", nargs="+", default=["none", "bf16"],
                        choices=["none", "bf16", "fp16"], help="AMP settings to measure")
    parser.add_argument("--channels-last", nargs="+", default=["off", "on"],
                        choices=["off", "on"], help="memory formats to measure")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--iters", type=int, default=30, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations first")
    parser.add_argument("--append", metavar="FILE", help="append the table to this Markdown file")
    parser.add_argument("--no-bare", action="store_true",
                        help="skip the bare-models baseline (teacher forward + student step on "
                             "a fixed tensor) that the pipeline overhead is measured against")
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    load_cfg(args.cfg, args.opts)          # a bad config fails here, once
    if args.single:
        setting = (args.cfg, args.opts, args.amp[0], args.channels_last[0] == "on", args.iters,
                   args.warmup, args.batch_size)
        row = benchmark_setting(*setting)
        if not args.no_bare:
            row["bare_images_per_sec"] = bare_compute(*setting)
        print("RESULT " + json.dumps(row))
        return 0
    rows = []
    for amp in args.amp:
        for layout in args.channels_last:
            command = [sys.executable, os.path.abspath(__file__), "--single", "--cfg", args.cfg,
                       "--amp", amp, "--channels-last", layout, "--batch-size",
                       str(args.batch_size), "--iters", str(args.iters), "--warmup",
                       str(args.warmup), *(["--no-bare"] if args.no_bare else []), *args.opts]
            result = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
            if result.returncode != 0 or not lines:
                message = (result.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"amp {amp}, channels_last {layout}: failed: {message}", file=sys.stderr)
                continue
            rows.append(json.loads(lines[-1][len("RESULT "):]))
            print(f"amp {amp}, channels_last {layout}: "
                  f"{rows[-1]['images_per_sec']:.1f} images/s", file=sys.stderr)
    if not rows:
        return 1
    print(format_rows(rows))
    if args.append:
        device = resolve_device(load_cfg(args.cfg, args.opts).DEVICE)
        command = "python tools/benchmark.py " + " ".join(shlex.quote(a) for a in argv)
        with open(args.append, "a") as handle:
            handle.write(report(args.cfg, args.opts, rows, device, args.batch_size, args.iters,
                                args.warmup, command))
    return 0


if __name__ == "__main__":
    run_main(main)
