"""Replay a bundle: the stored batch on any registered backend, judged by the stored expected
values and budgets through the one case runner (``attncheck.harness.run_backend``)."""

from __future__ import annotations

from attncheck import harness
from attncheck.debug import bundle as bundle_mod
from attncheck.debug import rows


def error_type(verdict) -> str:
    return verdict.reason.split(":", 1)[0] if verdict.status == "error" else ""


def maps_of(case, tensors: dict, verdict) -> rows.RowMaps:
    return rows.row_maps(case, tensors, bundle_mod.actual_of(verdict), error=error_type(verdict))


def replay(b: bundle_mod.Bundle, backend, device="cpu"):
    """Run the bundle's batch on ``backend`` (a name or a backend object); returns the verdict
    (with artifacts, so it can be saved as a bundle again)."""
    return harness.run_backend(backend, b.case, device=device, tensors=b.tensors, keep_artifacts=True)


def recorded_maps(b: bundle_mod.Bundle) -> rows.RowMaps:
    err = b.verdict.get("reason", "").split(":", 1)[0] if b.verdict.get("status") == "error" else ""
    return rows.row_maps(b.case, b.tensors, b.actual, error=err)


def compare_rows(b: bundle_mod.Bundle, verdict) -> tuple[bool, str]:
    """Does the replay fail the same rows (and checks) as the bundle recorded?"""
    before = recorded_maps(b)
    after = maps_of(b.case, b.tensors, verdict)
    rows_before, rows_after = set(before.failing_rows()), set(after.failing_rows())
    checks_before, checks_after = before.failing_checks(), after.failing_checks()
    if rows_before == rows_after and checks_before == checks_after:
        what = f"{len(rows_after)} failing rows" if rows_after else "no failing rows"
        return True, f"same as the bundle: {what}, checks failing: {', '.join(sorted(checks_after)) or 'none'}"
    gone, new = rows_before - rows_after, rows_after - rows_before
    if not checks_after:
        return False, f"passes now: the bundle's {len(rows_before)} failing rows are within budget"
    return False, (f"differs from the bundle: checks {sorted(checks_before)} -> {sorted(checks_after)}; "
                   f"{len(gone)} recorded failing rows now pass, {len(new)} rows fail that did not")
