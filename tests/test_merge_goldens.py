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
