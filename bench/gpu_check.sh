#!/usr/bin/env bash
# Validate mixops on a GPU machine in one short run: build for the local GPU, CUDA tests,
# compute-sanitizer, grouped_mm TFLOP/s, MoE/MoA/MoD/EP benchmarks and a profile; a Markdown
# report in $OUT (or --out). Run from anywhere; carry .gpu/ (bench/gpu_prepare.sh makes it).
#   bash bench/gpu_check.sh [--only STEP] [--skip STEP] [--budget S] [--out DIR] [--dry-run]
# The logic is in bench/gpu_check.py (--help lists the options), the step table in
# bench/gpu_check_steps.py.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$(command -v python3 || command -v python)}
export PY
exec "$PY" bench/gpu_check.py --python "$PY" "$@"
