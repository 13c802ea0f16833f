#!/usr/bin/env bash
# Train methods x seeds for one teacher/student pair, then tabulate and plot them.
#
#   scripts/run_table.sh CONFIG_DIR "METHODS" "SEEDS" [KEY VALUE ...]
#
#   scripts/run_table.sh configs/cifar100 "vanilla kd fitnet at rkd crd advkd" "0 1 2"
#   PAIR=vgg13_vgg8 scripts/run_table.sh configs/cifar100 "vanilla kd crd" "0 1 2"
#   GPUS="0 1 2 3" scripts/run_table.sh configs/cifar100 "kd crd" "0 1" SOLVER.AMP bf16
#
# A thin wrapper over tools/sweep.py (local backend). A method maps to
# CONFIG_DIR/<method>.yaml, or CONFIG_DIR/<method>/<PAIR>.yaml when PAIR is set;
# "vanilla" trains the student alone with CONFIG_DIR/vanilla/<student>.yaml, the
# student read from the first other method's config (or given as STUDENT=<model>).
# KEY VALUE pairs override every run's config. Runs go one at a time, or with
# GPUS="0 1" one per GPU at a time (job logs in TABLE_DIR/.sweep/jobs/). Every run
# lands in TABLE_DIR = PREFIX/TABLE (default output/<dataset>_<teacher>_<student>);
# then tools/compare.py writes table.md, curves.png and curves_bars.png there.
# Ctrl-C stops every run after a saved checkpoint. Running it again skips the runs
# that are done and resumes the others; `python tools/sweep.py --status TABLE_DIR`
# shows where each stands.
#
# Environment: PAIR, GPUS, STUDENT, PREFIX (output), TABLE, PYTHON (python).
set -euo pipefail

usage() { sed -n '2,22p' "$0" | sed -e 's/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 2; }

if [ $# -lt 3 ]; then
  usage >&2
  exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1%/}; METHODS=$2; SEEDS=$3; shift 3
PYTHON=${PYTHON:-python}
PAIR=${PAIR:-}
PREFIX=${PREFIX:-output}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

[ -d "$DIR" ] || die "no config folder $DIR"
read -r -a methods <<< "$METHODS"
read -r -a seeds <<< "$SEEDS"
[ ${#methods[@]} -gt 0 ] || die "no methods given"
[ ${#seeds[@]} -gt 0 ] || die "no seeds given"
for (( i = 0; i < $#; i += 2 )); do
  key=${*:i+1:1}
  case $key in
    EXPERIMENT.SEED | EXPERIMENT.PROJECT | EXPERIMENT.NAME | LOG.PREFIX)
      die "$key is set by this script (use the SEEDS argument, TABLE or PREFIX)" ;;
  esac
done

# Prints "dataset teacher student" of a config with the overrides applied.
describe() {
  "$PYTHON" -c 'import sys
from mdistill.config import load_cfg
from mdistill.utils.cli import run_main
def main(argv):
    cfg = load_cfg(argv[0], argv[1:])
    print(cfg.DATASET.TYPE, cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT)
run_main(main)' "$@"
}

dataset="" teacher="" student=${STUDENT:-} configs=()
for method in "${methods[@]}"; do
  [ "$method" != vanilla ] || continue
  if [ -n "$PAIR" ]; then config="$DIR/$method/$PAIR.yaml"; else config="$DIR/$method.yaml"; fi
  [ -f "$config" ] || die "no config $config for method $method"
  configs+=("$config")
  if [ -z "$teacher" ]; then
    read -r dataset teacher first_student <<< "$(describe "$config" "$@")"
    student=${student:-$first_student}
  fi
done
for method in "${methods[@]}"; do
  [ "$method" = vanilla ] || continue
  [ -n "$student" ] || die "vanilla needs the student: add a method whose config names it, or set STUDENT"
  config="$DIR/vanilla/$student.yaml"
  [ -f "$config" ] || die "no config $config for the student alone ($student)"
  [ -n "$dataset" ] || read -r dataset _ _ <<< "$(describe "$config" "$@")"
  configs=("$config" "${configs[@]}")
  break
done
TABLE=${TABLE:-${dataset}_${teacher:+${teacher}_}${student}}
OUT="$PREFIX/$TABLE"

jobs=1
if [ -n "${GPUS:-}" ]; then
  read -r -a gpus <<< "$GPUS"
  jobs=${#gpus[@]}
  CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${gpus[*]}")
  export CUDA_VISIBLE_DEVICES
fi

# EXPERIMENT.PROJECT "" puts the runs straight into OUT, next to the table.
status=0
"$PYTHON" "$ROOT/tools/sweep.py" --cfg "${configs[@]}" --seeds "${seeds[@]}" --backend local \
  --jobs "$jobs" --out "$OUT" EXPERIMENT.PROJECT "" "$@" || status=$?
case $status in
  130 | 143) echo "stopped; run the same command again to resume" >&2; exit "$status" ;;
esac
echo "== table: $OUT/table.md, curves: $OUT/curves.png, bars: $OUT/curves_bars.png"
"$PYTHON" "$ROOT/tools/compare.py" "$OUT" --out "$OUT/table.md" --plot "$OUT/curves.png" ||
  status=$?
exit "$status"
