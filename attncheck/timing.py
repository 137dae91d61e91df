"""Where a run's time goes: per-check phase timings and kernel compilations, and their totals.

Each verdict carries ``timings`` (seconds per phase of that one check):

* ``load``: reading a stored golden (hash checked once per process);
* ``oracle``: building a live case (inputs from the seed on the CPU, float64 reference and
  budgets on the device); counted on the check that built it, shared by the case's other
  backends in the same process;
* ``prepare``: copies of the inputs, the batch on the device, its validation;
* ``backend``: ``backend.run`` up to a device synchronisation; ``compile`` is the part of it
  spent in Triton compilations (Triton's JIT hooks: the in-memory kernel cache missed; an
  on-disk cache hit is counted too, and is fast); ``compiles`` their number, ``kernels`` the
  specialisations compiled (``name:key-hash``); ``graphs``: new torch.compile graphs (dynamo);
* ``compare``: the rule, the cache and input checks;
* ``worker`` / ``gpu``: the pytest-xdist worker and the device it was pinned to;
* ``started``: when the check began (epoch seconds), which places it in its worker's run.

``summary(verdicts, wall)`` adds them up for the report: totals per phase and per backend,
distinct kernel specialisations, checks per second, and the workers' time outside checks,
split (``outside``) into start-up (until a worker's first check: imports, CUDA, collection),
between checks (pytest, xdist, waiting for work) and after its last check (until the run ends).
Under the Triton interpreter (CPU) nothing is compiled, so compile counts stay 0.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import defaultdict
from contextlib import contextmanager

PHASES = ("load", "oracle", "prepare", "backend", "compile", "compare")

_lock = threading.Lock()
_installed = False
_events: list = []  # (kernel id, seconds) of every compilation in this process, in order
_pending: dict = {}  # thread id -> (kernel id, start time)


def _kernel_id(key, repr_text, fn) -> str:
    name = getattr(fn, "name", None) or str(repr_text or "kernel").split("[", 1)[0]
    digest = hashlib.sha1(str(key).encode()).hexdigest()[:10]
    return f"{name}:{digest}"


def _pre_hook(previous):
    def hook(*args, **kw):
        with _lock:
            _pending[threading.get_ident()] = (_kernel_id(kw.get("key"), kw.get("repr"), kw.get("fn")),
                                               time.perf_counter())
        return previous(*args, **kw) if previous else None
    return hook


def _post_hook(previous):
    def hook(*args, **kw):
        with _lock:
            started = _pending.pop(threading.get_ident(), None)
            if started is not None:
                _events.append((started[0], time.perf_counter() - started[1]))
        return previous(*args, **kw) if previous else None
    return hook


def install_compile_hooks() -> bool:
    """Count Triton compilations in this process (chains any hooks already set). False where
    Triton offers no hooks (or is absent)."""
    global _installed
    if _installed:
        return True
    try:
        import triton
    except ImportError:
        return False
    knobs = getattr(getattr(triton, "knobs", None), "runtime", None)
    if knobs is not None and hasattr(knobs, "jit_cache_hook") and hasattr(knobs, "jit_post_compile_hook"):
        knobs.jit_cache_hook = _pre_hook(knobs.jit_cache_hook)
        knobs.jit_post_compile_hook = _post_hook(knobs.jit_post_compile_hook)
        _installed = True
        return True
    from triton.runtime.jit import JITFunction  # Triton < 3.4: hooks are class attributes

    if hasattr(JITFunction, "cache_hook") and hasattr(JITFunction, "compiled_hook"):
        JITFunction.cache_hook = _pre_hook(JITFunction.cache_hook)
        JITFunction.compiled_hook = _post_hook(JITFunction.compiled_hook)
        _installed = True
        return True
    return False


def _dynamo_graphs() -> int:
    try:
        from torch._dynamo.utils import counters
    except Exception:  # no dynamo in this torch
        return 0
    return int(counters["stats"]["unique_graphs"])


class Watch:
    """What one backend run compiled (filled in when the ``compiling`` block ends)."""

    compiles = 0
    seconds = 0.0
    kernels: tuple = ()
    graphs = 0


@contextmanager
def compiling():
    """``with compiling() as w: backend.run(...)``: w.compiles, w.seconds, w.kernels, w.graphs."""
    install_compile_hooks()
    w = Watch()
    start, graphs = len(_events), _dynamo_graphs()
    try:
        yield w
    finally:
        new = _events[start:]
        w.compiles, w.seconds = len(new), sum(s for _, s in new)
        w.kernels = tuple(k for k, _ in new)
        w.graphs = _dynamo_graphs() - graphs


def where() -> dict:
    """The pytest-xdist worker and the GPU this process is pinned to."""
    out = {"worker": os.environ.get("PYTEST_XDIST_WORKER", "main")}
    gpu = os.environ.get("ATTNCHECK_PINNED_GPU")
    if gpu is not None:
        out["gpu"] = gpu
    return out


# ---- totals -------------------------------------------------------------------------------------

def summary(verdicts: list, wall_seconds: float | None = None, workers: int = 1,
            started: float | None = None) -> dict:
    """Totals of the verdicts' timings: per phase, per backend, compilations, throughput; with
    the run's start (epoch seconds) and wall time, where the workers' time outside checks went."""
    phases = defaultdict(float)
    per_backend: dict = defaultdict(lambda: defaultdict(float))
    kernels: set = set()
    per_gpu: dict = defaultdict(int)
    compiles = graphs = checks = 0
    busy = 0.0
    for v in verdicts:
        t = getattr(v, "timings", None) or {}
        if v.status in ("pass", "fail", "xfail", "error") and "backend" in t:
            checks += 1
        busy += v.seconds
        for p in PHASES:
            phases[p] += float(t.get(p, 0.0))
        b = per_backend[v.backend]
        b["checks"] += 1 if "backend" in t else 0
        b["seconds"] += v.seconds
        for p in ("backend", "compile"):
            b[p] += float(t.get(p, 0.0))
        b["compiles"] += int(t.get("compiles", 0))
        compiles += int(t.get("compiles", 0))
        graphs += int(t.get("graphs", 0))
        kernels.update(t.get("kernels", ()))
        per_gpu[f"{t.get('worker', '?')}@{t.get('gpu', '-')}"] += 1
    out = {
        "checks": checks,
        "seconds_in_checks": round(busy, 3),
        "phases": {p: round(s, 3) for p, s in phases.items()},
        "run_minus_compile": round(phases["backend"] - phases["compile"], 3),
        "triton_compiles": compiles,
        "distinct_kernel_specialisations": len(kernels),
        "torch_compile_graphs": graphs,
        "per_backend": {b: {k: (round(x, 3) if isinstance(x, float) else x) for k, x in d.items()}
                        for b, d in sorted(per_backend.items())},
        "checks_per_worker": dict(sorted(per_gpu.items())),
        "workers": workers,
    }
    if wall_seconds:
        out["wall_seconds"] = round(wall_seconds, 3)
        out["checks_per_second"] = round(checks / wall_seconds, 2)
        # what the workers spent outside the checks: start-up, collection, pytest and xdist
        out["outside_checks_seconds"] = round(max(0.0, wall_seconds * max(workers, 1) - busy), 3)
        if started is not None:
            out["outside"] = _outside(verdicts, started, started + wall_seconds, workers)
    return out


def _outside(verdicts: list, run_start: float, run_end: float, workers: int) -> dict:
    """Seconds of the workers' time outside checks: before each worker's first check, between
    its checks, after its last one, and ``idle_workers`` (workers that ran no check at all);
    ``start_up_max``: the slowest worker's start-up."""
    spans: dict = defaultdict(list)  # worker -> [(start, seconds)]
    for v in verdicts:
        t = getattr(v, "timings", None) or {}
        if "started" in t:
            spans[t.get("worker", "?")].append((float(t["started"]), v.seconds))
    between, after, ups = 0.0, 0.0, []
    for checks in spans.values():
        first = min(s for s, _ in checks)
        last_end = max(s + d for s, d in checks)
        ups.append(first - run_start)
        between += max(0.0, (last_end - first) - sum(d for _, d in checks))
        after += max(0.0, run_end - last_end)
    idle = max(0, max(workers, 1) - len(spans)) * (run_end - run_start)
    return {"start_up": round(sum(ups), 3), "start_up_max": round(max(ups, default=0.0), 3),
            "between_checks": round(between, 3), "after_last_check": round(after, 3), "idle_workers": round(idle, 3)}


