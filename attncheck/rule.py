"""The pass/fail rule (DESIGN.md "Pass/fail rule"), in one place.

Reference = float64. Budget = the error of the same math in the input dtype ("pt"), stored
per row in the golden, plus the terms of attncheck.budgets (golden/README.md "Budgets" gives
the error analysis). A backend passes when all of these hold:

1. the output has the expected shape and dtype;
2. NaN/Inf positions match the reference's (the reference output is finite everywhere);
3. per row (token, head): ``max_d |o - ref| <= k * pt_err_row + 2 * round_row + pipeline_row
   + out_step`` (k = 2; 3 with softcap/ALiBi; 4 with fp8; ``pipeline_row`` is 0 unless the case
   has more than one legitimate pipeline, e.g. fp8 new tokens attended unquantised or read back;
   ``out_step``: the float32 arithmetic of any correct kernel, attncheck.budgets);
4. ``mean |o - ref| <= k_mean * mean |pt - ref| + pipeline_mean + out_step_mean`` (k_mean = 1.5;
   3 with fp8);
5. LSE, where the backend returns one: -inf exactly where the reference has -inf, and per row
   ``|lse - ref| <= max(k * lse_pt_err + lse_step + lse_pipeline, 1e-5 + 1e-5 |ref|)``
   (``lse_step``: the scores' model-dtype roundings, see ``lse_budget``);
6. cache writes bit-exact (checked by ``compare_cache``).

Cosine distance and relative L2 are reported as diagnostics, never as the gate. A global
max-abs rule missed localized bugs in calibration; the per-row rule is what catches a dropped
last key or one wrong page.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

LSE_ABS_FLOOR = 1e-5
LSE_REL_FLOOR = 1e-5
WORST_ROWS = 5


@dataclass
class Check:
    name: str
    passed: bool
    detail: str = ""


@dataclass
class RuleResult:
    passed: bool
    checks: list = field(default_factory=list)
    # max over rows of error / budget (> 1 fails); None when the rows could not be compared
    # (wrong output shape): such a failure has no ratio, it is not "0.00"
    worst_ratio: Optional[float] = None
    mean_ratio: Optional[float] = None
    diagnostics: dict = field(default_factory=dict)
    failing_rows: list = field(default_factory=list)  # dicts, worst first

    def summary(self) -> str:
        lines = []
        for c in self.checks:
            mark = "ok  " if c.passed else "FAIL"
            lines.append(f"  [{mark}] {c.name}" + (f": {c.detail}" if c.detail else ""))
        if self.diagnostics:
            diag = ", ".join(f"{k} {v:.3g}" for k, v in self.diagnostics.items())
            lines.append(f"  diagnostics (not gating): {diag}")
        return "\n".join(lines)


def locate_token(tensors: dict, token: int, block_size: int, causal: bool = True,
                 sliding_window=None) -> dict:
    """Where a query row lives: its sequence, its position in it, and the KV blocks it reads."""
    qsl = tensors["query_start_loc"].tolist()
    b = max(i for i in range(len(qsl) - 1) if qsl[i] <= token)
    q_len = qsl[b + 1] - qsl[b]
    seq_len = int(tensors["seq_lens"][b])
    pos = seq_len - q_len + (token - qsl[b])
    last = pos if causal else seq_len - 1
    first = max(0, pos - sliding_window + 1) if sliding_window else 0
    blocks = tensors["block_table"][b, first // block_size: last // block_size + 1].tolist()
    return {"sequence": b, "position": pos, "q_len": q_len, "seq_len": seq_len,
            "kv_range": (first, last), "kv_blocks": blocks}


def failing_row(locate: Optional[Callable], token: int, head: int, check: str, error: float = float("nan"),
                budget: float = float("nan"), ratio: float = float("nan")) -> dict:
    """One failing (token, head) row as data: where it lives (sequence, position in it, the KV
    blocks it reads; None when the case cannot locate rows) and how far off it is."""
    where = locate(token) if locate is not None else {}
    return {"check": check, "sequence": where.get("sequence"), "token": token, "position": where.get("position"),
            "head": head, "kv_blocks": list(where.get("kv_blocks", [])) if where else None,
            "error": error, "budget": budget, "ratio": ratio, "where": _describe_row(locate, token, head)}


def _describe_row(locate: Optional[Callable], token: int, head: int) -> str:
    if locate is None:
        return f"token {token}, head {head}"
    where = locate(token)
    blocks = where.get("kv_blocks", [])
    blk = ", ".join(str(x) for x in blocks[:6]) + (", ..." if len(blocks) > 6 else "")
    lo, hi = where.get("kv_range", (None, None))
    return (f"sequence {where['sequence']}, token {where['position']} of {where['seq_len']} "
            f"(row {token}), head {head}, keys {lo}..{hi} in KV blocks [{blk}]")


def row_budget(expected: dict, k_row: float) -> torch.Tensor:
    """Per row [T, H]: ``k * pt_err_row + 2 * round_row + pipeline_row + out_step``."""
    pt = expected["budget.pt_err_row"]
    return (k_row * pt.to(torch.float64) + 2.0 * expected["budget.round_row"].to(torch.float64)
            + _term(expected, "budget.pipeline_row", pt) + _term(expected, "budget.out_step", pt))


def mean_budget(expected: dict, k_mean: float) -> float:
    """``k_mean * pt_err_mean + pipeline_mean + out_step_mean``."""
    return float(_mean_budget(expected, k_mean))


def _mean_budget(expected: dict, k_mean: float) -> torch.Tensor:
    """``mean_budget`` as a 0-d float64 tensor where the budgets live (read with the other numbers)."""
    pt = expected["budget.pt_err_mean"].to(torch.float64)
    return k_mean * pt + _term(expected, "budget.pipeline_mean", pt) + _term(expected, "budget.out_step_mean", pt)


def row_ratios(err: torch.Tensor, expected: dict, k_row: float):
    """Per row (token, head): the error (max over the head dim of ``err``), its budget
    (``row_budget``), and their ratio (> 1 fails)."""
    err_row = err.amax(dim=-1)  # [T, H]
    budget_row = row_budget(expected, k_row)
    ratio = torch.where(budget_row > 0, err_row / budget_row,
                        torch.where(err_row > 0, torch.full_like(err_row, float("inf")), torch.zeros_like(err_row)))
    return err_row, budget_row, ratio


def _term(expected: dict, name: str, like: torch.Tensor) -> torch.Tensor:
    """A budget term, 0 when a golden (or a live case) does not carry it."""
    t = expected.get(name)
    return torch.zeros_like(like, dtype=torch.float64) if t is None else t.to(torch.float64)


def lse_budget(expected: dict, k: float) -> torch.Tensor:
    """Per LSE row [heads, tokens]: ``max(k * lse_pt_err + lse_step + lse_pipeline, 1e-5 + 1e-5 |ref|)``.

    ``k * lse_pt_err`` scales one realisation of the pt paths' rounding noise (as the output
    rule does); ``lse_step`` bounds, to first order in the worst case, what rounding the query
    operand or the scores to the model dtype in any op order does to the LSE (its derivative in
    each score is that key's probability); ``lse_pipeline`` is the exact difference between
    legitimate pipelines; the floor covers float32 exp/log/summation. golden/README.md "Budgets"."""
    ref = expected["expected.lse"].to(torch.float64)
    pt = expected["budget.lse_pt_err"].to(torch.float64)
    terms = k * pt + _term(expected, "budget.lse_step", pt) + _term(expected, "budget.lse_pipeline", pt)
    return torch.maximum(terms, LSE_ABS_FLOOR + LSE_REL_FLOOR * ref.abs().nan_to_num(0.0, 0.0, 0.0))


def lse_row_ratios(got: torch.Tensor, expected: dict, k: float) -> torch.Tensor:
    """Per LSE row [H, T]: |lse - ref| over its budget (> 1 fails); rows that are -inf in the
    reference and the backend give 0, NaN, +inf or a differing -inf pattern give inf."""
    ref = expected["expected.lse"].to(torch.float64)
    ref_inf = torch.isneginf(ref)
    fin = ~ref_inf
    diff = torch.where(fin, (got - ref).abs(), torch.zeros_like(ref))
    ratio = torch.where(fin, diff / lse_budget(expected, k), torch.zeros_like(diff))
    broken = torch.isnan(got) | torch.isposinf(got) | (ref_inf ^ torch.isneginf(got))
    return torch.where(broken, torch.full_like(ratio, float("inf")), ratio)


def compare_output(output: torch.Tensor, expected: dict, *, k_row: float, k_mean: float,
                   model_dtype: torch.dtype, lse: Optional[torch.Tensor] = None,
                   locate: Optional[Callable] = None) -> RuleResult:
    """Compare a backend's output (and LSE) with the golden's expected values and budgets."""
    ref = expected["expected.output"].to(torch.float64)
    checks: list = []
    result = RuleResult(passed=False, checks=checks)

    ok_shape = tuple(output.shape) == tuple(ref.shape)
    checks.append(Check("shape", ok_shape, "" if ok_shape else f"got {tuple(output.shape)}, expected {tuple(ref.shape)}"))
    ok_dtype = output.dtype == model_dtype
    checks.append(Check("dtype", ok_dtype, "" if ok_dtype else f"got {output.dtype}, expected {model_dtype}"))
    if not ok_shape:
        return result
    o = output.detach().to(ref.device, torch.float64)  # compared where the expected values live
    nonfinite = ~torch.isfinite(o)
    o = torch.where(nonfinite, torch.zeros_like(o), o)
    err = (o - ref).abs()
    err_row, budget_row, ratio = row_ratios(err, expected, k_row)
    bad = ratio > 1.0
    # every number a passing check reports, read from the device at once (each read is a host sync)
    zero = torch.zeros((), dtype=torch.float64, device=o.device)
    numbers = torch.stack([nonfinite.any().to(torch.float64), ratio.max() if ratio.numel() else zero,
                           bad.sum().to(torch.float64), err.mean(), _mean_budget(expected, k_mean),
                           (o * ref).sum(), (o * o).sum() + (ref * ref).sum(), (o - ref).norm(), ref.norm(),
                           err.max() if err.numel() else zero]).tolist()
    any_nonfinite, worst, num_bad, mean_err, mean_allowed, num, den, diff_norm, ref_norm, max_abs = numbers

    if any_nonfinite:
        idx = nonfinite.nonzero()
        rows = sorted({(int(t), int(h)) for t, h, _ in idx.tolist()})
        shown = "; ".join(_describe_row(locate, t, h) for t, h in rows[:WORST_ROWS])
        checks.append(Check("finite", False, f"{len(rows)} rows hold NaN/Inf where the reference is finite: {shown}"))
        result.failing_rows += [failing_row(locate, t, h, "finite") for t, h in rows[:WORST_ROWS]]
    else:
        checks.append(Check("finite", True))

    result.worst_ratio = worst
    if num_bad:
        flat = ratio.flatten()
        order = torch.argsort(flat, descending=True)
        H = ratio.shape[1]
        rows = []
        for i in order[: min(WORST_ROWS, int(num_bad))].tolist():
            t, h = divmod(i, H)
            rows.append(failing_row(locate, t, h, "per-row", float(err_row[t, h]), float(budget_row[t, h]),
                                    float(ratio[t, h])))
        result.failing_rows += rows
        shown = "\n".join(f"      {r['where']}: error {r['error']:.3e}, budget {r['budget']:.3e}, ratio {r['ratio']:.2f}"
                          for r in rows)
        checks.append(Check(f"per-row (k={k_row:g})", False,
                            f"{int(num_bad)} of {bad.numel()} rows over budget, worst ratio "
                            f"{result.worst_ratio:.2f}; worst rows:\n{shown}"))
    else:
        checks.append(Check(f"per-row (k={k_row:g})", True, f"worst ratio {result.worst_ratio:.3f}"))

    result.mean_ratio = mean_err / mean_allowed if mean_allowed > 0 else (0.0 if mean_err == 0 else float("inf"))
    checks.append(Check(f"mean (k={k_mean:g})", result.mean_ratio <= 1.0,
                        f"mean error {mean_err:.3e}, budget {mean_allowed:.3e}, ratio {result.mean_ratio:.3f}"))

    if lse is not None and "expected.lse" in expected:
        lse_check, lse_rows = _compare_lse(lse, expected, k_row, locate)
        checks.append(lse_check)
        result.failing_rows += lse_rows

    result.diagnostics = {
        "cos_distance": (1.0 - 2.0 * num / den) if den > 0 else 0.0,
        "rel_l2": diff_norm / ref_norm if ref_norm > 0 else diff_norm,
        "max_abs": max_abs,
    }
    result.passed = all(c.passed for c in checks)
    return result


def _compare_lse(lse: torch.Tensor, expected: dict, k: float, locate) -> tuple[Check, list]:
    """The LSE check and its failing rows (worst first)."""
    ref = expected["expected.lse"].to(torch.float64)
    if tuple(lse.shape) != tuple(ref.shape):
        return Check("lse", False, f"shape {tuple(lse.shape)}, expected {tuple(ref.shape)} ([heads, tokens])"), []
    got = lse.detach().to(ref.device, torch.float64)
    ref_inf, got_inf = torch.isneginf(ref), torch.isneginf(got)
    fin = ~ref_inf
    diff = torch.where(fin, (got - ref).abs(), torch.zeros_like(ref))
    budget = lse_budget(expected, k)
    bad = (diff > budget) & fin
    # what decides the check, read at once (each read from a device is a host sync)
    has_nan, has_posinf, inf_differs, num_bad = torch.stack([
        torch.isnan(got).any(), torch.isposinf(got).any(), (ref_inf ^ got_inf).any(), bad.sum()]).tolist()
    if has_nan:
        h, t = got.isnan().nonzero()[0].tolist()
        return Check("lse", False, f"NaN LSE at {_describe_row(locate, t, h)}"), [failing_row(locate, t, h, "lse")]
    if has_posinf:
        h, t = torch.isposinf(got).nonzero()[0].tolist()
        return (Check("lse", False, f"+inf LSE (empty rows must be -inf) at {_describe_row(locate, t, h)}"),
                [failing_row(locate, t, h, "lse", error=float("inf"))])
    if inf_differs:
        h, t = (ref_inf ^ got_inf).nonzero()[0].tolist()
        return (Check("lse", False, f"-inf pattern differs (reference {float(ref[h, t])}, got {float(got[h, t])}) "
                                    f"at {_describe_row(locate, t, h)}"),
                [failing_row(locate, t, h, "lse", error=float("inf"))])
    if num_bad:
        ratio = torch.where(fin, diff / budget, torch.zeros_like(diff))
        h, t = divmod(int(torch.argmax(ratio)), ratio.shape[1])
        order = torch.argsort(ratio.flatten(), descending=True)[: min(WORST_ROWS, int(num_bad))].tolist()
        rows = [failing_row(locate, i % ratio.shape[1], i // ratio.shape[1], "lse", float(diff.flatten()[i]),
                            float(budget.flatten()[i]), float(ratio.flatten()[i])) for i in order]
        return (Check("lse", False, f"{int(num_bad)} LSE rows over budget; worst {_describe_row(locate, t, h)}: "
                                    f"got {float(got[h, t]):.6f}, reference {float(ref[h, t]):.6f}"), rows)
    return Check("lse", True), []


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern view so that NaN == NaN and -0 != +0 (exact comparison)."""
    size = t.element_size()
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size])


