#!/usr/bin/env bash
# The GPU check of the FSDP2 issue, for a session that is lent a GPU: NCCL init, bf16 FSDP2 training of a
# ~0.5B Qwen2-shaped model (config only) at seq 2048 for 20 steps; prints tokens/s, MFU and peak memory and
# appends them to bench/RESULTS.md. Also runs the GPU-marked tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e . --no-deps
python -m pytest -q -m gpu tests/test_gpu.py
torchrun --standalone --nproc-per-node "${NPROC:-1}" bench/gpu_smoke.py --steps 20 --seq 2048
