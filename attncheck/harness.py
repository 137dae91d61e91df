"""Run one backend on one case and judge it: the single path every test and the CLI use.

    verdict = run_backend("TRITON_ATTN", "mixed-h8x2-d64-bs16-bf16", device="cpu")

``case`` is a catalogue name or a case object; a case object not stored on disk (an ad-hoc
spec, or the large tier) is generated in memory. The verdict is "skip" (with the reason)
when the backend cannot run here or lacks a capability the case needs, "error" when it
raised, and otherwise "pass"/"fail" by the rule in ``attncheck.rule``.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Optional

import torch

from attncheck import cases as catalogue
from attncheck import golden
from attncheck.backends import get_backend
from attncheck.rule import compare_cache, compare_output
from impl.batch import BatchError


@dataclass
class Verdict:
    backend: str
    case: str
    status: str  # pass | fail | xfail | skip | error
    reason: str = ""
    report: str = ""
    worst_ratio: float = 0.0
    mean_ratio: float = 0.0
    family: str = ""
    tier: str = ""
    seconds: float = 0.0
    verified: bool = True  # False: skipped because this machine cannot check a ROCm-only path
    details: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def as_dict(self) -> dict:
        return {"backend": self.backend, "case": self.case, "status": self.status, "reason": self.reason,
                "worst_ratio": self.worst_ratio, "mean_ratio": self.mean_ratio, "family": self.family,
                "tier": self.tier, "seconds": round(self.seconds, 3), "verified": self.verified,
                "report": self.report}


def list_cases(tier: Optional[str] = None, kind: Optional[str] = None, family: Optional[str] = None) -> list:
    return [c.name for c in catalogue.select_cases(tier=tier, kind=kind, family=family)]


def _case_obj(case):
    return catalogue.get_case(case) if isinstance(case, str) else case


def _is_stored(case) -> bool:
    if case.tier not in catalogue.STORED_TIERS:
        return False
    try:
        return catalogue.get_case(case.name) == case
    except KeyError:
        return False


def golden_tensors(case, device="cpu") -> dict:
    """The case's inputs, expected outputs and budgets (stored, or generated in memory)."""
    case = _case_obj(case)
    module = golden.case_module(case)
    if _is_stored(case):
        return golden.load(case)
    if case.tier == "large":
        key = (case, str(device))
        if key not in _LIVE:  # one live oracle per process: every backend reuses it
            _LIVE.clear()
            _LIVE[key] = module.build_live(case, device)
        return _LIVE[key]
    return golden.generate(case)


_LIVE: dict = {}


def _resolve_device(device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda requested but torch sees no CUDA device")
    return dev


def run_backend(backend, case, device="cpu", tensors: Optional[dict] = None) -> Verdict:
    t0 = time.perf_counter()
    case = _case_obj(case)
    if isinstance(backend, str):
        backend = get_backend(backend)
    v = Verdict(backend=backend.name, case=case.name, status="skip", family=case.family, tier=case.tier)
    try:
        dev = _resolve_device(device)
        if case.kind != backend.kind:
            v.reason = f"{backend.name} is an {backend.kind} backend; case {case.name} is {case.kind}"
            return v
        avail = backend.availability(dev)
        if not avail.ok:
            v.reason = avail.reason
            v.verified = avail.verified
            return v
        missing = backend.capabilities.unsupported(case.params())
        if missing:
            v.reason = missing
            return v
        if tensors is None:
            tensors = golden_tensors(case, dev)
        v = _judge(backend, case, tensors, dev, v, t0)
        return _apply_known_issues(backend, case, dev, v)
    except Exception as e:  # the backend (or its kernels) raised: report it, never hide it
        v.status = "error"
        v.reason = f"{type(e).__name__}: {e}"
        v.report = traceback.format_exc(limit=8)
        return v
    finally:
        v.seconds = time.perf_counter() - t0


def _apply_known_issues(backend, case, dev, v: Verdict) -> Verdict:
    """A declared override (backend, platform, reason, issue) turns a failure into an expected
    failure, reported as such; it never hides a pass or an error."""
    for known in getattr(backend, "known_issues", ()) or ():
        if known.applies(case.params()) and known.platform in ("all", dev.type):
            note = f"known issue [{backend.name}, {known.platform}]: {known.reason} ({known.issue})"
            if v.status == "fail":
                v.status = "xfail"
                v.reason = note
            elif v.status == "pass":
                v.report += f"\n  note: {note} did not reproduce on this case"
    return v


def _judge(backend, case, tensors, dev, v: Verdict, t0) -> Verdict:
    module = golden.case_module(case)
    batch = module.batch_from_tensors(case, tensors, dev)
    before = {name: getattr(batch, name).detach().cpu().clone() for name, _ in module.CACHE_FIELDS}
    batch.validate(allow_unordered=getattr(case, "unordered", False))
    try:
        out = backend.run(batch)
    except BatchError as e:
        if getattr(case, "unordered", False):
            v.status = "pass"
            v.report = f"rejected the unordered batch with a clear error: {e}"
            return v
        raise
    if dev.type == "cuda":
        torch.cuda.synchronize()
    expected = {k: t for k, t in tensors.items() if k.startswith(("expected.", "budget."))}
    factors = module.rule_factors(case)
    locate = (lambda tok: module.locate_row(case, tensors, tok)) if hasattr(module, "locate_row") else None
    result = compare_output(out.output, expected, k_row=factors["k_row"], k_mean=factors["k_mean"],
                            model_dtype=case.torch_dtype, lse=out.lse, locate=locate)
    for field_name, exp_name in module.CACHE_FIELDS:
        result.checks.append(compare_cache(field_name, before[field_name], getattr(batch, field_name),
                                           tensors["slot_mapping"], tensors[exp_name]))
    result.passed = all(c.passed for c in result.checks)
    v.status = "pass" if result.passed else "fail"
    v.worst_ratio, v.mean_ratio = result.worst_ratio, result.mean_ratio
    head = f"{backend.name} on {case.name} ({case.kind}, tier {case.tier}): {v.status.upper()}"
    if getattr(case, "unordered", False) and v.status == "pass":
        head += " (accepted the unordered batch and computed it correctly)"
    v.report = head + "\n" + result.summary()
    if out.info.get("kernel"):
        v.report += f"\n  ran: {out.info['kernel']}"
    v.details = {"failing_rows": result.failing_rows, "diagnostics": result.diagnostics,
                 "lse_checked": out.lse is not None, "info": out.info}
    return v
