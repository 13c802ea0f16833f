"""Train a student with one distillation method.

    python tools/train.py --cfg configs/cifar100/kd.yaml [KEY VALUE ...]
    python tools/train.py --cfg configs/cifar100/kd.yaml --resume
    python tools/train.py --cfg configs/cifar100/kd.yaml KD.TEMPERATURE 8 --resume
    python tools/train.py --resume-from output/cifar100_baselines/kd,resnet32x4,resnet8x4,seed0
    torchrun --nproc_per_node 4 tools/train.py --cfg configs/cifar100/kd.yaml
"""
import time

STARTED = time.perf_counter()   # before the imports: they count as the run's start-up

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mdistill.engine.launch import RunStopped, shutdown, train  # noqa: E402
from mdistill.utils.cli import run_main, split_trailing_options  # noqa: E402


def main(argv):
    parser = argparse.ArgumentParser(description="Train a student by knowledge distillation.")
    parser.add_argument("--cfg", help="experiment YAML file")
    parser.add_argument("--resume", action="store_true",
                        help="continue the newest run of this config from its 'latest' checkpoint")
    parser.add_argument("--resume-from", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR (its config.yaml is used when --cfg "
                             "is not given)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    opts, trailing = split_trailing_options(args.opts, with_value=("--cfg", "--resume-from"))
    args = parser.parse_args(trailing, namespace=args)
    args.opts = opts
    if args.cfg is None and args.resume_from is None:
        parser.error("--cfg FILE is required (or --resume-from RUN_DIR)")
    try:
        train(args.cfg, args.opts, resume=args.resume_from or args.resume or None,
              started=STARTED)
    except RunStopped as stopped:
        return stopped.exit_code        # 130 after SIGINT, 143 after SIGTERM
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    run_main(main)
