#!/usr/bin/env bash
# attncheck spot on one GPU: every registered backend (all eight) on both built-in models, 500 items
# each, retrieval prompts from 16 to 4096 tokens, against the float64 reference attention.
# Usage (repository root, device machine): bash scripts/gpu/spot.sh [PART...]   -> tables + JSON in $OUT
# PART: retrieval | retrieval_split_kv | addition (default: all three; each streams its log)
# Needs tabulate and tqdm (pure Python) importable, like amd-aiter from .gpu/site:
#     pip install --target .gpu/site tabulate tqdm     (here, once; then carry .gpu)
# Three runs: retrieval with continuous batching (mixed decode/extend/prefill steps, 16k-token
# budget); retrieval again with at most 32 sequences at a time, so the decode-only steps over
# contexts >= 512 take TRITON_ATTN's split-KV kernel; the stored addition model (4 layers).
set -u
OUT=${OUT:-/tmp/attncheck-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/.gpu/site:$PWD
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
python3 -c "import tabulate, tqdm" || { echo "spot.sh: tabulate/tqdm missing: pip install --target .gpu/site tabulate tqdm"; exit 2; }
SPOT="python3 -m attncheck.cli spot --device cuda --no-progress"
rc=0
run() {  # name, args...: the log streams to the terminal and to $OUT/spot_NAME.log
  local name=$1; shift
  local t0=$SECONDS
  $SPOT "$@" --json "$OUT/spot_$name.json" 2>&1 | tee "$OUT/spot_$name.log"
  local r=${PIPESTATUS[0]}
  [ "$r" -eq 0 ] || rc=1
  echo "== $name: $((SECONDS - t0)) s, exit $r" | tee -a "$OUT/spot_summary.txt"
}
PARTS=${*:-retrieval retrieval_split_kv addition}
for p in $PARTS; do
case "$p" in
  retrieval) run retrieval --model retrieval --limit 500 --max-len 4096 ;;
  retrieval_split_kv) run retrieval_split_kv --model retrieval --limit 500 --max-len 4096 --max-seqs 32 \
                        --max-batch-tokens 4096 --seed 1 ;;
  addition) run addition --model addition --limit 500 ;;
  *) echo "spot.sh: unknown part $p"; exit 2 ;;
esac
done
exit $rc
