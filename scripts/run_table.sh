#!/usr/bin/env bash
# Train methods x seeds for one teacher/student pair, then tabulate and plot them.
#
#   scripts/run_table.sh CONFIG_DIR "METHODS" "SEEDS" [KEY VALUE ...]
#
#   scripts/run_table.sh configs/cifar100 "vanilla kd fitnet at rkd crd advkd" "0 1 2"
#   PAIR=vgg13_vgg8 scripts/run_table.sh configs/cifar100 "vanilla kd crd" "0 1 2"
#   GPUS="0 1 2 3" scripts/run_table.sh configs/cifar100 "kd crd" "0 1" SOLVER.AMP bf16
#
# A method maps to CONFIG_DIR/<method>.yaml, or CONFIG_DIR/<method>/<PAIR>.yaml when PAIR
# is set; "vanilla" trains the student alone with CONFIG_DIR/vanilla/<student>.yaml, the
# student read from the first other method's config (or given as STUDENT=<model>).
# KEY VALUE pairs override every run's config. Jobs run one after another, or with
# GPUS="0 1" one per GPU at a time, each GPU taking the next job when it is free
# (CUDA_VISIBLE_DEVICES; name a GPU twice for two jobs on it; logs in TABLE_DIR/jobs/).
# Every run lands in TABLE_DIR = PREFIX/TABLE (default output/<dataset>_<teacher>_<student>);
# then tools/compare.py writes table.md and curves.png there. Ctrl-C stops every run
# after a saved checkpoint. Running it again adds runs (as NAME-2) to the same table;
# pick another TABLE for a fresh one.
#
# Environment: PAIR, GPUS, STUDENT, PREFIX (output), TABLE, PYTHON (python). Bash 4.3+.
set -euo pipefail

