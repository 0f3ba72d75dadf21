#!/usr/bin/env bash
# For a session lent a GPU: the GPU-only tests, then bf16 tokens/s, MFU and peak memory of a 1.5B
# Qwen2-shaped model (random init) on packed 4k-token micro-batches: shardtune (several variants) and TRL's
# SFTTrainer side by side on one GPU (TRL only if installed), a profile of shardtune's step, and
# `shardtune validate`'s memory estimate against the measured CUDA peak. Results and logs go to BENCH_OUT
# (default: bench/gpu_out); paste the table rows into bench/RESULTS.md. Targets (issue #16): MFU >= 0.45 on
# an H100, >= 1.5x TRL tokens/s, peak memory below TRL's, estimate within 15% of the measured peak.
# Every stage runs under its own time limit and a failing stage does not stop the others.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
export BENCH_OUT="${BENCH_OUT:-bench/gpu_out}" TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
mkdir -p "$BENCH_OUT"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log="$BENCH_OUT/stages.log"
stage() {  # stage NAME SECONDS COMMAND...: run, append its output to BENCH_OUT/stages.log, report its status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "===== stage $name: $*" >>"$log"
  timeout "$limit" "$@" >>"$log" 2>&1
  echo "stage $name: exit $? in $((SECONDS - t0)) s" | tee -a "$log"
}
if [[ "${BENCH_GPU_DRY_RUN:-}" != 1 ]]; then
  stage tests 240 "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -rA
  grep -E "passed|failed|PASSED|FAILED|ERROR|max abs diff" "$log" | tail -n 12
fi
stage prepare 240 "$PY" bench/gpu.py prepare "$work"
stage st-base 200 "$PY" bench/gpu.py shardtune "$work" base
if "$PY" -c "import trl" 2>/dev/null; then stage trl 240 "$PY" bench/gpu.py trl "$work"; fi
[[ "${BENCH_PROFILE:-1}" == 1 ]] && stage profile 150 "$PY" bench/gpu.py profile "$work"
"$PY" bench/gpu.py report "$work"
for variant in ${BENCH_VARIANTS:-}; do  # NAME:key=value,key=value (after the report, so a late stop loses little)
  name=${variant%%:*}; overrides=${variant#*:}
  stage "st-$name" 240 "$PY" bench/gpu.py shardtune "$work" "$name" ${overrides//,/ }
  "$PY" bench/gpu.py report "$work" >/dev/null
done
cat "$BENCH_OUT/results.md"
