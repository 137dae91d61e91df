#!/usr/bin/env bash
# Numerics-debugging round trip on the GPU (issue 12), one command, logs and files under $OUT:
#   bash scripts/gpu/debug_roundtrip.sh
# verify --save-failures with the planted DROP_LAST_KEY plugin beside TRITON_ATTN, replay the
# bundle on both, minimise it, capture dumps of both backends and check them, and (when
# matplotlib is installed) the HTML report. Expected: see the "expect" lines it prints.
# DEVICE=cpu runs the same on the CPU (Triton interpreter).
set -u
OUT=${OUT:-/tmp/attncheck-out}; mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}
export PYTHONPATH=$PWD/.gpu/site:$PWD
export PYTHONUNBUFFERED=1
if [ "$DEVICE" = cuda ]; then unset TRITON_INTERPRET; fi
AC="python3 -m attncheck.cli"
PLUGIN=tests.plugins.drop_last_key:BACKEND
B="$OUT/bundles/DROP_LAST_KEY__mixed-h8x2-d64-bs16-bf16.safetensors"
run() { echo "\$ $*"; "$@"; echo "rc $?"; }
{
  echo "expect: rc 1, every DROP_LAST_KEY case fails, every TRITON_ATTN case passes, one bundle per failure"
  run $AC verify --device "$DEVICE" --tier smoke --backend DROP_LAST_KEY TRITON_ATTN --backend-plugin $PLUGIN \
      --save-failures "$OUT/bundles" --json "$OUT/verify.json" | tail -12
  ls "$OUT/bundles" | wc -l
  echo "expect: rc 1, 'rows: same as the bundle: 48 failing rows'"
  run $AC replay "$B" --device "$DEVICE" --backend-plugin $PLUGIN --capture "$OUT/dumps_bug" | tail -4
  echo "expect: rc 0, TRITON_ATTN PASS, 'rows: passes now'"
  run $AC replay "$B" --device "$DEVICE" --backend TRITON_ATTN --capture "$OUT/dumps_triton" | tail -4
  echo "expect: rc 0, 'fails with 1 sequence, ... every failing row is the last query row of its sequence'"
  run $AC minimize "$B" --device "$DEVICE" --backend-plugin $PLUGIN --out "$OUT/min.safetensors"
  echo "expect: rc 1 (FAIL, per-row and lse on the last query rows, like the replay)"
  run $AC check-dump "$OUT/dumps_bug/DROP_LAST_KEY-call0.safetensors" --device "$DEVICE" | tail -14
  echo "expect: rc 0 (PASS)"
  run $AC check-dump "$OUT/dumps_triton/TRITON_ATTN-call0.safetensors" --device "$DEVICE" | tail -12
  if python3 -c "import matplotlib" 2>/dev/null; then
    run $AC report --json "$OUT/verify.json" --out "$OUT/report.html"
  else
    echo "matplotlib is not installed here: HTML report skipped (the bundles under \$OUT render anywhere)"
  fi
} 2>&1 | tee "$OUT/debug_roundtrip.log"