usage() { sed -n '2,21p' "$0" | sed -e 's/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 2; }

if [ $# -lt 3 ]; then
  usage >&2
  exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1%/}; METHODS=$2; SEEDS=$3; shift 3
overrides=("$@")
PYTHON=${PYTHON:-python}
PAIR=${PAIR:-}
GPUS=${GPUS:-}
PREFIX=${PREFIX:-output}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

[ -d "$DIR" ] || die "no config folder $DIR"
read -r -a methods <<< "$METHODS"
read -r -a seeds <<< "$SEEDS"
[ ${#methods[@]} -gt 0 ] || die "no methods given"
[ ${#seeds[@]} -gt 0 ] || die "no seeds given"
for seed in "${seeds[@]}"; do
  [[ $seed =~ ^[0-9]+$ ]] || die "seed '$seed' is not a whole number"
done
[ $(( ${#overrides[@]} % 2 )) -eq 0 ] || die "overrides come as KEY VALUE pairs"
for (( i = 0; i < ${#overrides[@]}; i += 2 )); do
  case ${overrides[i]} in
    EXPERIMENT.SEED | EXPERIMENT.PROJECT | EXPERIMENT.NAME | LOG.PREFIX)
      die "${overrides[i]} is set by this script (use the SEEDS argument, TABLE or PREFIX)" ;;
  esac
done

# Prints "dataset teacher student" of a config with the overrides applied; a bad
# key or value stops here with one line instead of hours later.
describe() {
  "$PYTHON" -c 'import sys
from mdistill.config import load_cfg
from mdistill.utils.cli import run_main
def main(argv):
    cfg = load_cfg(argv[0], argv[1:])
    print(cfg.DATASET.TYPE, cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT)
run_main(main)' "$@"
}

config_of() {
  if [ -n "$PAIR" ]; then echo "$DIR/$1/$PAIR.yaml"; else echo "$DIR/$1.yaml"; fi
}

dataset="" teacher="" student=${STUDENT:-}
for method in "${methods[@]}"; do
  [ "$method" != vanilla ] || continue
  config=$(config_of "$method")
  [ -f "$config" ] || die "no config $config for method $method"
  info=$(describe "$config" ${overrides[@]+"${overrides[@]}"})
  if [ -z "$teacher" ]; then
    read -r dataset teacher first_student <<< "$info"
    student=${student:-$first_student}
  fi
done
for method in "${methods[@]}"; do
  [ "$method" = vanilla ] || continue
  [ -n "$student" ] || die "vanilla needs the student: add a method whose config names it, or set STUDENT"
  config="$DIR/vanilla/$student.yaml"
  [ -f "$config" ] || die "no config $config for the student alone ($student)"
  info=$(describe "$config" ${overrides[@]+"${overrides[@]}"})
  [ -n "$dataset" ] || read -r dataset _ _ <<< "$info"
  break
done
config_of_method() {
  if [ "$1" = vanilla ]; then echo "$DIR/vanilla/$student.yaml"; else config_of "$1"; fi
}
TABLE=${TABLE:-${dataset}_${teacher:+${teacher}_}${student}}
OUT="$PREFIX/$TABLE"

jobs=()                                   # "method|seed|config", all methods of a seed first
for seed in "${seeds[@]}"; do
  for method in "${methods[@]}"; do
    jobs+=("$method|$seed|$(config_of_method "$method")")
  done
done

command_of() {   # command_of CONFIG SEED: sets cmd to the training command
  cmd=("$PYTHON" "$ROOT/tools/train.py" --cfg "$1" EXPERIMENT.SEED "$2"
       EXPERIMENT.PROJECT "$TABLE" LOG.PREFIX "$PREFIX" ${overrides[@]+"${overrides[@]}"})
}

# One slot per word of GPUS (one slot on the default devices without GPUS); a free slot
# takes the next job, so a slow method does not hold up the others.
read -r -a slots <<< "$GPUS"
[ ${#slots[@]} -gt 0 ] || slots=("")
pids=() slot_jobs=() failed=() stopping=0
for (( slot = 0; slot < ${#slots[@]}; slot++ )); do pids[slot]=""; done

launch() {   # launch SLOT JOB
  local slot=$1 method seed config log gpu=${slots[$1]}
  IFS='|' read -r method seed config <<< "$2"
  command_of "$config" "$seed"
  slot_jobs[slot]="$method, seed $seed"
  # A process group of its own (set -m): Ctrl-C then reaches this script alone, and
  # the trainer gets exactly one TERM from the trap below (a second signal would make
  # it quit without saving).
  set -m
  if [ -n "$GPUS" ]; then
    log="$OUT/jobs/$method,seed$seed.log"
    slot_jobs[slot]+="; log $log"
    echo "== GPU $gpu: $method, seed $seed (log: $log)"
    CUDA_VISIBLE_DEVICES=$gpu "${cmd[@]}" > "$log" 2>&1 &
  else
    echo "== $method, seed $seed: $config"
    "${cmd[@]}" &
  fi
  pids[slot]=$!
  set +m
}

reap() {   # reap SLOT: if its trainer has exited, note a failure and free the slot
  local slot=$1 status=0
  [ -n "${pids[slot]}" ] || return 0
  ! kill -0 "${pids[slot]}" 2>/dev/null || return 0
  wait "${pids[slot]}" || status=$?
  pids[slot]=""
  if [ "$status" != 0 ] && [ "$stopping" = 0 ]; then
    echo "FAILED (exit $status): ${slot_jobs[slot]}" >&2
    failed+=("${slot_jobs[slot]} (exit $status)")
  fi
}

echo "${#jobs[@]} runs into $OUT: methods ${methods[*]}; seeds ${seeds[*]}"
[ -z "$GPUS" ] || mkdir -p "$OUT/jobs"
# On Ctrl-C or TERM each trainer finishes its step, saves a checkpoint and exits.
trap 'stopping=1
      for pid in "${pids[@]}"; do [ -z "$pid" ] || kill -TERM "$pid" 2>/dev/null || true; done' \
  INT TERM
next=0
while :; do
  busy=0
  for (( slot = 0; slot < ${#slots[@]}; slot++ )); do
    reap "$slot"
    if [ -z "${pids[slot]}" ] && [ "$stopping" = 0 ] && [ "$next" -lt ${#jobs[@]} ]; then
      launch "$slot" "${jobs[next]}"
      next=$((next + 1))
    fi
    [ -z "${pids[slot]}" ] || busy=1
  done
  [ "$busy" = 1 ] || break
  wait -n 2>/dev/null || true            # until a trainer exits or a signal comes
done
trap - INT TERM
if [ "$stopping" = 1 ]; then
  echo "stopped; each run saved a checkpoint: continue one with" \
       "python tools/train.py --resume-from <run folder>" >&2
  exit 130
fi

echo "== table: $OUT/table.md, curves: $OUT/curves.png"
status=0
"$PYTHON" "$ROOT/tools/compare.py" "$OUT" --out "$OUT/table.md" --plot "$OUT/curves.png" ||
  status=$?
if [ ${#failed[@]} -gt 0 ]; then
  printf 'failed: %s\n' "${failed[@]}" >&2
  exit 1
fi
exit "$status"
