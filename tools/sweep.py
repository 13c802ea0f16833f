"""Run many trainings: configs x grid x seeds, as SLURM jobs or on this machine.

    python tools/sweep.py --cfg configs/cifar100/kd.yaml configs/cifar100/dkd.yaml \
        --seeds 0 1 2 --backend local --jobs 4 --out output/sweep_kd
    python tools/sweep.py --cfg configs/cifar100/kd.yaml --grid KD.TEMPERATURE=2,4,8 \
        --seeds 0 1 --backend slurm --partition gpu --gpus-per-run 1 --time-limit 240 \
        --jobs 8 --sbatch mem=32G --out output/kd_temperature SOLVER.EPOCHS 240
    python tools/sweep.py --spec sweep.yaml --backend local --out output/sweep
    python tools/sweep.py --status output/kd_temperature
    python tools/sweep.py --retry-failed output/kd_temperature
    python tools/compare.py output/kd_temperature --plot output/kd_temperature/curves.png

Runs land in OUT/<EXPERIMENT.PROJECT>/<run name>, named as tools/train.py names
them. Launching again skips the runs that are done or still in flight and
resumes the others from their checkpoints. A run that reaches its time limit
(SLURM) or is preempted saves at the end of its step, is requeued and resumes.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mdistill.analysis.sweep import (BACKENDS, Backend, SweepFiles, describe_runs,  # noqa: E402
                                     exit_code, expand, format_status, launch, load_spec,
                                     parse_grid, separate_overrides, sweep_status)
from mdistill.errors import UserError  # noqa: E402
from mdistill.utils.cli import run_main  # noqa: E402

def parse_sbatch(items):
    flags = {}
    for item in items or ():
        key, equals, value = item.partition("=")
        if not key:
            raise UserError(f"--sbatch {item!r}: write FLAG=VALUE (e.g. mem=32G) or FLAG")
        flags[key.lstrip("-")] = value if equals else True
    return flags


def backend_from(args, stored=None):
    """The backend of the command line; with ``stored`` (a retried sweep's), what
    the command line does not give comes from it."""
    given = {"name": args.backend, "jobs": args.jobs, "gpus_per_run": args.gpus_per_run,
             "time_limit": args.time_limit, "partition": args.partition,
             "cpus_per_task": args.cpus_per_task, "sbatch": parse_sbatch(args.sbatch) or None,
             "signal_delay": args.signal_delay, "max_requeues": args.max_requeues}
    values = dict(stored or {})
    values.update({key: value for key, value in given.items() if value is not None})
    return Backend(**values)


def main(argv):
    parser = argparse.ArgumentParser(
        description="Launch, follow and retry a sweep of training runs (configs x grid x "
                    "seeds) on SLURM or on this machine, through submitit.",
        epilog="KEY VALUE pairs anywhere on the line override every run's config.")
    parser.add_argument("--cfg", nargs="+", default=[], metavar="FILE", help="experiment YAMLs")
    parser.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2",
                        help="every combination of these values (commas inside [...] stay)")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds of every run")
    parser.add_argument("--spec", metavar="FILE",
                        help="a YAML with configs, grid, seeds, overrides (added to the options)")
    parser.add_argument("--out", help="the sweep's folder (LOG.PREFIX of every run)")
    parser.add_argument("--backend", choices=BACKENDS,
                        help="local: this machine, --jobs at once, a GPU each when there are "
                             "GPUs; slurm: one job array; debug: in this process, in turn")
    parser.add_argument("--jobs", type=int, help="runs at once (default 1)")
    parser.add_argument("--gpus-per-run", type=int,
                        help="processes per run, one per GPU (on CPUs: that many over gloo)")
    parser.add_argument("--time-limit", type=float, metavar="MINUTES",
                        help="per job; needed for slurm (a longer run is requeued and resumes)")
    parser.add_argument("--partition", help="SLURM partition")
    parser.add_argument("--cpus-per-task", type=int, help="SLURM cpus per task")
    parser.add_argument("--sbatch", nargs="+", metavar="FLAG=VALUE",
                        help="more #SBATCH flags, e.g. mem=32G account=proj exclusive")
    parser.add_argument("--signal-delay", type=int, metavar="SECONDS",
                        help="SIGUSR2 this long before the time limit (default 120)")
    parser.add_argument("--max-requeues", type=int,
                        help="time limits or preemptions a run may meet (default 5)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print each run's folder, config and overrides; launch nothing")
    parser.add_argument("--status", metavar="DIR", help="print each run's state and exit")
    parser.add_argument("--retry-failed", metavar="DIR",
                        help="launch again the runs of DIR's sweep that failed, stopped or "
                             "never started")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    options, opts = separate_overrides(argv)
    args = parser.parse_args(options)

    if args.status:
        print(format_status(sweep_status(args.status)))
        return 0
    if args.retry_failed:
        manifest = SweepFiles(args.retry_failed).read_manifest()
        backend = backend_from(args, manifest.get("backend"))
        return exit_code(launch(None, args.retry_failed, backend, retry_failed=True))

    spec = load_spec(args.spec) if args.spec else {"configs": [], "grid": {}, "seeds": None,
                                                   "overrides": []}
    grid = dict(spec["grid"])
    for key, values in parse_grid(args.grid).items():
        grid[key] = values
    if not args.out:
        parser.error("--out DIR is required (the sweep's folder)")
    runs = expand(spec["configs"] + args.cfg, grid, args.seeds or spec["seeds"],
                  spec["overrides"] + opts, args.out)
    if args.dry_run:
        print(describe_runs(runs))
        print(f"{len(runs)} runs", file=sys.stderr)
        return 0
    if args.backend is None:
        parser.error(f"--backend is required ({', '.join(BACKENDS)})")
    backend = backend_from(args)
    print(f"{len(runs)} runs into {os.path.abspath(args.out)} ({backend.name})", flush=True)
    return exit_code(launch(runs, args.out, backend, log=lambda text: print(text, flush=True)))


if __name__ == "__main__":
    run_main(main)
