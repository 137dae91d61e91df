"""Run one backend on one case and judge it: the single path every test, tool and the CLI use.

    verdict = run_backend("TRITON_ATTN", "mixed-h8x2-d64-bs16-bf16", device="cpu")
    verdict.status, verdict.reason, verdict.failing_rows[0]["sequence"], verdict.as_dict()

``case`` is a catalogue name or a case object; a case object not stored on disk (an ad-hoc
spec, or the large tier) is generated in memory. The verdict is "skip" (with the reason)
when the backend cannot run here or lacks a capability the case needs, "error" when it
raised, and otherwise "pass"/"fail" by the rule in ``attncheck.rule`` plus the harness's own
checks: the cache writes, the inputs left untouched, an LSE where the capabilities promise one.

The backend never sees the caller's tensors: each run gets its own copies, so a backend that
writes into its inputs is reported (check "inputs unchanged") and cannot damage the inputs of
the next backend run on the same tensors. ``keep_artifacts=True`` keeps CPU copies of what
went in and came out on ``verdict.artifacts`` for debugging tools.
"""

from __future__ import annotations

import dataclasses
import math
import time
import traceback
from dataclasses import dataclass, field
from typing import Optional

import torch

from attncheck import cases as catalogue
from attncheck import golden, runtime, sweep, timing
from attncheck.backends import PluginError, get_backend
from attncheck.rule import Check, bits, compare_cache, compare_output
from impl.batch import BatchError

STATUSES = ("pass", "fail", "xfail", "skip", "error")
GOLDEN_ONLY = ("expected.", "budget.")  # tensor-name prefixes that are never handed to a backend


@dataclass
class Verdict:
    """What happened when one backend ran one case, as data.

    ``failing_rows`` are dicts, worst first: check, sequence, token (row in the batch),
    position (in its sequence), head, kv_blocks, error, budget, ratio, where (the same as
    text). ``worst_ratio``/``mean_ratio`` are None when the rows could not be compared (a
    skip, an error, a wrong output shape). Every "fail" and "error" has a ``reason``.
    """

    backend: str
    case: str
    status: str  # pass | fail | xfail | skip | error
    provider: str = ""
    kind: str = ""
    family: str = ""
    tier: str = ""
    device: str = ""
    reason: str = ""
    checks: list = field(default_factory=list)  # rule.Check
    failing_rows: list = field(default_factory=list)
    diagnostics: dict = field(default_factory=dict)
    worst_ratio: Optional[float] = None
    mean_ratio: Optional[float] = None
    lse_checked: bool = False
    info: dict = field(default_factory=dict)  # what the backend says it ran (BackendOutput.info)
    seconds: float = 0.0
    verified: bool = True  # False: skipped because this machine cannot check a ROCm-only path
    report: str = ""
    timings: dict = field(default_factory=dict)  # seconds per phase of this check (attncheck.timing)
    artifacts: Optional[dict] = field(default=None, repr=False, compare=False)  # keep_artifacts=True

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def as_dict(self) -> dict:
        """JSON-serialisable (no NaN/inf: non-finite numbers become the strings "nan", "inf",
        "-inf"); ``artifacts`` are left out."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "artifacts"}
        d["checks"] = [dataclasses.asdict(c) for c in self.checks]
        d["seconds"] = round(self.seconds, 3)
        return json_safe(d)

    @classmethod
    def from_dict(cls, d: dict) -> "Verdict":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["checks"] = [Check(**c) for c in d.get("checks", ())]
        for name in ("worst_ratio", "mean_ratio"):
            kw[name] = _number(kw.get(name))
        kw["diagnostics"] = {k: _number(x) for k, x in d.get("diagnostics", {}).items()}
        kw["failing_rows"] = [{k: _number(x) if k in ("error", "budget", "ratio") else x for k, x in row.items()}
                              for row in d.get("failing_rows", ())]
        return cls(**kw)


def _number(x):
    """Undo ``json_safe`` for a numeric field ("inf" -> inf)."""
    return float(x) if isinstance(x, str) else x


def json_safe(x):
    """``x`` with every value JSON can hold (non-finite floats as "nan"/"inf"/"-inf" strings)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if x is None or isinstance(x, (str, int, bool)):
        return x
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return json_safe(x.item())
    return str(x)


