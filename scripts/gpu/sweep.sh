#!/usr/bin/env bash
# The sweep tier and the GPU tiers' speed on the device machine (issue 13; docs/sweep.md).
#
#   bash scripts/gpu/sweep.sh [PART...]      PART: smoke | one | all   (default: smoke one all)
#
#   smoke  the smoke tier on every visible GPU (-n auto) with the timing breakdown (goal: < 60 s)
#   one    a sweep of COUNT configurations (>= 10,000 backend x configuration checks) on GPU 0
#          only (-n auto: WORKERS_PER_GPU workers share it), stopped cleanly at CAP seconds
#   all    the same sweep on every visible GPU (-n auto)
#   draws  live inputs (CounterDraws) built on the GPU equal the same cases built on the CPU
#   profile  one process (-n 0) under cProfile for CAP seconds: where a check's time goes
#   steady   one process, SHAPES (default 2) shape classes so compilation ends early, CAP seconds:
#            the mean cost per phase of a check that compiled nothing (scripts/gpu/steady_state.py)
#
# Each part starts with empty Triton and Inductor caches, so every part pays its own
# compilations (a cache warmed by an earlier part would flatter a later one). Logs and JSON go
# to $OUT: <part>.log, <part>.summary.json (counts, timing, failures; small) and <part>.json.gz
# (every verdict). Knobs (environment): SEED (0), COUNT (5000: about 14,000 backend x
# configuration pairs with all 8 backends), CAP (540 s), WORKERS_PER_GPU
# (default: min(12, 3/4 of the cores / GPUs)), SHAPES (MHA shape classes per seed; default 16),
# BACKENDS (default: all), DEVICE (cuda; `DEVICE=cpu COUNT=4 BACKENDS=TORCH_SDPA` dry-runs it here).
# amd-aiter travels as an installed copy in .gpu/site (carry .gpu), as for scripts/gpu_verify.sh;
# -n needs pytest-xdist there too (pure Python), e.g. made on this machine with
#   pip install --no-deps --target .gpu/site pytest-xdist execnet
set -u
OUT=${OUT:-/tmp/attncheck-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/.gpu/site:$PWD
# vLLM's own kernels (TRITON_ATTN, ROCM_ATTN, TRITON_MLA) where its extracted sources travel with .gpu
[ -d "$PWD/.gpu/vllm_src" ] && export ATTNCHECK_VLLM_SRC=${ATTNCHECK_VLLM_SRC:-$PWD/.gpu/vllm_src}
export PYTHONUNBUFFERED=1
SEED=${SEED:-0}; COUNT=${COUNT:-5000}; CAP=${CAP:-540}
DEVICE=${DEVICE:-cuda}
# compiled kernels on the GPU; the interpreter for a CPU dry run (torch imports Triton early)
if [ "$DEVICE" = cpu ]; then export TRITON_INTERPRET=1; else unset TRITON_INTERPRET; fi
EXTRA=()
[ -n "${WORKERS_PER_GPU:-}" ] && EXTRA+=(--workers-per-gpu "$WORKERS_PER_GPU")
[ -n "${BACKENDS:-}" ] && EXTRA+=(--backend $BACKENDS)
SWEEP_EXTRA=()
[ -n "${SHAPES:-}" ] && SWEEP_EXTRA+=(--shapes "$SHAPES")
AC="python3 -m attncheck.cli"
python3 -c "import xdist, execnet, tabulate" || {
  echo "sweep.sh: pytest-xdist/execnet/tabulate missing: pip install --no-deps --target .gpu/site pytest-xdist execnet tabulate (then carry .gpu)"; exit 2; }

python3 - <<'PY' | tee "$OUT/env.txt"
import os, torch, triton, platform
print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__,
      "cpu cores", os.cpu_count())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"gpu {i}: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
PY

fresh_caches() {  # a part's own empty compile caches
  export TRITON_CACHE_DIR; TRITON_CACHE_DIR=$(mktemp -d /tmp/triton-cache.XXXX)
  export TORCHINDUCTOR_CACHE_DIR; TORCHINDUCTOR_CACHE_DIR=$(mktemp -d /tmp/inductor-cache.XXXX)
}

summarise() {  # $1 = part: the numbers the lead quotes, and a small JSON without the passing verdicts
  python3 - "$OUT/$1.json" "$OUT/$1.summary.json" <<'PY'
import gzip, json, shutil, sys
src, dst = sys.argv[1], sys.argv[2]
try:
    d = json.load(open(src))
except (OSError, ValueError) as e:
    print(f"no JSON report ({e})"); sys.exit(0)
t, s = d.get("timing", {}), d.get("sweep")
bad = [v for v in d["verdicts"] if v["status"] in ("fail", "error")]
print(f"== {src}: checks done {t.get('checks')}, wall {t.get('wall_seconds')} s, "
      f"checks/s {t.get('checks_per_second')}, workers {t.get('workers')}, failures+errors {len(bad)}, "
      f"expected failures {d['counts'].get('xfail')}")
if s:
    print(f"   configurations run {s['configurations_run']} of {s['configurations_drawn']}, "
          f"time budget reached: {s['time_budget_reached']}")
print(f"   phases (s, all workers): {t.get('phases')}; outside checks {t.get('outside_checks_seconds')} s")
print(f"   outside checks split (s, all workers): {t.get('outside')}")
print(f"   Triton compiles {t.get('triton_compiles')} ({t.get('distinct_kernel_specialisations')} distinct), "
      f"torch.compile graphs {t.get('torch_compile_graphs')}; checks per worker {t.get('checks_per_worker')}")
for b, x in t.get("per_backend", {}).items():
    print(f"   {b:<24} checks {int(x.get('checks', 0)):>6}  backend {x.get('backend', 0):8.1f} s  "
          f"compile {x.get('compile', 0):8.1f} s ({int(x.get('compiles', 0))})")
for v in bad[:20]:
    print(f"   {v['status'].upper()} {v['backend']} :: {v['case']}: {v['reason'][:200]}")
small = {k: d[k] for k in d if k != "verdicts"}
small["problems"] = [v for v in d["verdicts"] if v["status"] in ("fail", "error", "xfail")]
json.dump(small, open(dst, "w"), indent=1)
with open(src, "rb") as f, gzip.open(src + ".gz", "wb") as g:
    shutil.copyfileobj(f, g)
PY
  rm -f "$OUT/$1.json"
}

