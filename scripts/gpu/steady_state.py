"""Per-check cost once compilation is out of the way, from a verify --json report (sweep.sh steady).

    python3 scripts/gpu/steady_state.py report.json

Prints, per backend, the mean seconds per phase over checks that compiled nothing (no Triton
compilation, no new torch.compile graph), the oracle's mean per configuration, and the checks
per second of the whole run. What a sweep costs when every shape class is compiled already."""
import json
import statistics
import sys
from collections import defaultdict

d = json.load(open(sys.argv[1]))
verdicts = d["verdicts"]
phases = ("oracle", "prepare", "backend", "compare")
warm, cold = defaultdict(list), defaultdict(int)
oracle = []
for v in verdicts:
    t = v.get("timings") or {}
    if "oracle" in t:
        oracle.append(t["oracle"])
    if v["status"] == "skip":
        continue
    if t.get("compiles") or t.get("graphs"):
        cold[v["backend"]] += 1
        continue
    warm[v["backend"]].append(t)
print(f"checks {sum(1 for v in verdicts if v['status'] != 'skip')}, timing {d.get('timing', {}).get('checks_per_second')} checks/s")
if oracle:
    print(f"oracle per configuration: mean {statistics.mean(oracle):.3f} s, median {statistics.median(oracle):.3f} s, "
          f"max {max(oracle):.2f} s over {len(oracle)}")
print(f"{'backend':<24}{'warm':>6}{'cold':>6}" + "".join(f"{p:>10}" for p in phases[1:]) + f"{'total':>10}")
for b in sorted(warm):
    ts = warm[b]
    means = [statistics.mean(t.get(p, 0.0) for t in ts) for p in phases[1:]]
    print(f"{b:<24}{len(ts):>6}{cold[b]:>6}" + "".join(f"{m:>10.4f}" for m in means) + f"{sum(means):>10.4f}")
