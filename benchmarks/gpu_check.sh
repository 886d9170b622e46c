#!/usr/bin/env bash
# One prepared script for a lent GPU machine: builds the CUDA extension against the torch already there, runs the
# loss tests (the CUDA cases run because a device is present) and the loss benchmark, and leaves logs and JSON
# under $OUT (default benchmarks/results/gpu). Usage, from the repository root:  bash benchmarks/gpu_check.sh
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

"$PY" -m pytest -q tests/test_loss.py 2>&1 | tee "$OUT/test_loss.log" || status=1

if "$PY" -c "import pytest_benchmark" 2>/dev/null; then
  (cd benchmarks && "$PY" -m pytest -q bench_loss.py --benchmark-json="$OLDPWD/$OUT/bench_loss_cuda.json") \
    >"$OUT/bench_loss.log" 2>&1 || status=1
  "$PY" benchmarks/summarize.py "$OUT/bench_loss_cuda.json" | tee "$OUT/bench_loss_cuda.md"
else
  echo "gpu_check: pytest-benchmark missing on this machine; benchmarks skipped" | tee "$OUT/bench_loss.log"
fi
exit $status
