"""The merge goldens (every +-inf LSE pattern) against the project's Triton merge kernel."""

import os

import pytest
import torch

from attncheck import cases, golden
from attncheck.rule import compare_output

pytestmark = pytest.mark.smoke


@pytest.fixture(scope="module")
def merge_kernel(device):
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton merge kernel needs a GPU or TRITON_INTERPRET=1")
    from impl.triton import compat
    compat.install()
    from impl.triton import merge_attn_states as m
    return m.merge_attn_states


@pytest.mark.parametrize("case", [c.name for c in cases.MERGE_CASES])
def test_triton_merge_matches_golden(case, merge_kernel, device):
    c = cases.get_case(case)
    t = {k: v.to(device) for k, v in golden.load(c).items()}
    out = torch.empty_like(t["prefix_output"])
    lse = torch.empty_like(t["prefix_lse"])
    merge_kernel(out, t["prefix_output"], t["prefix_lse"], t["suffix_output"], t["suffix_lse"], output_lse=lse)
    expected = {k: v.cpu() for k, v in t.items() if k.startswith(("expected.", "budget."))}
    r = compare_output(out.cpu(), expected, k_row=2.0, k_mean=1.5, model_dtype=c.torch_dtype, lse=lse.cpu())
    assert r.passed, r.summary()


def _torch_merge(po, pl, so, sl, exp_ulps):
    """A correct float32 merge the way kernels write it: exp2 with log2(e) folded into the
    argument, an exp off by up to ``exp_ulps`` ulps (tests.panel.members.inexact)."""
    from tests.panel.members import LOG2E, inexact
    pl, sl = (torch.where(x == float("inf"), torch.full_like(x, float("-inf")), x) for x in (pl, sl))
    m = torch.maximum(pl, sl)
    empty = torch.isneginf(m)
    m0 = torch.where(empty, torch.zeros_like(m), m)
    wp, ws = (inexact(torch.exp2(a), a, exp_ulps) for a in ((pl - m0) * LOG2E, (sl - m0) * LOG2E))
    tot = torch.where(empty, torch.ones_like(wp), wp + ws)
    out = po.float() * (wp / tot).T[..., None] + so.float() * (ws / tot).T[..., None]
    return out.to(po.dtype), torch.where(empty, torch.full_like(m, float("-inf")), torch.log(tot) + m0)


@pytest.mark.parametrize("exp_ulps", [0, 20])
@pytest.mark.parametrize("case", [c.name for c in cases.MERGE_CASES])
def test_fast_math_merge_passes_and_needs_the_float32_step(case, exp_ulps):
    """Every merge golden accepts a correct fp32-arithmetic merge with exp2 and a 20-ulp exp;
    on the fp32 cases it is the budget's ``out_step`` term that accepts it (without it the
    same output fails at ratios of 3 to 7)."""
    c = cases.get_case(case)
    t = golden.load(c)
    expected = {k: v for k, v in t.items() if k.startswith(("expected.", "budget."))}
    out, lse = _torch_merge(t["prefix_output"], t["prefix_lse"], t["suffix_output"], t["suffix_lse"], exp_ulps)
    r = compare_output(out, expected, k_row=2.0, k_mean=1.5, model_dtype=c.torch_dtype, lse=lse)
    assert r.passed, r.summary()
    if c.dtype == "fp32" and exp_ulps:
        without = {k: v for k, v in expected.items() if not k.startswith("budget.out_step")}
        r = compare_output(out, without, k_row=2.0, k_mean=1.5, model_dtype=c.torch_dtype, lse=lse)
        assert not r.passed and r.worst_ratio > 1.5, r.summary()
