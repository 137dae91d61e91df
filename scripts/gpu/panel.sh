#!/usr/bin/env bash
# The panel of independent correct kernels (tests/panel, docs/panel.md) on the GPU.
# Usage, on the device machine from the repository root: bash scripts/gpu/panel.sh
# Writes to $OUT: panel_ratios.txt (per member: worst per-row, mean and LSE ratios over every
# stored case, then one line per member x case), panel.json (the same rows), panel_tests.log
# (pytest tests/panel --device cuda). Needs torch, pytest and safetensors; no Triton, no AITER.
set -u
OUT=${OUT:-/tmp/attncheck-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/panel_env.txt"
python3 -m tests.panel.report --device cuda --out "$OUT/panel_ratios.txt" --json "$OUT/panel.json" > /dev/null
echo "report exit $? (1 = some member failed some case; see the summary)"
sed -n '1,22p' "$OUT/panel_ratios.txt"
python3 -m pytest tests/panel --device cuda -q -p no:cacheprovider -o addopts= -rfEX 2>&1 \
  | tee "$OUT/panel_tests.log" | grep -v "^XFAIL" | tail -30