def render(s: dict) -> str:
    ph = s["phases"]
    lines = [f"{s['checks']} checks" + (f" in {s['wall_seconds']:.1f} s wall ({s['checks_per_second']:.1f} checks/s, "
                                        f"{s['workers']} worker(s))" if "wall_seconds" in s else "")]
    lines.append("time in checks (all workers): " + ", ".join(f"{p} {ph.get(p, 0.0):.1f} s" for p in PHASES)
                 + f"; outside checks {s.get('outside_checks_seconds', 0.0):.1f} s")
    if "outside" in s:
        o = s["outside"]
        lines.append(f"outside checks: start-up {o['start_up']:.1f} s (slowest worker {o['start_up_max']:.1f} s), "
                     f"between checks {o['between_checks']:.1f} s, after the last check {o['after_last_check']:.1f} s"
                     + (f", workers that ran nothing {o['idle_workers']:.1f} s" if o["idle_workers"] else ""))
    lines.append(f"compilations: {s['triton_compiles']} Triton ({s['distinct_kernel_specialisations']} distinct "
                 f"specialisations, {ph.get('compile', 0.0):.1f} s), {s['torch_compile_graphs']} torch.compile graphs")
    for b, d in s["per_backend"].items():
        lines.append(f"  {b:<24} {int(d.get('checks', 0)):>6} checks  backend {d.get('backend', 0.0):8.1f} s  "
                     f"compile {d.get('compile', 0.0):8.1f} s ({int(d.get('compiles', 0))})")
    return "\n".join(lines)