def provider_of(backend) -> str:
    """Where a backend's code comes from: its declared ``provider``, else its Python module."""
    return getattr(backend, "provider", "") or type(backend).__module__


def list_cases(tier: Optional[str] = None, kind: Optional[str] = None, family: Optional[str] = None) -> list:
    return [c.name for c in catalogue.select_cases(tier=tier, kind=kind, family=family)]


def _case_obj(case, device="cpu"):
    """A case object from a catalogue name, a sweep name (``sweep:S:I``, drawn at the sizes of
    ``device``, attncheck.sweep) or a case object."""
    if not isinstance(case, str):
        return case
    if sweep.is_sweep_name(case):
        return sweep.case_from_name(case, sweep.sizes_for(runtime.torch_device(device).type))
    return catalogue.get_case(case)


def _is_stored(case) -> bool:
    if case.tier not in catalogue.STORED_TIERS:
        return False
    try:
        return catalogue.get_case(case.name) == case
    except KeyError:
        return False


def golden_tensors(case, device="cpu") -> dict:
    """The case's inputs, expected outputs and budgets (stored, or generated in memory)."""
    return _golden_tensors_timed(_case_obj(case, device), device)[0]


def _golden_tensors_timed(case, device) -> tuple:
    """(tensors, {"load" or "oracle": seconds spent here}). Live tiers (large, sweep) build the
    case on ``device`` with its kind's ``build_live``, once per process and case: the backends
    of one case (consecutive items, one xdist group) share that oracle."""
    t0 = time.perf_counter()
    if _is_stored(case):
        return golden.load(case), {"load": time.perf_counter() - t0}
    if case.tier not in catalogue.LIVE_TIERS:
        return golden.generate(case), {"oracle": time.perf_counter() - t0}
    key = (case, str(device))
    if key not in _LIVE:
        _LIVE.clear()
        _LIVE[key] = golden.case_module(case).build_live(case, device)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()  # the oracle's time is its own, not the first check's
        return _LIVE[key], {"oracle": time.perf_counter() - t0}
    return _LIVE[key], {}


_LIVE: dict = {}  # holds one case only (a large-tier oracle is hundreds of MB), so not an lru_cache


def run_backend(backend, case, device="cpu", tensors: Optional[dict] = None,
                keep_artifacts: bool = False) -> Verdict:
    """Judge ``backend`` (object or registered name) on ``case`` (object or catalogue name).

    ``tensors`` (golden inputs, expected values and budgets) are read, never written.
    ``keep_artifacts=True``: ``verdict.artifacts`` holds CPU copies of the inputs as run
    (``inputs``, caches before the run included), the backend's ``output`` and ``lse`` and
    the ``caches`` after the run (when the backend ran).
    """
    t0, started = time.perf_counter(), time.time()
    case = _case_obj(case, device)
    if isinstance(backend, str):
        try:
            backend = get_backend(backend)
        except PluginError as e:  # registered, but its code does not load: an error of that backend
            return Verdict(backend=backend, case=case.name, status="error", kind=case.kind, family=str(case.family),
                           tier=case.tier, device=str(device), reason=f"backend {backend} could not be loaded: {e}",
                           report=str(e))
    v = Verdict(backend=backend.name, case=case.name, status="skip", provider=provider_of(backend),
                kind=case.kind, family=str(case.family), tier=case.tier, device=str(device), timings=timing.where())
    try:
        dev = runtime.torch_device(device)
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
            tensors, spent = _golden_tensors_timed(case, dev)
            v.timings.update(spent)
        v = _judge(backend, case, tensors, dev, v, keep_artifacts)
        return _apply_known_issues(backend, case, dev, v)
    except Exception as e:  # the backend (or its kernels) raised: report it, never hide it
        v.status = "error"
        v.reason = f"{type(e).__name__}: {e}"
        v.report = traceback.format_exc(limit=8)
        return v
    finally:
        v.seconds = time.perf_counter() - t0
        v.timings["started"] = started
        if case.tier == "sweep" and v.status in ("fail", "error", "xfail"):
            # not a catalogue row: the name alone does not say what ran
            v.report = f"case {case.name}: {sweep.describe(case)}\n{v.report}"
        v.timings = {k: round(x, 6) if isinstance(x, float) else x for k, x in v.timings.items()}


