#!/usr/bin/env bash
# One prepared script for a lent GPU machine, so that its minutes go to measuring: builds the CUDA extension
# against the torch already there, runs the whole CUDA test selection first (every test marked `cuda`, in every
# test file, plus the CUDA-emulation tests) and stops with a summary if any fails; then every benchmark: the loss,
# the models, the DCN op's when it exists (bench_dcn.py), and the end-to-end TUR-vs-L1 training step
# (bench_train_step.py). Logs and JSON go under $OUT (default benchmarks/results/gpu).
# Usage, from the repository root:  bash benchmarks/gpu_check.sh      (SKIP_BENCH=1: tests only)
set -uo pipefail
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TUR_REQUIRE_COMPILED=1
PY="${PYTHON:-python3}"
status=0

{ nvidia-smi; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"; } \
  >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# Hopper (sm_90) is what the lent machines have; sm_80 keeps A100s covered.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" TUR_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}"
if ! "$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  tail -50 "$OUT/build.log"; echo "gpu_check: build failed"; exit 1
fi
"$PY" -m tur_ext.ops | tee "$OUT/build_info.txt"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "gpu_check: torch sees no CUDA device"; exit 1; }

# 1. Every CUDA test first: a failure here stops the script with the list of what failed.
"$PY" -m pytest -q -m cuda -rfEs -p no:cacheprovider tests 2>&1 | tee "$OUT/tests_cuda.log"
cuda_rc=${PIPESTATUS[0]}
emu_tests=$(ls tests/test_*_emu.py 2>/dev/null)
emu_rc=0
if [ -n "$emu_tests" ]; then
  "$PY" -m pytest -q -m "not slow" -rfE -p no:cacheprovider $emu_tests 2>&1 | tee "$OUT/tests_emu.log"
  emu_rc=${PIPESTATUS[0]}
fi
{
  echo "== gpu_check test summary =="
  echo "cuda-marked tests (exit $cuda_rc): $(tail -1 "$OUT/tests_cuda.log")"
  [ -n "$emu_tests" ] && echo "emulation tests (exit $emu_rc): $(tail -1 "$OUT/tests_emu.log")"
  grep -hE '^(FAILED|ERROR) ' "$OUT/tests_cuda.log" "$OUT/tests_emu.log" 2>/dev/null
} | tee "$OUT/test_summary.txt"
# pytest exits 5 when it selects nothing: no CUDA test collected is a failure here too.
if [ "$cuda_rc" -ne 0 ] || [ "$emu_rc" -ne 0 ]; then
  echo "gpu_check: tests failed; benchmarks not run (see $OUT/test_summary.txt)"; exit 1
fi
[ "${SKIP_BENCH:-0}" = 1 ] && exit 0

# 2. Benchmarks.
if "$PY" -c "import pytest_benchmark" 2>/dev/null; then
  for suite in loss models dcn; do
    [ -f "benchmarks/bench_$suite.py" ] || { echo "gpu_check: no bench_$suite.py"; continue; }
    (cd benchmarks && "$PY" -m pytest -q "bench_$suite.py" --benchmark-json="$OLDPWD/$OUT/bench_${suite}_cuda.json") \
      >"$OUT/bench_$suite.log" 2>&1 || { status=1; echo "gpu_check: bench_$suite.py failed (see $OUT/bench_$suite.log)"; }
  done
  [ -f "$OUT/bench_loss_cuda.json" ] && "$PY" benchmarks/summarize.py "$OUT/bench_loss_cuda.json" | tee "$OUT/bench_loss_cuda.md"
else
  echo "gpu_check: pytest-benchmark missing on this machine; pytest benchmarks skipped" | tee "$OUT/bench_loss.log"
fi
"$PY" benchmarks/bench_train_step.py --out "$OUT" 2>&1 | tee "$OUT/bench_train_step.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
