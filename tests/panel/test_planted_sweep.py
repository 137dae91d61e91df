"""Budgets that accept the whole panel must still reject every planted bug (issue 9 item 2:
"then check that every planted bug already in the suite still fails").

For each bug class of tests/planted.py the sweep walks the stored MHA cases (smoke, then full)
and looks for a case that *separates*: the planted backend fails it while every MHA panel
member passes it. One such case per bug proves that widening budgets to admit every
legitimate op order did not admit that bug. The other planted bugs of the suite (backend
twins in tests/backends/*_planted.py, kernel-source mutants of tests/mutants.py in
tests/kernels/test_paged_decode.py and tests/backends/test_rocm_attn_planted.py, the panel's
own twins in test_panel_power.py) assert their failure on fixed stored cases in their own tests.
Planted backend and panel run on the chosen device (--device cpu or cuda).
"""

import pytest

from attncheck import harness
from tests.panel.members import MHA_MEMBERS
from tests.planted import BUGS, PlantedBackend

pytestmark = pytest.mark.smoke


def _separating_case(backend, device: str):
    """The first stored case the backend fails and every panel member passes, and what was seen."""
    seen = []
    for tier in ("smoke", "full"):
        for case in harness.list_cases(tier=tier, kind="MHA"):
            tensors = harness.golden_tensors(case, device)
            planted = harness.run_backend(backend, case, device=device, tensors=tensors)
            assert planted.status != "error", f"{backend.name} on {case}: {planted.reason}"
            if planted.status != "fail":
                continue
            failing = [m.name for m in MHA_MEMBERS
                       if harness.run_backend(m, case, device=device, tensors=tensors).status != "pass"]
            if not failing:
                return case, planted, seen
            seen.append(f"{case} (bug fails, but so do {', '.join(failing)})")
    return None, None, seen


@pytest.mark.parametrize("bug", BUGS)
def test_planted_bug_fails_a_case_every_panel_member_passes(bug, device):
    case, verdict, seen = _separating_case(PlantedBackend(bug), device)
    assert case is not None, (f"{bug}: no stored MHA case fails it while the whole panel passes; "
                              f"cases it fails: {seen or 'none'}")
    assert verdict.reason, verdict.report  # a fail always says why


def test_sweep_finds_no_separating_case_for_a_correct_backend(device):
    """The sweep can fail: the planted backend without a bug passes every stored case."""
    case, _, seen = _separating_case(PlantedBackend(None), device)
    assert case is None and not seen, (case, seen)
