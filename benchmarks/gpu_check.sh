#!/usr/bin/env bash
# The GPU check on the device machine: install the carried wheels and llmforge, then run
# benchmarks/gpu_check.py (the `gpu` tests, then the 1B benchmark and the planner check).
# Writes $OUT/gpu_check.json (the figures) and $OUT/gpu_check.log (everything printed).
#
# Made on the CPU machine first (both folders are git-ignored and travel with `carry`):
#   bash benchmarks/gpu_wheels.sh               # .whl/: what the image lacks (~6 MiB)
#   python benchmarks/gpu_check.py --prepare    # .gpu_data/: the tiny spec's shards and tokenizer (~21 MiB)
# Then, from a session that is lent a GPU, the device tool's run with
#   command "bash benchmarks/gpu_check.sh", carry [".whl", ".gpu_data"], timeout_s 540.
# Arguments go to gpu_check.py (a rerun of the benchmark alone: --skip-tests).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-benchmarks/_work/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

{
  echo "== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: not available"
  [ -d .gpu_data ] || { echo ".gpu_data is missing: carry it (see the top of this file)"; exit 2; }
  source benchmarks/gpu_env.sh || exit $?

  # The plan exactly as a user asks for it; gpu_check.py recomputes it in-process per micro batch.
  llmforge plan specs/gpu-1b.yaml --gpu h200-141gb --json > "$OUT/plan.json" || exit 3

  python3 benchmarks/gpu_check.py --out "$OUT" "$@"
} 2>&1 | tee "$OUT/gpu_check.log"
