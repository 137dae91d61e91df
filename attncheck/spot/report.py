"""Run a task through the reference and each backend, compare item by item, render lm-eval tables.

The gate (``verdict``). A backend FAILS a task when
  * the reference answers every item correctly and the backend gets any item wrong (a model that
    is exact by construction, like the retrieval model, leaves a correct kernel no excuse), or
  * its score is lower than the reference's by more than max(3 paired stderr, 2 points). The
    paired stderr is the sample std of the per-item differences (reference - backend) over
    sqrt(n): both runs answer the same items, so this is the sensitive comparison; the 2-point
    floor keeps a handful of borderline greedy flips of a real checkpoint from failing a kernel.
A failure is an expected one (XFAIL, shown with its reason, not counted) when the backend
declares a ``KnownIssue`` that applies to at least one batch the engine gave it (the harness's
rule for goldens). A backend that raises is an ERROR; one that cannot run here (or lacks a
capability the model needs) is SKIPPED with the reason. Items whose answers differ ("flips") are counted either way
and the first one is shown down to its first diverging token.
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass, field
from typing import Optional

import torch

from attncheck.spot.engine import Engine

DROP_FLOOR = 0.02
DROP_STDERRS = 3.0


@dataclass
class Run:
    backend: str
    provider: str = ""
    status: str = "ok"  # ok | skip | error
    reason: str = ""
    detail: str = ""  # the traceback of an error
    known_issues: dict = field(default_factory=dict)  # KnownIssue -> engine steps it applied to
    block_size: Optional[int] = None
    scores: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def value(self) -> float:
        return sum(self.scores) / len(self.scores) if self.scores else float("nan")


def stderr(xs: list) -> float:
    """Sample standard deviation (n - 1) over sqrt(n), as lm-eval's mean_stderr."""
    n = len(xs)
    if n < 2:
        return float("nan")
    mean = sum(xs) / n
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1) / n)


def capability_gap(backend, model, dtype, block_size: int) -> Optional[str]:
    cfg = model.config
    params = {"torch_dtype": dtype, "block_size": block_size, "num_heads": cfg.num_heads}
    if backend.kind == "MHA":
        params["head_size"] = cfg.head_dim
    return backend.capabilities.unsupported(params)


def run_task(model, task, items, backend, *, device, block_size=None, engine_kwargs=None, progress=True) -> Run:
    """Generate every item's answer through ``backend`` and score it."""
    from attncheck.spot.attention import default_block_size

    run = Run(backend.name, provider=getattr(backend, "provider", "") or "")
    avail = backend.availability(torch.device(device))
    if not avail.ok:
        run.status, run.reason = "skip", avail.reason
        return run
    dtype = next(model.parameters()).dtype
    run.block_size = block_size or default_block_size(backend)
    gap = capability_gap(backend, model, dtype, run.block_size)
    if gap:
        run.status, run.reason = "skip", gap
        return run
    t0 = time.time()
    try:
        engine = Engine(model, backend, device=device, block_size=run.block_size, **(engine_kwargs or {}))
        bar = _progress(progress, len(items), f"{task.name} {backend.name}")
        run.outputs = engine.generate([it.prompt for it in items], task.max_new_tokens, stop=task.stop, progress=bar)
        if bar is not None:
            bar.close()
        run.known_issues = dict(engine.attention.known_issues_seen)
    except Exception as e:  # a backend that raises is reported, not fatal to the other backends
        run.status = "error"
        run.reason = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        run.detail = traceback.format_exc()
        return run
    run.seconds = time.time() - t0
    run.scores = [task.score(it, out) for it, out in zip(items, run.outputs)]
    return run


def _progress(enabled, total, desc):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="item", leave=False, disable=None)