def _apply_known_issues(backend, case, dev, v: Verdict) -> Verdict:
    """A declared override (backend, platform, reason, issue) turns a failure into an expected
    failure, reported as such; it never hides a pass or an error."""
    for known in getattr(backend, "known_issues", ()) or ():
        if known.backend == backend.name and known.applies(case.typed_params(), dev.type):
            note = f"known issue [{backend.name}, {known.platform}]: {known.reason} ({known.link})"
            if v.status == "fail":
                v.status = "xfail"
                v.reason = note
            elif v.status == "pass":
                v.report += f"\n  note: {note} did not reproduce on this case"
    return v


def _snapshot(batch) -> dict:
    """The batch's non-tensor fields (scale, knobs): a backend must not change them either."""
    return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)
            if not isinstance(getattr(batch, f.name), torch.Tensor)}


def _inputs_written(batch, pristine: dict, cache_names: set, knobs_before: dict) -> list:
    """Names of the batch inputs that differ from the caller's tensors after the run."""
    verdicts = {}  # name -> True (shape or dtype changed) or a bool tensor where the input lives
    for name, original in pristine.items():
        if name in cache_names or not isinstance(getattr(batch, name, None), torch.Tensor):
            continue
        now = getattr(batch, name).detach().to(original.device)
        same_kind = now.dtype == original.dtype and now.shape == original.shape
        verdicts[name] = (bits(now) != bits(original)).any() if same_kind else True
    flags = dict(verdicts)
    for device in {f.device for f in verdicts.values() if isinstance(f, torch.Tensor)}:
        names = [n for n, f in verdicts.items() if isinstance(f, torch.Tensor) and f.device == device]
        flags.update(zip(names, torch.stack([verdicts[n] for n in names]).tolist()))  # one host sync per device
    written = [name for name in verdicts if flags[name]]
    written += [k for k, val in _snapshot(batch).items() if knobs_before.get(k) != val]
    return written


def _artifacts(pristine: dict, out, batch, cache_names) -> dict:
    return {"inputs": {k: t.detach().cpu().clone() for k, t in pristine.items()},
            "output": out.output.detach().cpu() if out is not None else None,
            "lse": out.lse.detach().cpu() if out is not None and out.lse is not None else None,
            "caches": {n: getattr(batch, n).detach().cpu().clone() for n in cache_names}}


def _reason(checks: list) -> str:
    """One line naming every failed check (the report has the detail)."""
    return "; ".join(f"{c.name}: {c.detail.splitlines()[0]}" if c.detail else c.name
                     for c in checks if not c.passed)


def _judge(backend, case, tensors, dev, v: Verdict, keep_artifacts: bool) -> Verdict:
    t_prepare = time.perf_counter()
    module = golden.case_module(case)
    unordered = getattr(case, "unordered", False)
    pristine = {k: t for k, t in tensors.items() if not k.startswith(GOLDEN_ONLY)}
    # The backend gets copies: what it writes into its inputs cannot reach the caller's tensors.
    batch = module.batch_from_tensors(case, {k: t.clone() for k, t in pristine.items()}, dev)
    cache_names = [name for name, _ in module.CACHE_FIELDS]
    try:
        batch.validate(allow_unordered=unordered)
    except BatchError as e:  # the case's inputs are wrong, not the backend: one line, no traceback
        v.status, v.reason = "error", f"the case's batch is invalid: {e}"
        return v
    knobs_before = _snapshot(batch)
    t_backend = time.perf_counter()
    v.timings["prepare"] = t_backend - t_prepare
    with timing.compiling() as compiled:
        try:
            out = backend.run(batch)
        except BatchError as e:
            out = e
        if dev.type == "cuda":
            torch.cuda.synchronize()
    t_compare = time.perf_counter()
    v.timings.update(backend=t_compare - t_backend, compile=compiled.seconds, compiles=compiled.compiles)
    if compiled.kernels:
        v.timings["kernels"] = list(compiled.kernels)
    if compiled.graphs:
        v.timings["graphs"] = compiled.graphs
    try:
        return _judge_output(backend, case, tensors, dev, v, keep_artifacts, module, pristine, batch, cache_names,
                             knobs_before, out, unordered)
    finally:
        v.timings["compare"] = time.perf_counter() - t_compare


