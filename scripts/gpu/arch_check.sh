#!/usr/bin/env bash
# The restructured harness on a CUDA GPU: `attncheck verify` through the pytest plugin (smoke,
# full), the kernel and backend tests through the device fixture, and `attncheck bench` (tables
# through tabulate, MHA backends from the registry). Run from the repository root on the device
# machine (no install: the plugin is loaded by name, the built-in backends without entry points).
# Needs .gpu/site (carry ".gpu") holding amd-aiter and tabulate, e.g. made on this machine with
#   pip install --no-deps --target .gpu/site amd-aiter==0.1.7.post2.dev18 tabulate==0.10.0
# Logs and JSON go to $OUT. Expected: smoke and full with 0 failed and 0 errors (statuses as in
# docs/verification.md), the tests with 0 failed, bench tables with a row per registered MHA backend.
set -u
OUT=${OUT:-/tmp/attncheck-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/.gpu/site:$PWD PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
python3 -c "import tabulate" || { echo "tabulate is missing: add it to .gpu/site"; exit 2; }
python3 -m attncheck verify --device cuda --tier smoke --json "$OUT/smoke.json" --junit "$OUT/smoke.xml" 2>&1 \
  | tee "$OUT/smoke.log" | grep -v "^  .* known issue" | tail -30
python3 -m attncheck verify --device cuda --tier full --json "$OUT/full.json" 2>&1 | tee "$OUT/full.log" | tail -20
python3 -m pytest tests/kernels tests/backends tests/test_backends_golden.py --device cuda -q -p no:cacheprovider \
  -o addopts= -rfE 2>&1 | tee "$OUT/tests.log" | tail -15
python3 -m attncheck bench --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -60
