#!/usr/bin/env bash
# GPU check, for the lent GPU machine (one H200, torch 2.11, Python 3.12, 16 cores, no
# network): builds for sm_90 with all cores, runs every CUDA test, runs a quick benchmark
# pass, writes logs and results under OUTDIR and prints a short summary last. Budget: 8 min.
#
#   bash scripts/gpu_check.sh OUTDIR
#
# Files written (at most 8, the device tool's limit): summary.md, build.log, cuda-tests.log,
# memcheck.log, bench.log, bench-quick.json, bench-quick.md, nvidia-smi.txt.
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
t0=$(date +%s)
stamp() { echo "$(( $(date +%s) - t0 ))s"; }

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
echo "== build ($(stamp))"
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=$(nproc) LRKERNELS_CUDA=1 \
  timeout 300 "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1
build_rc=$?
tail -n 3 "$OUT/build.log"

test_rc=skipped; bench_rc=skipped; memcheck_rc=skipped
if [ $build_rc -eq 0 ]; then
  echo "== CUDA tests ($(stamp))"
  # One pytest per file, each with its own time limit, so a slow first torch.compile in one
  # file cannot take the others' results with it; each file's summary line is kept.
  : > "$OUT/cuda-tests.log"
  test_rc=0
  for spec in test_lora.py:75 test_multi_lora.py:70 test_galore.py:50 test_c3a.py:50 test_gqa.py:60 test_miss.py:40 \
              test_sparse_lowrank.py:40; do
    f=${spec%%:*}; limit=${spec##*:}
    echo "== tests/$f (limit ${limit}s, at $(stamp))" >> "$OUT/cuda-tests.log"
    PYTHONPATH=python timeout "$limit" "$PY" -m pytest -q -m cuda -p no:cacheprovider -rfE --tb=short "tests/$f" \
      >> "$OUT/cuda-tests.log" 2>&1
    rc=$?
    [ $rc -eq 124 ] && echo "== tests/$f: TIMED OUT after ${limit}s" >> "$OUT/cuda-tests.log"
    [ $rc -ne 0 ] && test_rc=$rc
    grep -E "^== tests/|passed|failed|TIMED OUT" "$OUT/cuda-tests.log" | tail -n 2
  done
  # Out-of-bounds and race checks on the smallest CUDA tests, when the sanitizer is there and
  # time allows (it slows kernels ~100x).
  if command -v compute-sanitizer >/dev/null 2>&1 && [ $(( $(date +%s) - t0 )) -lt 240 ]; then
    echo "== compute-sanitizer memcheck ($(stamp))"
    PYTHONPATH=python timeout 90 compute-sanitizer --tool memcheck --error-exitcode 3 \
      "$PY" -m pytest -q -m cuda -p no:cacheprovider -k "7-13-17 or dropout_mask_matches or out_of_range or tensor_core or cuda_nan_propagates" tests \
      > "$OUT/memcheck.log" 2>&1
    memcheck_rc=$?
    tail -n 5 "$OUT/memcheck.log"
  fi
  echo "== quick benchmarks ($(stamp))"
  PYTHONPATH=python:. timeout $(( 440 - ($(date +%s) - t0) )) "$PY" -m benchmarks --device cuda --quick \
    --out "$OUT" --stem bench-quick > "$OUT/bench.log" 2>&1
  bench_rc=$?
fi

{
  echo "# GPU check summary"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null)"
  echo "- torch: $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)' 2>/dev/null)"
  echo "- build: rc=$build_rc; CUDA tests: rc=$test_rc; memcheck: rc=$memcheck_rc; benchmarks: rc=$bench_rc; wall $(stamp)"
  echo
  echo "## CUDA tests"
  echo '```'
  grep -E "^== tests/|passed|failed|error|TIMED OUT|^FAILED|^ERROR" "$OUT/cuda-tests.log" 2>/dev/null | tail -n 40
  echo '```'
  if [ -f "$OUT/bench-quick.md" ]; then echo; cat "$OUT/bench-quick.md"; fi
} > "$OUT/summary.md"
echo "== summary ($(stamp))"
cat "$OUT/summary.md"
