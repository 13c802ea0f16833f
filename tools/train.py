"""Train a student with one distillation method.

    python tools/train.py --cfg configs/cifar100/kd.yaml [KEY VALUE ...]
    python tools/train.py --cfg configs/cifar100/kd.yaml --resume
    torchrun --nproc_per_node 4 tools/train.py --cfg configs/cifar100/kd.yaml
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mdistill.engine.launch import shutdown, train  # noqa: E402
from mdistill.utils.cli import run_main  # noqa: E402


def main(argv):
    parser = argparse.ArgumentParser(description="Train a student by knowledge distillation.")
    parser.add_argument("--cfg", help="experiment YAML file")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_DIR",
                        help="continue the newest run of this config, or the run folder given")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    if args.cfg is None and not isinstance(args.resume, str):
        parser.error("--cfg FILE is required (or --resume RUN_DIR)")
    try:
        _, history = train(args.cfg, args.opts, resume=args.resume)
    finally:
        shutdown()
    return 0 if history is not None else 143


if __name__ == "__main__":
    run_main(main)
