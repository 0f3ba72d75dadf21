#!/usr/bin/env bash
# For a session lent a GPU (prepared on CPU, not yet run on a GPU): bf16 tokens/s and MFU of a 1.5B
# Qwen2-shaped model (random init) on packed 4k-token micro-batches, shardtune and TRL's SFTTrainer side by
# side on one GPU (TRL only if its wheels are installed). Appends rows to the GPU table of bench/RESULTS.md
# and prints `ratio_vs_trl=` last. Targets (issue #8): MFU >= 0.45 on an H100, >= 1.5x TRL.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export TOKENIZERS_PARALLELISM=false
[[ "${BENCH_GPU_DRY_RUN:-}" == 1 ]] || "$PY" -m pytest -q -m gpu tests/test_gpu.py   # the GPU-only checks first
"$PY" bench/gpu.py prepare "$work"
"$PY" bench/gpu.py shardtune "$work" | tail -1
if "$PY" -c "import trl" 2>/dev/null; then "$PY" bench/gpu.py trl "$work" | tail -1; fi
"$PY" bench/gpu.py report "$work"
