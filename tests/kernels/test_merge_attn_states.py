"""impl.triton.merge_attn_states against reference.merge over every +-inf LSE pattern."""

import itertools

import pytest
import torch

from impl.triton import merge_attn_states as mas
from reference import merge as ref

pytestmark = pytest.mark.smoke
INF = float("inf")
# one ULP-ish relative step of each output dtype (the kernel and the reference both round once)
RTOL = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7, torch.float32: 1e-6}


def _case(device, dtype, D, H=3, seed=0):
    """Rows covering all 9 (prefix, suffix) combinations of {finite, +inf, -inf}, repeated."""
    g = torch.Generator().manual_seed(seed)
    kinds = list(itertools.product(["fin", "+inf", "-inf"], repeat=2))
    T = 2 * len(kinds)
    p_lse = torch.randn(H, T, generator=g) * 3
    s_lse = torch.randn(H, T, generator=g) * 3
    for t in range(T):
        kp, ks = kinds[t % len(kinds)]
        for lse, k in ((p_lse, kp), (s_lse, ks)):
            if k != "fin":
                lse[:, t] = INF if k == "+inf" else -INF
    p_out = torch.randn(T, H, D, generator=g).to(dtype)
    s_out = torch.randn(T, H, D, generator=g).to(dtype)
    # An empty side's output is garbage (NaN): it must not leak through 0 * NaN.
    p_out[(p_lse.T.abs() == INF)] = float("nan")
    s_out[(s_lse.T.abs() == INF)] = float("nan")
    return [x.to(device) for x in (p_out, p_lse, s_out, s_lse)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D", [80, 64])
def test_merge_matches_reference_for_every_inf_pattern(dtype, D, device):
    p_out, p_lse, s_out, s_lse = _case(device, dtype, D)
    out = torch.full_like(p_out, 7.0)
    out_lse = torch.full_like(p_lse, 7.0)
    mas.merge_attn_states(out, p_out, p_lse, s_out, s_lse, out_lse)
    want, want_lse = ref.merge_attn_states(p_out.cpu(), p_lse.cpu(), s_out.cpu(), s_lse.cpu())
    out, out_lse = out.cpu(), out_lse.cpu()
    assert not torch.isnan(out).any() and not torch.isnan(out_lse).any()
    torch.testing.assert_close(out.float(), want.float(), rtol=RTOL[dtype], atol=1e-6)
    assert torch.equal(torch.isinf(out_lse), torch.isinf(want_lse))
    torch.testing.assert_close(out_lse, want_lse, rtol=1e-6, atol=1e-6)
    both_empty = (p_lse.cpu().abs() == INF) & (s_lse.cpu().abs() == INF)
    assert (out_lse[both_empty] == -INF).all()
    assert (out.transpose(0, 1)[both_empty] == 0).all()


def test_output_lse_is_optional_and_strided_output_works(device):
    p_out, p_lse, s_out, s_lse = _case(device, torch.bfloat16, 80, seed=1)
    T, H, D = p_out.shape
    big = torch.zeros(T, H, 96, dtype=torch.bfloat16, device=device)
    out = big[:, :, :D]  # padded head stride, as vLLM allows
    mas.merge_attn_states(out, p_out, p_lse, s_out, s_lse)
    want, _ = ref.merge_attn_states(p_out.cpu(), p_lse.cpu(), s_out.cpu(), s_lse.cpu())
    torch.testing.assert_close(out.cpu().float(), want.float(), rtol=2 ** -7, atol=1e-6)
    assert (big[:, :, D:] == 0).all()


def test_bad_inputs_name_the_argument(device):
    o = torch.zeros(4, 2, 8, device=device)
    lse = torch.zeros(2, 4, device=device)
    with pytest.raises(ValueError, match="suffix_output"):
        mas.merge_attn_states(o, o, lse, o[:3], lse)
    with pytest.raises(ValueError, match="prefix_lse"):
        mas.merge_attn_states(o, o, lse.T.contiguous(), o, lse)
    with pytest.raises(ValueError, match="output_lse"):
        mas.merge_attn_states(o, o, lse, o, lse, lse.double())
