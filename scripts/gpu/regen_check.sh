#!/usr/bin/env bash
# Machine independence of the golden store (issue 9 item 1) on the GPU machine.
# Usage, on the device machine from the repository root: bash scripts/gpu/regen_check.sh
# 1. `attncheck golden regen --check` (the CPU generator, on this machine's CPU, torch and Python)
#    under ATEN_CPU_CAPABILITY=default, avx2 and avx512 (avx512 is skipped where the CPU lacks it).
# 2. Every stored MHA/MLA case's expected.* and budget.* recomputed on CUDA from the stored inputs
#    (reference.emulated's EXACT engine: float64 with written-out roundings, fixed-order sums)
#    and compared byte for byte with the store.
# LEVELS (default "default avx2 avx512"; empty: the CUDA part alone) picks step 1's levels.
# Writes $OUT/regen_check.txt. Expected: every level "exit 0; N of N stored cases unchanged",
# and "cuda: N cases, 0 differ".
set -u
OUT=${OUT:-/tmp/attncheck-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
LOG="$OUT/regen_check.txt"
python3 -c "import torch, platform; print('torch', torch.__version__, 'python', platform.python_version(), torch.cuda.get_device_name(0))" | tee "$LOG"
# The cases run in parallel, JOBS at a time (a float64 emulated regen of the whole store takes
# minutes in one process); each job is `golden regen --check --case ...` on a few cases.
JOBS=${JOBS:-$(nproc)}
CASES=${CASES:-$(python3 -c "from attncheck import golden; print(' '.join(c.name for c in golden.stored_cases()))")}
for level in ${LEVELS-default avx2 avx512}; do
  echo "== ATEN_CPU_CAPABILITY=$level" | tee -a "$LOG"
  ATEN_CPU_CAPABILITY=$level python3 -c "import torch; print('capability', torch.backends.cpu.get_cpu_capability())" | tee -a "$LOG"
  echo $CASES | tr ' ' '\n' | ATEN_CPU_CAPABILITY=$level xargs -P "$JOBS" -n 3 python3 -m attncheck golden regen --check --case \
    > "$OUT/regen_$level.txt" 2>&1
  rc=$?
  echo "exit $rc; $(grep -c '^  unchanged' "$OUT/regen_$level.txt") of $(echo $CASES | wc -w) stored cases unchanged" | tee -a "$LOG"
  grep -v -E '^  unchanged|^0 case\(s\) new' "$OUT/regen_$level.txt" | head -20 | tee -a "$LOG"
done
echo "== expected.* and budget.* on cuda" | tee -a "$LOG"
CASES="$CASES" python3 - <<'PY' 2>&1 | tee -a "$LOG"
import inspect, os, torch
from attncheck import golden
differ, n = [], 0
wanted = set(os.environ["CASES"].split())
for case in (c for c in golden.stored_cases() if c.name in wanted):
    mod = golden.case_module(case)
    if "compute_device" not in inspect.signature(getattr(mod, "expected_and_budgets", lambda: 0)).parameters:
        continue  # merge cases: elementwise only, checked by regen --check
    stored = golden.load(case)
    inputs = {k: v for k, v in stored.items() if not k.startswith(("expected.", "budget."))}
    got = mod.expected_and_budgets(case, inputs, compute_device="cuda")
    n += 1
    bad = [k for k, v in got.items() if golden.tensor_sha(v) != golden.tensor_sha(stored[k])]
    if bad:
        differ.append(f"{case.name}: {bad}")
        print("  differs", case.name, bad, flush=True)
print(f"cuda: {n} cases, {len(differ)} differ")
PY
