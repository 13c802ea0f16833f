#!/usr/bin/env bash
# Quick start on the embedded digits data (scikit-learn's 1,797 real 8x8 handwritten
# digits, upsampled to 32x32; nothing to download): train a teacher, then the
# student alone and the student with each method, for each seed, and print the
# comparison table.
#
#   scripts/demo.sh            # student alone and KD, seed 0 (about 2 minutes on 2 cores)
#   scripts/demo.sh --all      # every registered method, seeds 0 1 2 (about 13 minutes)
#   METHODS="NONE RKD" SEEDS="0 1" scripts/demo.sh
#
# Other arguments are KEY VALUE overrides for every run (e.g. DEVICE cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-output/demo}
if [ "${1:-}" = "--all" ]; then
  shift
  # Every registered method (DOT is an update rule: add SOLVER.TRAINER dot to try it).
  METHODS=${METHODS:-$("$PYTHON" -c "from mdistill.distillers import DISTILLERS; print(' '.join(DISTILLERS.names()))")}
  SEEDS=${SEEDS:-"0 1 2"}
fi
METHODS=${METHODS:-"NONE KD"}
SEEDS=${SEEDS:-"0"}
TEACHER_RUN="$OUT/digits_teacher/teacher"

if [ ! -f "$TEACHER_RUN/student_best" ]; then
  echo "== teacher"
  "$PYTHON" tools/train.py --cfg configs/digits/teacher.yaml LOG.PREFIX "$OUT" \
    EXPERIMENT.PROJECT digits_teacher EXPERIMENT.NAME teacher "$@"
fi
rm -rf "$OUT/digits_students"
for seed in $SEEDS; do
  for method in $METHODS; do
    echo "== $method, seed $seed"
    status=0
    output=$("$PYTHON" tools/train.py --cfg configs/digits/student.yaml LOG.PREFIX "$OUT" \
      EXPERIMENT.PROJECT digits_students DISTILLER.TYPE "$method" EXPERIMENT.SEED "$seed" \
      DISTILLER.TEACHER_WEIGHTS "$TEACHER_RUN/student_best" "$@" 2>&1) || status=$?
    if [ "$status" -eq 2 ]; then
      # Refused before the first step for this pair (DEIT needs a distillation token).
      echo "skipped: $(echo "$output" | grep -E '^error:' | head -1)"
      continue
    elif [ "$status" -ne 0 ]; then
      echo "$output" | tail -20
      exit "$status"
    fi
    echo "$output" | grep -E "^(teacher|done)"
  done
done
"$PYTHON" tools/compare.py "$OUT/digits_students" --plot "$OUT/digits_students/curves.png"
