#!/usr/bin/env bash
# GPU check (issue 8), offline, mdp_hf from this checkout: bash benchmarks/gpu_check.sh [OUTPUT_DIR] [gpu_check.py options]  (docs/gpu.md)
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_check.py" "${1:-gpu_check_out}" --device cuda "${@:2}"