def _judge_output(backend, case, tensors, dev, v, keep_artifacts, module, pristine, batch, cache_names,
                  knobs_before, out, unordered) -> Verdict:
    if isinstance(out, BatchError):
        if keep_artifacts:
            v.artifacts = _artifacts(pristine, None, batch, cache_names)
        return _judge_rejection(backend, case, v, out, unordered)
    if keep_artifacts:
        v.artifacts = _artifacts(pristine, out, batch, cache_names)
    expected = {k: t for k, t in tensors.items() if k.startswith(GOLDEN_ONLY)}
    factors = module.rule_factors(case)
    locate = (lambda tok: module.locate_row(case, tensors, tok)) if hasattr(module, "locate_row") else None
    result = compare_output(out.output, expected, k_row=factors["k_row"], k_mean=factors["k_mean"],
                            model_dtype=case.torch_dtype, lse=out.lse, locate=locate)
    if out.lse is None and backend.capabilities.returns_lse:
        result.checks.append(Check("lse", False, "the capabilities declare an LSE (returns_lse=True) "
                                                 "but run() returned none"))
    for field_name, exp_name in module.CACHE_FIELDS:
        result.checks.append(compare_cache(field_name, pristine[field_name], getattr(batch, field_name),
                                           tensors["slot_mapping"], tensors[exp_name]))
    written = _inputs_written(batch, pristine, set(cache_names), knobs_before)
    result.checks.append(Check("inputs unchanged", not written,
                               f"the backend wrote into its inputs: {', '.join(written)}" if written else ""))
    v.status = "pass" if all(c.passed for c in result.checks) else "fail"
    v.checks, v.failing_rows, v.diagnostics = result.checks, result.failing_rows, result.diagnostics
    v.worst_ratio, v.mean_ratio = result.worst_ratio, result.mean_ratio
    v.lse_checked, v.info = out.lse is not None and "expected.lse" in expected, dict(out.info)
    if v.status == "fail":
        v.reason = _reason(result.checks)
    head = f"{backend.name} on {case.name} ({case.kind}, tier {case.tier}): {v.status.upper()}"
    if unordered and v.status == "pass":
        head += " (accepted the unordered batch and computed it correctly)"
    v.report = head + "\n" + result.summary()
    if out.info.get("kernel"):
        v.report += f"\n  ran: {out.info['kernel']}"
    return v


def _judge_rejection(backend, case, v: Verdict, error: BatchError, unordered: bool) -> Verdict:
    """A backend may reject only the unordered case, and then it must say the order is wrong."""
    if not unordered:
        v.status = "error"
        v.reason = f"BatchError on a valid, vLLM-ordered batch: {error}"
        v.report = v.reason
        return v
    names_order = "order" in str(error).lower()
    v.checks = [Check("unordered batch rejected", names_order,
                      f"rejected with: {error}" if names_order else
                      f"the error does not say the batch order is wrong: {error}")]
    v.status = "pass" if names_order else "fail"
    if not names_order:
        v.reason = _reason(v.checks)
    v.report = (f"{backend.name} on {case.name}: {v.status.upper()}: "
                + ("rejected the unordered batch with a clear error: " if names_order else
                   "rejected the unordered batch, but its error does not name the order: ") + str(error))
    return v
