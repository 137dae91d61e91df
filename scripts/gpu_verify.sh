#!/usr/bin/env bash
# One GPU verification pass for the device machine (torch + Triton preinstalled, no network).
# Usage: bash scripts/gpu_verify.sh PART   (PART: kernels | full | large | bench)
# amd-aiter (pure Python) travels as an installed copy in .gpu/site (carry .gpu): the 40 MB
# wheel plus the committed goldens would exceed the device tool's 64 MiB transfer limit.
# Logs go to $OUT.
set -u
OUT=${OUT:-/tmp/attncheck-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/.gpu/site:$PWD
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
python3 - <<'PY' | tee "$OUT/env.txt"
import torch, triton, platform
print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__)
print("device", torch.cuda.get_device_name(0), "SMs", torch.cuda.get_device_properties(0).multi_processor_count)
PY
AC="python3 -m attncheck.cli"
case "${1:-kernels}" in
  kernels)
    python3 -m pytest tests/kernels tests/test_merge_goldens.py tests/aiter tests/backends --device cuda -q -x -p no:cacheprovider \
      -o addopts= -rfs 2>&1 | tee "$OUT/kernels.log" | tail -40
    $AC verify --device cuda --tier smoke --json "$OUT/smoke.json" 2>&1 | tee "$OUT/smoke.log" | tail -45 ;;
  full)
    $AC verify --device cuda --tier full --json "$OUT/full.json" 2>&1 | tee "$OUT/full.log" | tail -45 ;;
  large)
    python3 -m pytest tests/reference/test_ref_streaming_large.py --device cuda -m large -q -s -p no:cacheprovider -o addopts= 2>&1 \
      | tee "$OUT/ref_large.log" | tail -15
    $AC verify --device cuda --tier large --json "$OUT/large.json" 2>&1 | tee "$OUT/large.log" | tail -40 ;;
  bench)
    $AC bench --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -60 ;;
esac
