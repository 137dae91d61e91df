"""MLA budgets hold a correctly rounded kernel: float64 attention over the projections written in
the model dtype (ql and o_lat, or the up-projected K and V: what every implementation attends
over), its output rounded once to the model dtype. It must pass on every stored MLA case down
either path, and on the sweep configuration where the budgets of the previous model (pt variants
against the unrounded pipelines) failed two correct kernels, and fail it too
(mla_case.expected_and_budgets)."""

from __future__ import annotations

import pytest
import torch

from attncheck import cases, golden, mla_case, sweep
from attncheck.draws import CounterDraws
from attncheck.rule import compare_output
from reference import emulated as em
from reference import fp
from reference import mla as ref_mla

pytestmark = pytest.mark.smoke


def _correctly_rounded(case, t: dict, path: str) -> torch.Tensor:
    """The ideal kernel's output on ``case`` down ``path`` (prefill: new tokens from the raw inputs)."""
    cache = t["kv_cache"].clone()
    ref_mla.write_latent(t["kv_c"], t["k_pe"], cache, t["slot_mapping"], case.kv_scale)
    raw = dict(new_kv_c=t["kv_c"], new_k_pe=t["k_pe"]) if path == "upprojected" else {}
    out, _ = em.paged_mla(t["q_nope"], t["q_pe"], cache, t["w_uk"], t["w_uv"], t["block_table"],
                          t["query_start_loc"], t["seq_lens"], scale=case.softmax_scale, kv_scale=case.kv_scale,
                          path=path, projections=case.torch_dtype, engine=em.FAST, **raw)
    return fp.round_to(out, fp.format_of(case.torch_dtype)).to(case.torch_dtype)


def _worst_ratio(case, tensors: dict, path: str) -> float:
    expected = {k: v.cpu() for k, v in tensors.items() if k.startswith(("expected.", "budget."))}  # as the harness
    f = mla_case.rule_factors(case)
    result = compare_output(_correctly_rounded(case, tensors, path), expected, k_row=f["k_row"], k_mean=f["k_mean"],
                            model_dtype=case.torch_dtype)
    return result.worst_ratio


STORED = [c for c in cases.select_cases(kind="MLA") if c.tier in cases.STORED_TIERS and c.kv_cache_dtype == "auto"]


@pytest.mark.parametrize("path", ["absorbed", "upprojected"])
@pytest.mark.parametrize("case", STORED, ids=lambda c: c.name)
def test_a_correctly_rounded_kernel_passes_every_stored_mla_case(case, path):
    assert _worst_ratio(case, golden.load(case), path) <= 1.0


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_the_sweep_row_the_unrounded_pipelines_failed(device, monkeypatch):
    """sweep:0:143 (large sizes, 3 shape classes; fp16, YaRN): on the H200, TRITON_MLA and
    ROCM_AITER_MLA failed one prefill row of it under the previous budgets, and so does the
    correctly rounded kernel (about 75 s of float64 on the CPU)."""
    case = sweep.case_from_name("sweep:0:143", sweep.SIZES["large"], shapes=3)
    inputs = {k: v.to(device) for k, v in mla_case.build_inputs(case, CounterDraws(case.seed, device)).items()}

    def budgets() -> dict:
        return mla_case.expected_and_budgets(case, inputs, compute_device=device, engine=em.FAST)

    now = budgets()
    unrounded = em.paged_mla
    with monkeypatch.context() as m:  # the previous model: every pipeline's projections unrounded
        m.setattr(em, "paged_mla", lambda *a, projections=None, **k: unrounded(*a, **k))
        before = budgets()
    for expected, passes in ((now, True), (before, False)):
        ratio = _worst_ratio(case, {k: v.to(device) for k, v in dict(inputs, **expected).items()}, "upprojected")
        assert (ratio <= 1.0) is passes, ratio
