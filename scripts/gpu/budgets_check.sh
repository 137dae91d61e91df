#!/usr/bin/env bash
# Issue 9 on the GPU in one short call: the panel against the stored goldens on CUDA, the golden
# store's machine independence on one case per arithmetic path (tests/test_golden_machine_independence.py
# PATHS; regen --check under three ISA levels on this host's CPU, and expected.* / budget.*
# recomputed on CUDA), and the float32 cases on the fused kernels (TORCH_SDPA, vLLM's TRITON_ATTN
# and ROCM_ATTN). Each part writes its own file into $OUT at once, so a part cut short by the
# time limit loses only itself.
set -u
OUT=${OUT:-/tmp/attncheck-out}; mkdir -p "$OUT"
export ATTNCHECK_VLLM_SRC=${ATTNCHECK_VLLM_SRC:-$PWD/.gpu/vllm_src}
export PYTHONPATH=$PWD/.gpu/site:$PWD PYTHONUNBUFFERED=1
unset TRITON_INTERPRET ATTNCHECK_PROVIDER
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))" \
  > "$OUT/summary.txt" 2>&1
t0=$SECONDS
timeout "${PANEL_S:-70}" python3 -m tests.panel.report --device cuda --out "$OUT/panel_ratios.txt" 2>&1 | tail -3 >> "$OUT/summary.txt"
echo "panel: rc ${PIPESTATUS[0]} in $((SECONDS - t0)) s" >> "$OUT/summary.txt"
t0=$SECONDS
CASES=$(python3 -c "from tests.test_golden_machine_independence import PATHS; print(' '.join(PATHS))")
CASES="$CASES" JOBS=16 OUT=/tmp/regen-check timeout "${REGEN_S:-80}" bash scripts/gpu/regen_check.sh > /dev/null 2>&1
echo "regen check: rc $? in $((SECONDS - t0)) s" >> "$OUT/summary.txt"
cp /tmp/regen-check/regen_check.txt "$OUT/regen_check.txt"
t0=$SECONDS
timeout "${VERIFY_S:-90}" python3 -m attncheck.cli verify --device cuda --backend TORCH_SDPA TRITON_ATTN ROCM_ATTN \
  --case mixed-h8x8-d64-bs16-fp32 full-mixed-h8x2-d128-bs16-fp32 mixed-h8x2-d64-bs16-bf16-softcap50 \
  > "$OUT/verify_fp32.txt" 2>&1
echo "verify fp32: rc $? in $((SECONDS - t0)) s" >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
