"""Host syncs per check, by phase and by line (CUDA only): where a check waits for the GPU.

    python3 scripts/gpu/sync_census.py [SEED [COUNT]]

Under several processes sharing one GPU a host sync waits for every other process's queued work
(the GPU time-slices between them), so a check's syncs, not its arithmetic, set its cost. This
builds COUNT (default 12) sweep configurations of SEED (default 2) and runs every backend that
accepts each, with torch.cuda.set_sync_debug_mode("warn"); each sync's Python stack is reduced
to its phase (oracle, prepare, backend, compare) and the innermost line of this repository.
"""
import collections
import sys
import traceback
import warnings

import torch

from attncheck import backends, harness, sweep

PHASES = (("build_live", "oracle"), ("backend.run", "backend"), ("run(", "backend"),
          ("_judge_output", "compare"), ("_judge", "prepare"))


def where(stack):
    ours = [f for f in stack if "/attncheck/" in f.filename or "/reference/" in f.filename or "/impl/" in f.filename]
    names = [f.name for f in stack]
    phase = "other"
    for fn, ph in (("build_live", "oracle"), ("_judge_output", "compare")):
        if fn in names:
            phase = ph
            break
    else:
        if "_judge" in names:
            i = names.index("_judge")
            phase = "backend" if any(f.name == "run" for f in stack[i + 1:]) else "prepare"
    inner = ours[-1] if ours else stack[-1]
    return phase, f"{inner.filename.split('/')[-2]}/{inner.filename.split('/')[-1]}:{inner.lineno} {inner.name}"


def main():
    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 12
    sizes = sweep.sizes_for("cuda")
    by_phase, by_line, checks = collections.Counter(), collections.Counter(), 0
    per_backend = collections.Counter()
    current = {"backend": None}

    def hook(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        phase, loc = where(traceback.extract_stack()[:-1])
        by_phase[phase] += 1
        by_line[(phase, loc)] += 1
        per_backend[(current["backend"], phase)] += 1

    warnings.showwarning = hook
    warnings.simplefilter("always")
    names = backends.names()
    for i in range(count):
        case = sweep.config(seed, i, sizes)
        torch.cuda.set_sync_debug_mode("warn")
        current["backend"] = "(oracle)"
        tensors, _ = harness._golden_tensors_timed(case, torch.device("cuda"))
        for name in names:
            b = backends.get_backend(name)
            if sweep.accepted(b, case) is not None or not b.availability(torch.device("cuda")).ok:
                continue
            current["backend"] = name
            v = harness.run_backend(b, case, "cuda", tensors=tensors)
            checks += 1
            print(f"{case.name} {name}: {v.status}", flush=True)
        torch.cuda.set_sync_debug_mode(0)
    print(f"\n{checks} checks over {count} configurations; syncs by phase: {dict(by_phase)}")
    print("per check:", {k: round(n / max(checks, 1), 1) for k, n in by_phase.items()})
    print("\nby backend and phase:")
    for (b, ph), n in sorted(per_backend.items(), key=lambda x: -x[1]):
        print(f"  {n:6d} {b} {ph}")
    print("\nby line:")
    for (ph, loc), n in by_line.most_common(60):
        print(f"  {n:6d} {ph:<8} {loc}")


if __name__ == "__main__":
    main()
