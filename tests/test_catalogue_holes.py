"""Issue 9 item 3: bug classes no case could catch before. Each planted bug fails its new smoke
case; where an older case lacked the knob, the same bug passes it (that case was the hole).

* a scale other than 1/sqrt(head_size): ``mixed-h8x2-d64-bs16-bf16-scale0.3``;
* softcap: raw scores reach 2-3x the cap (``...-softcap50``), so skipping the cap on any row kind
  is far off; a cap of 2 (``...-softcap2``) gives masked keys capped to -2 (masking before the
  cap) real weight;
* fp8: new K/V are ordinary model-dtype values with planted rounding ties and saturating values,
  so the cache write's rounding and saturation are checked bit-exactly; a pipeline that attends
  the unquantised new tokens passes too (the pipeline term of the budget).
"""

import pytest
import torch

from attncheck import golden, harness
from attncheck.cases import get_case
from reference import paged as ref_paged
from tests.planted import PlantedBackend

pytestmark = pytest.mark.smoke

SOFTCAP50 = "mixed-h8x2-d64-bs16-bf16-softcap50"
SOFTCAP2 = "mixed-h8x2-d64-bs16-fp16-softcap2"
FP8_CASES = ["mixed-h8x2-d64-bs16-bf16-fp8e4m3fn", "mixed-h8x2-d64-bs16-fp16-fp8e4m3fnuz",
             "decode-h32x8-d128-bs16-bf16-fp8e4m3fn", "extend-h8x2-d64-bs16-bf16-fp8e4m3fn-chunks3"]


@pytest.mark.parametrize("case", ["mixed-h8x2-d64-bs16-bf16-scale0.3", SOFTCAP50, SOFTCAP2] + FP8_CASES)
@pytest.mark.parametrize("pipeline", ["cache", "new_unquantised"])
def test_correct_backend_passes_the_new_cases(case, pipeline):
    v = harness.run_backend(PlantedBackend(None, pipeline=pipeline), case)
    assert v.status == "pass", v.report


def test_ignored_scale_fails_only_where_the_scale_is_not_the_default():
    assert harness.run_backend(PlantedBackend("scale_ignored"), "mixed-h8x2-d64-bs16-bf16").status == "pass"
    v = harness.run_backend(PlantedBackend("scale_ignored"), "mixed-h8x2-d64-bs16-bf16-scale0.3")
    assert v.status == "fail" and v.worst_ratio > 10, v.report


@pytest.mark.parametrize("row_kind", ["decode", "extend", "prefill"])
def test_softcap_skipped_on_any_row_kind_fails_clearly(row_kind):
    v = harness.run_backend(PlantedBackend(f"softcap_skipped_on_{row_kind}"), SOFTCAP50)
    assert v.status == "fail" and v.worst_ratio > 5, f"ratio {v.worst_ratio:.2f}\n{v.report}"
    case = get_case(SOFTCAP50)
    kinds = {b: k for b, k in enumerate(("decode", "extend", "prefill"))}
    assert [kinds[r["sequence"]] for r in v.failing_rows] == [row_kind] * len(v.failing_rows)
    assert case.query_lens == (1, 12, 25) and case.seq_lens[2] == case.query_lens[2]  # decode, extend, prefill


def test_softcap_after_masking_fails_clearly():
    """At cap 2 with raw scores far past it, a masked key capped to -2 instead of -inf weighs
    e^-4 of a visible key's weight at most: far above budget. (At cap 50 the masked keys weigh
    e^-100 except in rows whose visible scores are all capped low; it fails there only near 1.)"""
    v = harness.run_backend(PlantedBackend("softcap_after_mask"), SOFTCAP2)
    assert v.status == "fail" and v.worst_ratio > 5, f"ratio {v.worst_ratio:.2f}\n{v.report}"


def _representable_twin(case):
    """The case's tensors with the new K/V replaced by their fp8 round trip (what every fp8 case
    held before): expected values and budgets recomputed for them."""
    t = dict(golden.load(case))
    cdt = t["key_cache"].dtype
    for name, scale in (("key", case.k_scale), ("value", case.v_scale)):
        t[name] = (ref_paged.quantize_fp8(t[name], scale, cdt).to(torch.float64) * scale).to(t[name].dtype)
    inputs = {k: v for k, v in t.items() if not k.startswith(("expected.", "budget."))}
    inputs.update(golden.case_module(case).expected_and_budgets(case, inputs))
    return inputs


@pytest.mark.parametrize("bug", ["fp8_round_toward_zero", "fp8_round_half_away", "fp8_no_saturation"])
@pytest.mark.parametrize("case_name", FP8_CASES[:2])
def test_fp8_cache_write_rounding_and_saturation_are_checked(bug, case_name):
    case = get_case(case_name)
    v = harness.run_backend(PlantedBackend(bug), case)
    failed = [c.name for c in v.checks if not c.passed]
    assert v.status == "fail" and "key_cache write" in failed and "value_cache write" in failed, v.report
    # with exactly representable new K/V (the old inputs) the wrong rounding is invisible
    twin = _representable_twin(case)
    assert harness.run_backend(PlantedBackend(bug), case, tensors=twin).status == "pass"


def test_the_budget_covers_both_fp8_pipelines_only_with_its_pipeline_term():
    """Attending the unquantised new tokens differs from the reference (new tokens read back from
    the cache) by the quantisation; without budget.pipeline_* that correct pipeline would fail."""
    case = get_case(FP8_CASES[0])
    t = dict(golden.load(case))
    assert float(t["budget.pipeline_row"].max()) > 0
    raw = PlantedBackend(None, pipeline="new_unquantised")
    assert harness.run_backend(raw, case, tensors=t).status == "pass"
    for name in ("budget.pipeline_row", "budget.pipeline_mean", "budget.lse_pipeline"):
        t[name] = torch.zeros_like(t[name])
    assert harness.run_backend(raw, case, tensors=t).status == "fail"