def compare(ref: Run, run: Run, items: list, task) -> dict:
    """Delta, paired stderr, flips, first divergence and the verdict of ``run`` against ``ref``."""
    out = {"backend": run.backend, "provider": run.provider, "status": run.status, "reason": run.reason,
           "block_size": run.block_size, "seconds": round(run.seconds, 2)}
    if run.status != "ok":
        out["verdict"] = "ERROR" if run.status == "error" else "SKIP"
        return out
    n = len(items)
    diffs = [a - b for a, b in zip(ref.scores, run.scores)]
    flips = [i for i in range(n) if ref.outputs[i] != run.outputs[i]]
    drop = sum(diffs) / n
    paired = stderr(diffs) if n > 1 else 0.0
    paired = 0.0 if math.isnan(paired) else paired
    limit = max(DROP_STDERRS * paired, DROP_FLOOR)
    worse = [i for i in range(n) if ref.scores[i] > run.scores[i]]
    reasons = []
    if ref.value == 1.0 and worse:
        reasons.append(f"the reference answers all {n} items, {run.backend} gets {len(worse)} wrong")
    if drop > limit:
        reasons.append(f"drop {drop:.4f} > max({DROP_STDERRS:g} x paired stderr {paired:.4f}, {DROP_FLOOR})")
    out.update(value=run.value, stderr=stderr(run.scores), delta=run.value - ref.value, paired_stderr=paired,
               flips=len(flips), flip_fraction=len(flips) / n, worse=len(worse),
               verdict="FAIL" if reasons else "PASS", why=reasons)
    if reasons and run.known_issues:
        out["verdict"] = "XFAIL"
        out["known_issues"] = [f"known issue [{run.backend}, {k.platform}]: {k.reason} ({k.link}); "
                               f"applied to {n} engine steps" for k, n in run.known_issues.items()]
    if flips:
        i = flips[0]
        a, b = ref.outputs[i], run.outputs[i]
        k = next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), min(len(a), len(b)))
        out["first_flip"] = {"item": i, "describe": task.describe(items[i]), "token": k,
                             "reference": task.text(a[k:k + 1]) if k < len(a) else "(end)",
                             "backend": task.text(b[k:k + 1]) if k < len(b) else "(end)",
                             "reference_answer": task.text(a), "backend_answer": task.text(b)}
    return out


# ---- rendering ------------------------------------------------------------------------------

HEADERS = ["Tasks", "Version", "Filter", "n-shot", "Metric", "", "Value", "", "Stderr"]


def lm_eval_table(task, run: Run) -> str:
    """The table lm-eval's make_table prints (Markdown, 4 decimals)."""
    from tabulate import tabulate

    row = [task.name, task.version, task.filter, task.n_shot, task.metric, "↑", f"{run.value:.4f}", "±",
           f"{stderr(run.scores):.4f}"]
    return tabulate([row], HEADERS, tablefmt="pipe", disable_numparse=True, colalign=("left", "right", "left", "right", "left",
                                                               "left", "right", "left", "right"))


def render_reference(task, items, ref: Run) -> str:
    return "\n".join([f"== task {task.name}: {len(items)} items; reference attention: {ref.backend} (float64), "
                      f"{ref.seconds:.1f} s ==", "", lm_eval_table(task, ref), ""])


def render_backend(task, items, run: Run, cmp: dict) -> str:
    head = f"-- {run.backend}"
    if run.provider:
        head += f" (provider {run.provider})"
    if run.block_size:
        head += f", block size {run.block_size}"
    lines = [f"{head}: {cmp['verdict']}"]
    if cmp["verdict"] in ("SKIP", "ERROR"):
        return "\n".join(lines + [f"   {cmp['reason']}", ""])
    lines += [lm_eval_table(task, run),
              f"   delta vs reference {cmp['delta']:+.4f} (paired stderr {cmp['paired_stderr']:.4f}); "
              f"answers flipped: {cmp['flips']}/{len(items)} ({100 * cmp['flip_fraction']:.1f}%), "
              f"{cmp['worse']} of them now wrong; {run.seconds:.1f} s"]
    for why in cmp.get("why", []):
        lines.append(f"   {cmp['verdict']}: {why}")
    for note in cmp.get("known_issues", []):
        lines.append(f"   {note}")
    if "first_flip" in cmp:
        f = cmp["first_flip"]
        lines.append(f"   first flip: item {f['item']} ({f['describe']}): answer token {f['token']} is "
                     f"{f['backend']} instead of {f['reference']} (answer {f['backend_answer']} vs "
                     f"{f['reference_answer']})")
    return "\n".join(lines + [""])
