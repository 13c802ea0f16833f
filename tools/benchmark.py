"""Measure the training speed of a config against its bare models.

    python tools/benchmark.py --cfg configs/cifar100/kd.yaml
    python tools/benchmark.py --cfg configs/cifar100/kd.yaml --amp none bf16 \
        --channels-last on --teacher-cache off warm --append docs/benchmarks.md
    python tools/benchmark.py --cfg configs/cifar100/dkd/res32x4_res8x4.yaml --data real
    python tools/benchmark.py --cfg configs/cifar100/kd.yaml --whole-run 1 \
        DATASET.TYPE synthetic DATASET.SYNTHETIC.NUM_TRAIN 5000

Each (AMP, channels_last, teacher cache) setting runs in its own process (so
peak memory and kernel caches are its own) through the real trainer step, and
is compared with the method's own step on the same models with nothing else
("bare models"). Data are a synthetic stand-in with DATASET.SYNTHETIC's image
size and classes (--data synthetic) or the config's dataset (--data real).
--whole-run N times a whole N-epoch tools/train.py process instead.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mdistill.analysis.benchmark import (CACHE_MODES, DATA_MODES, benchmark_setting,  # noqa: E402
                                         format_rows, report, whole_run)
from mdistill.config import load_cfg  # noqa: E402
from mdistill.engine.builder import resolve_device  # noqa: E402
from mdistill.utils.cli import run_main  # noqa: E402


def main(argv):
    parser = argparse.ArgumentParser(description="Benchmark training throughput of a config.")
    parser.add_argument("--cfg", required=True, help="experiment YAML file")
    parser.add_argument("--amp", nargs="+", default=["none", "bf16"],
                        choices=["none", "bf16", "fp16"], help="AMP settings to measure")
    parser.add_argument("--channels-last", nargs="+", default=["off", "on"],
                        choices=["off", "on"], help="memory formats to measure")
    parser.add_argument("--teacher-cache", nargs="+", default=["off"], choices=CACHE_MODES,
                        help="teacher cache settings: off, cold (empty), warm (filled)")
    parser.add_argument("--data", default="synthetic", choices=DATA_MODES,
                        help="synthetic stand-in of DATASET.SYNTHETIC's shape, or the "
                             "config's own dataset")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--iters", type=int, default=30, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations first")
    parser.add_argument("--whole-run", type=int, default=0, metavar="EPOCHS",
                        help="time a whole tools/train.py run of EPOCHS epochs (the config and "
                             "overrides as given) against the bare models")
    parser.add_argument("--append", metavar="FILE", help="append the table to this Markdown file")
    parser.add_argument("--no-bare", action="store_true",
                        help="skip the bare-models baseline (the method's own step on the same "
                             "models on a fixed batch) that the pipeline is compared to")
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    load_cfg(args.cfg, args.opts)          # a bad config fails here, once
    if args.whole_run:
        result = whole_run(args.cfg, args.opts, epochs=args.whole_run, iters=args.iters,
                           warmup=args.warmup)
        result.pop("log")
        print(json.dumps(result))
        print(f"whole run: {result['wall_s']:.1f} s wall, {result['cpu_s']:.1f} s CPU for "
              f"{result['images']} training images (training loop {result['loop_s']:.1f} s); "
              f"bare models {result['bare_s']:.1f} s wall, {result['bare_cpu_s']:.1f} s CPU; "
              f"overhead {100 * result['overhead']:+.1f}% wall, "
              f"{100 * result['cpu_overhead']:+.1f}% CPU", file=sys.stderr)
        return 0
    if args.single:
        row = benchmark_setting(args.cfg, args.opts, args.amp[0], args.channels_last[0] == "on",
                                args.iters, args.warmup, args.batch_size, args.teacher_cache[0],
                                args.data, bare=not args.no_bare)
        print("RESULT " + json.dumps(row))
        return 0
    rows = []
    for amp in args.amp:
        for layout in args.channels_last:
            for cache in args.teacher_cache:
                name = f"amp {amp}, channels_last {layout}, teacher cache {cache}"
                command = [sys.executable, os.path.abspath(__file__), "--single", "--cfg",
                           args.cfg, "--amp", amp, "--channels-last", layout, "--teacher-cache",
                           cache, "--data", args.data, "--batch-size", str(args.batch_size),
                           "--iters", str(args.iters), "--warmup", str(args.warmup),
                           *(["--no-bare"] if args.no_bare else []), *args.opts]
                result = subprocess.run(command, capture_output=True, text=True)
                lines = [line for line in result.stdout.splitlines()
                         if line.startswith("RESULT ")]
                if result.returncode != 0 or not lines:
                    message = (result.stderr.strip().splitlines() or ["no output"])[-1]
                    print(f"{name}: failed: {message}", file=sys.stderr)
                    continue
                row = json.loads(lines[-1][len("RESULT "):])
                if "skipped" in row:
                    print(f"{name}: skipped: {row['skipped']}", file=sys.stderr)
                    continue
                rows.append(row)
                print(f"{name}: {row['images_per_sec']:.1f} images/s", file=sys.stderr)
    if not rows:
        return 1
    print(format_rows(rows))
    if args.append:
        device = resolve_device(load_cfg(args.cfg, args.opts).DEVICE)
        command = "python tools/benchmark.py " + " ".join(shlex.quote(a) for a in argv)
        with open(args.append, "a") as handle:
            handle.write(report(args.cfg, args.opts, rows, device, args.batch_size, args.iters,
                                args.warmup, command, args.data))
    return 0


if __name__ == "__main__":
    run_main(main)
