#!/usr/bin/env bash
# Run a table of methods x seeds for one teacher/student pair, then compare them.
#
#   scripts/run_table.sh CONFIG_DIR "METHODS" "SEEDS" [KEY VALUE ...]
#
#   scripts/run_table.sh configs/cifar100 "vanilla kd fitnet at rkd crd advkd" "0 1 2"
#   PAIR=wrn40_2_wrn16_2 scripts/run_table.sh configs/cifar100 "vanilla kd crd" "0 1 2"
#   GPUS="0 1 2 3" scripts/run_table.sh configs/cifar100 "kd crd" "0 1"   # one job per GPU
#
# A method name maps to CONFIG_DIR/<method>.yaml, or CONFIG_DIR/<method>/<PAIR>.yaml when
# PAIR is set; "vanilla" trains the student of the first method's config alone
# (configs/cifar100/vanilla/<student>.yaml). Every run lands in output/<TABLE>/ (TABLE defaults to the
# config folder's name), then tools/compare.py writes table.md and curves.png there.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 3 ]; then
  sed -n '2,14p' "$0"
  exit 2
fi
DIR=$1; METHODS=$2; SEEDS=$3; shift 3
PYTHON=${PYTHON:-python}
TABLE=${TABLE:-table_$(basename "$DIR")${PAIR:+_$PAIR}}
PREFIX=${PREFIX:-output}
GPUS=${GPUS:-}
PAIR=${PAIR:-}
config_of() { if [ -n "$PAIR" ]; then echo "$DIR/$1/$PAIR.yaml"; else echo "$DIR/$1.yaml"; fi; }

first=""
for method in $METHODS; do
  if [ "$method" != vanilla ]; then first=$(config_of "$method"); break; fi
done
jobs_list=()
for seed in $SEEDS; do
  for method in $METHODS; do
    if [ "$method" = vanilla ]; then
      [ -n "$first" ] || { echo "error: vanilla needs another method's config for the student" >&2; exit 2; }
      student=$("$PYTHON" -c "import sys; sys.path.insert(0, '.'); from mdistill.config import load_cfg; print(load_cfg(sys.argv[1]).DISTILLER.STUDENT)" "$first")
      config="configs/cifar100/vanilla/$student.yaml"
    else
      config=$(config_of "$method")
    fi
    [ -f "$config" ] || { echo "error: no config $config for method $method" >&2; exit 2; }
    jobs_list+=("$config|$seed")
  done
done

run() {   # run CONFIG SEED [GPU]
  local env=()
  [ -n "${3:-}" ] && env=(env CUDA_VISIBLE_DEVICES="$3")
  "${env[@]}" "$PYTHON" tools/train.py --cfg "$1" EXPERIMENT.SEED "$2" \
    EXPERIMENT.PROJECT "$TABLE" LOG.PREFIX "$PREFIX" "${@:4}"
}

if [ -z "$GPUS" ]; then
  for job in "${jobs_list[@]}"; do
    run "${job%|*}" "${job#*|}" "" "$@"
  done
else
  read -r -a gpus <<< "$GPUS"
  index=0
  for job in "${jobs_list[@]}"; do
    gpu=${gpus[$((index % ${#gpus[@]}))]}
    run "${job%|*}" "${job#*|}" "$gpu" "$@" > "$PREFIX/$TABLE.$index.log" 2>&1 &
    index=$((index + 1))
    if [ $((index % ${#gpus[@]})) -eq 0 ]; then wait; fi
  done
  wait
fi
"$PYTHON" tools/compare.py "$PREFIX/$TABLE" --out "$PREFIX/$TABLE/table.md" \
  --plot "$PREFIX/$TABLE/curves.png"
