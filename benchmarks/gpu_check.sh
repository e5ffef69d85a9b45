#!/usr/bin/env bash
# GPU check (issues 8 and 14), offline, mdp_hf from this checkout (docs/gpu.md):
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR] [gpu_check.py options]
# 1. benchmarks/gpu_check.py --device cuda: latency tables, solves, sliced-model timings (its own --time-budget-s);
# 2. then, if it succeeded, benchmarks/training_cost.py on the device: step time and peak memory of every training
#    phase (dense, scoring, sliced, distilled, pruned, masked), capped at TRAINING_COST_S seconds (default 180).
OUT="${1:-gpu_check_out}"
HERE="$(cd "$(dirname "$0")" && pwd)"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$(dirname "$HERE")${PYTHONPATH:+:$PYTHONPATH}"
"${PYTHON:-python3}" "$HERE/gpu_check.py" "$OUT" --device cuda "${@:2}"
rc=$?
if [ "$rc" -eq 0 ]; then
    timeout "${TRAINING_COST_S:-180}" "${PYTHON:-python3}" "$HERE/training_cost.py" --out "$OUT/training_cost.json" \
        > "$OUT/training_cost.txt" 2>&1
    echo "training cost: exit $? (table in $OUT/training_cost.txt)"
fi
exit "$rc"