def compare_cache(name: str, before: torch.Tensor, after: torch.Tensor, slot_mapping: torch.Tensor,
                  expected_slots: torch.Tensor) -> Check:
    """Cache writes are exact: the new tokens' slots hold exactly the expected bytes and
    every other slot is untouched. Compared on ``before``'s device."""
    dev = before.device
    after = after.detach().to(dev)
    if after.dtype != before.dtype or after.shape != before.shape:
        return Check(f"{name} write", False, f"cache changed dtype/shape to {after.dtype} {tuple(after.shape)}")
    tail = tuple(before.shape[2:])
    flat_after = bits(after).reshape(-1, *tail)
    flat_before = bits(before).reshape(-1, *tail)
    slots = slot_mapping.to(dev).long()
    got = flat_after[slots]
    want = bits(expected_slots.to(dev))
    if got.shape != want.shape or got.dtype != want.dtype:
        return Check(f"{name} write", False, f"expected slot values {want.dtype} {tuple(want.shape)} do not match "
                                             f"the cache's {got.dtype} {tuple(got.shape)}")
    wrong = (got != want).flatten(1).any(dim=1)  # [new tokens]
    changed = (flat_after != flat_before).flatten(1).any(dim=1)  # [slots]
    changed[slots] = False  # the new tokens' slots are judged by ``wrong``
    any_wrong, any_changed = torch.stack([wrong.any(), changed.any()]).tolist()  # one host sync
    if any_wrong:
        mism = wrong.nonzero().flatten()
        t = int(mism[0])
        bs = before.shape[1]
        slot = int(slots[t])
        return Check(f"{name} write", False,
                     f"{len(mism)} new tokens written wrongly; first: token row {t} -> slot {slot} "
                     f"(block {slot // bs}, offset {slot % bs})")
    if any_changed:
        slot = int(changed.nonzero().flatten()[0])
        bs = before.shape[1]
        return Check(f"{name} write", False,
                     f"slot {slot} (block {slot // bs}, offset {slot % bs}) changed but no new token maps to it")
    return Check(f"{name} write", True)
