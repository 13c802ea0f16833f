"""Search hyper-parameters with Optuna on the validation split.

    python tools/tune.py --cfg configs/cifar100/dkd.yaml \
        --space DKD.BETA=log:1:16 DKD.T=int:1:8 --trials 40 --storage dkd.journal \
        DATASET.VAL_FRACTION 0.1 SOLVER.EPOCHS 60
    python tools/tune.py ... --backend local --jobs 4        # 4 workers, a GPU each
    python tools/tune.py ... --backend slurm --jobs 8 --partition gpu --time-limit 600
    python tools/tune.py ... --report --plot                 # the table, best YAML, plots

Kinds: log:LOW:HIGH and float:LOW:HIGH (floats, log or even), int:LOW:HIGH,
choice:A,B,C. The study is kept in the journal file --storage (no server; put it
on a disk every worker sees); running the same command again resumes it, up to
--trials finished trials. Each trial trains in OUT/<project>/trial<N> and reports
its validation top-1 after every epoch, so the median pruner stops weak ones early.
The best trial's config is written as a YAML that tools/train.py --cfg runs as it is.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mdistill.analysis.sweep import BACKENDS, Backend, separate_overrides  # noqa: E402
from mdistill.analysis.tune import (TuneSettings, check_settings, launch_workers,  # noqa: E402
                                    load_study, parse_space, plot_study, trials_table, tune,
                                    write_best_config)
from mdistill.errors import UserError  # noqa: E402
from mdistill.utils.cli import run_main  # noqa: E402


def main(argv):
    parser = argparse.ArgumentParser(
        description="Tune config keys with Optuna: each trial trains a run; the objective is "
                    "its best validation top-1 (DATASET.VAL_FRACTION > 0), reported per epoch "
                    "for pruning.",
        epilog="KEY VALUE pairs anywhere on the line override every trial's config.")
    parser.add_argument("--cfg", required=True, help="experiment YAML")
    parser.add_argument("--space", nargs="+", required=True, metavar="KEY=KIND:...",
                        help="searched keys: KEY=log:LOW:HIGH, float:LOW:HIGH, int:LOW:HIGH "
                             "or choice:A,B")
    parser.add_argument("--trials", type=int, default=20,
                        help="finished (complete or pruned) trials the study should have")
    parser.add_argument("--storage", required=True, metavar="FILE",
                        help="the study's Optuna journal file (created if missing)")
    parser.add_argument("--study", help="the study's name (default: the config's file name)")
    parser.add_argument("--out", help="the trials' runs (default output/tune_<study>)")
    parser.add_argument("--best", metavar="FILE.yaml",
                        help="where the best config goes (default <out>/best.yaml)")
    parser.add_argument("--pruner", choices=("median", "none"), default="median")
    parser.add_argument("--seed", type=int, help="the samplers' seed (worker i: seed + i)")
    parser.add_argument("--backend", choices=BACKENDS,
                        help="workers as submitit jobs (default: trials in this process)")
    parser.add_argument("--jobs", type=int, default=1, help="workers sharing the study")
    parser.add_argument("--gpus-per-run", type=int, default=1, help="GPUs of each worker")
    parser.add_argument("--time-limit", type=float, metavar="MINUTES", help="per worker job")
    parser.add_argument("--partition", help="SLURM partition")
    parser.add_argument("--report", action="store_true",
                        help="run no trial: print the table and write the best config")
    parser.add_argument("--plot", action="store_true",
                        help="also save Optuna's history, intermediate-value and slice plots")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    options, opts = separate_overrides(argv)
    args = parser.parse_args(options)

    study_name = args.study or os.path.splitext(os.path.basename(args.cfg))[0]
    settings = TuneSettings(config=args.cfg, space=parse_space(args.space), opts=opts,
                            storage=args.storage, study=study_name, trials=args.trials,
                            out=args.out or os.path.join("output", f"tune_{study_name}"),
                            pruner=args.pruner, sampler_seed=args.seed)
    check_settings(settings)
    if args.report:
        study = load_study(settings, create=False)
    elif args.backend is None:
        study = tune(settings)
    else:
        backend = Backend(args.backend, jobs=args.jobs, gpus_per_run=args.gpus_per_run,
                          time_limit=args.time_limit, partition=args.partition)
        launch_workers(settings, backend)
        if args.backend == "slurm":
            print("when the workers have ended: python tools/tune.py ... --report "
                  "(the same --cfg, --space, --storage)")
            return 0
        study = load_study(settings)
    table = trials_table(study)
    print(table)
    os.makedirs(settings.out, exist_ok=True)
    with open(os.path.join(settings.out, "trials.md"), "w") as handle:
        handle.write(table + "\n")
    try:
        path, trial = write_best_config(study, settings, args.best or os.path.join(
            settings.out, "best.yaml"))
    except UserError as error:
        print(f"no best config yet: {error}", file=sys.stderr)
        return 1
    print(f"best: trial {trial.number}, validation top-1 {trial.value:.2f}; config: {path} "
          f"(python tools/train.py --cfg {path})")
    if args.plot:
        for written in plot_study(study, os.path.join(settings.out, "study")):
            print(f"plot: {written}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