run_part() {  # $1 = part, rest = verify arguments
  local part=$1; shift
  fresh_caches
  local t0=$SECONDS
  $AC verify --device "$DEVICE" --json "$OUT/$part.json" --profile "$@" > "$OUT/$part.log" 2>&1
  local rc=$?
  echo "== $part: exit $rc after $((SECONDS - t0)) s (log $OUT/$part.log)"
  sed -n '/attncheck: \(sweep\|where the time went\) =/,$p' "$OUT/$part.log" | head -40  # sweep and timing sections
  summarise "$part"
}

PARTS=("$@"); [ ${#PARTS[@]} -eq 0 ] && PARTS=(smoke one all)
for part in "${PARTS[@]}"; do
  case "$part" in
    smoke) run_part smoke --tier smoke -n auto ${EXTRA[@]+"${EXTRA[@]}"} ;;
    one) (export CUDA_VISIBLE_DEVICES=0
          run_part sweep-one --tier sweep --seed "$SEED" --count "$COUNT" --max-seconds "$CAP" -n auto \
            ${EXTRA[@]+"${EXTRA[@]}"} ${SWEEP_EXTRA[@]+"${SWEEP_EXTRA[@]}"}) ;;
    all) run_part sweep-all --tier sweep --seed "$SEED" --count "$COUNT" --max-seconds "$CAP" -n auto \
           ${EXTRA[@]+"${EXTRA[@]}"} ${SWEEP_EXTRA[@]+"${SWEEP_EXTRA[@]}"} ;;
    draws) python3 - <<'PY' 2>&1 | tee "$OUT/draws.txt"
# every tensor of a few live cases (MHA, fp8, MLA; large sweep sizes, the smaller ones so the CPU
# side stays quick) compared bit for bit between a CUDA build and a CPU build
import torch
from attncheck import mha_case, mla_case, sweep
from attncheck.draws import CounterDraws
sizes, picked, kinds = sweep.sizes_for("cuda"), [], set()
for i in range(400):
    c = sweep.config(0, i, sizes)
    n = sum(c.seq_lens) * (c.num_kv_heads * c.head_size if c.kind == "MHA" else c.kv_lora_rank)
    tag = (c.kind, c.kv_cache_dtype != "auto")
    if n < 3_000_000 and tag not in kinds:
        kinds.add(tag); picked.append(c)
bad = 0
for c in picked:
    mod = mha_case if c.kind == "MHA" else mla_case
    a = mod.build_inputs(c, CounterDraws(c.seed, "cuda"))
    b = mod.build_inputs(c, CounterDraws(c.seed, "cpu"))
    same = {k: a[k].shape == b[k].shape and torch.equal(a[k].cpu().view(torch.uint8), b[k].view(torch.uint8))
            for k in a}
    bad += not all(same.values())
    print(c.name, c.kind, c.kv_cache_dtype, "tensors", len(same), "identical" if all(same.values()) else
          f"DIFFER: {[k for k, ok in same.items() if not ok]}")
print("draws: cases", len(picked), "differing", bad)
PY
       ;;
    profile) (fresh_caches; python3 -m cProfile -o "$OUT/profile.pstats" -m attncheck.cli verify --device "$DEVICE" \
               --tier sweep --seed "$SEED" --count "$COUNT" --max-seconds "$CAP" -n 0 --profile \
               ${EXTRA[@]+"${EXTRA[@]}"} > "$OUT/profile.log" 2>&1
             python3 -c "import pstats, sys; s = pstats.Stats(sys.argv[1]); s.sort_stats('cumulative').print_stats(45); s.sort_stats('tottime').print_stats(30)" \
               "$OUT/profile.pstats" > "$OUT/profile.txt" 2>&1; rm -f "$OUT/profile.pstats"
             sed -n '/attncheck: \(sweep\|where the time went\) =/,$p' "$OUT/profile.log" | head -30) ;;
    steady) (export CUDA_VISIBLE_DEVICES=0
             run_part steady --tier sweep --seed "$SEED" --count "$COUNT" --max-seconds "$CAP" -n 0 \
               --shapes "${SHAPES:-2}" ${EXTRA[@]+"${EXTRA[@]}"}
             python3 scripts/gpu/steady_state.py <(gzip -dc "$OUT/steady.json.gz")) ;;
    *) echo "unknown part $part (smoke | one | all | draws | profile | steady)"; exit 2 ;;
  esac
done
