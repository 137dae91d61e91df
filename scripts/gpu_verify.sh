#!/usr/bin/env bash
# One GPU verification pass for the device machine (torch + Triton preinstalled, no network).
# Usage: bash scripts/gpu_verify.sh PART...   (PART: tests | smoke | full | large | bench)
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
for part in "$@"; do
case "$part" in
  tests)
    python3 -m pytest tests/kernels tests/test_merge_goldens.py tests/aiter tests/backends --device cuda -q -p no:cacheprovider \
      -o addopts= -rfE 2>&1 | tee "$OUT/tests.log" | tail -25 ;;
  smoke)
    $AC verify --device cuda --tier smoke --json "$OUT/smoke.json" ${BACKENDS:+--backend $BACKENDS} 2>&1 \
      | tee "$OUT/smoke.log" | grep -v "^  .* known issue" | tail -30 ;;
  full)
    $AC verify --device cuda --tier full --json "$OUT/full.json" 2>&1 | tee "$OUT/full.log" | tail -30 ;;
  large)
    python3 -m pytest tests/reference/test_ref_streaming_large.py --device cuda -m large -q -s -p no:cacheprovider -o addopts= 2>&1 \
      | tee "$OUT/ref_large.log" | tail -15
    $AC verify --device cuda --tier large --json "$OUT/large.json" 2>&1 | tee "$OUT/large.log" | tail -30 ;;
  bench)
    $AC bench --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -60 ;;
  *) echo "unknown part $part"; exit 2 ;;
esac
done
