#!/usr/bin/env bash
# The panel of independent correct kernels (tests/panel, docs/panel.md) on the GPU.
# Usage, on the device machine from the repository root: bash scripts/gpu/panel.sh
# Writes to $OUT: panel_ratios.txt (first table: per member x check, the worst output per-row,
# output mean and LSE ratio over every stored case with the case where it occurs, and the cache
# writes; second table: one line per member x case), panel.json (both as data), panel_tests.log
# (pytest tests/panel --device cuda), panel_env.txt. Needs torch, pytest, tabulate and safetensors;
# no Triton, no AITER. Expected: "report exit 0", every member "0" failed, pytest all passed.
set -u
OUT=${OUT:-/tmp/attncheck-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/panel_env.txt"
python3 -m tests.panel.report --device cuda --out "$OUT/panel_ratios.txt" --json "$OUT/panel.json" > /dev/null
echo "report exit $? (1 = some member failed some case: see the failed column and panel_ratios.txt)"
awk 'NF == 0 { blank++ } blank == 2 { exit } { print }' "$OUT/panel_ratios.txt"  # the member x check table
python3 -m pytest tests/panel --device cuda -q -p no:cacheprovider -o addopts= -rfEX 2>&1 \
  | tee "$OUT/panel_tests.log" | tail -30
