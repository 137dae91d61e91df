"""The low-precision "pt" path: close to float64 but not equal in bf16/fp16; exact-ish in float64."""

import pytest
import torch

from reference.lowp import attention_lowp, paged_attention_lowp
from reference.mha import attention, paged_attention
from reference.paged import slot_mapping_for, write_kv

pytestmark = pytest.mark.smoke

KNOBS = {
    "plain": {},
    "window": {"sliding_window": 9},
    "softcap": {"softcap": 5.0},
    "alibi": {"alibi_slopes": torch.tensor([0.02, 0.05, 0.1, 0.2])},
    "sinks": {"sinks": torch.tensor([0.5, -1.0, 2.0, 0.0])},
    "non_causal": {"causal": False},
}


def _inputs(sq=12, sk=40, hq=4, hkv=2, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(sq, hq, d, generator=g, dtype=torch.float64),
            torch.randn(sk, hkv, d, generator=g, dtype=torch.float64),
            torch.randn(sk, hkv, d, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("name", list(KNOBS))
@pytest.mark.parametrize("dtype,upper", [(torch.bfloat16, 0.1), (torch.float16, 0.02)])
def test_lowp_is_close_but_not_equal(dtype, upper, name):
    q, k, v = _inputs()
    ref_out, ref_lse = attention(q, k, v, scale=32 ** -0.5, **KNOBS[name])
    out, lse = attention_lowp(q.to(dtype), k.to(dtype), v.to(dtype), scale=32 ** -0.5, **KNOBS[name])
    assert out.dtype == dtype and lse.dtype == torch.float32
    err = (out.double() - ref_out).abs().max().item()
    assert 0 < err < upper, err
    lse_err = (lse.double() - ref_lse).abs().max().item()
    assert 0 < lse_err < 10 * upper, lse_err


@pytest.mark.parametrize("name", list(KNOBS))
def test_lowp_float64_matches_reference(name):
    q, k, v = _inputs()
    ref = attention(q, k, v, scale=0.3, **KNOBS[name])
    out, lse = attention_lowp(q, k, v, scale=0.3, **KNOBS[name])
    torch.testing.assert_close(out, ref[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, ref[1], rtol=0, atol=1e-12)


def test_lowp_error_grows_with_lower_precision():
    """bf16 (8-bit mantissa) must err more than fp16 (11-bit), which errs more than float32."""
    q, k, v = _inputs(seed=1)
    ref, _ = attention(q, k, v, scale=0.2)
    errs = [(attention_lowp(q.to(t), k.to(t), v.to(t), scale=0.2)[0].double() - ref).abs().max().item()
            for t in (torch.bfloat16, torch.float16, torch.float32)]
    assert errs[0] > errs[1] > errs[2] > 0


def test_lowp_empty_rows_and_no_keys():
    q, k, v = _inputs(sq=6, sk=3)  # Sq > Sk: the first three rows see nothing
    for sinks in (None, KNOBS["sinks"]["sinks"]):
        out, lse = attention_lowp(q.bfloat16(), k.bfloat16(), v.bfloat16(), scale=0.2, sinks=sinks)
        assert not torch.isnan(out).any() and (out[:3] == 0).all() and (lse[:, :3] == float("-inf")).all()
    out, lse = attention_lowp(q.half(), k[:0].half(), v[:0].half(), scale=0.2)
    assert (out == 0).all() and (lse == float("-inf")).all()


def _paged(cache_dtype, k_scale=1.0, v_scale=1.0, seed=2):
    g = torch.Generator().manual_seed(seed)
    seq_lens, query_lens, bs = [13, 5, 20], [1, 5, 7], 4
    table = torch.randperm(16, generator=g)[:15].view(3, 5).to(torch.int32)  # 5 blocks hold 20 keys
    kc = torch.full((16, bs, 2, 16), float("nan")).to(cache_dtype)
    vc = kc.clone()
    keys = torch.randn(sum(seq_lens), 2, 16, generator=g, dtype=torch.float64)
    values = torch.randn(sum(seq_lens), 2, 16, generator=g, dtype=torch.float64)
    write_kv(keys, values, kc, vc, slot_mapping_for(table, seq_lens, seq_lens, bs), k_scale=k_scale,
             v_scale=v_scale)
    query = torch.randn(sum(query_lens), 4, 16, generator=g, dtype=torch.float64)
    qsl = torch.tensor([0, 1, 6, 13], dtype=torch.int32)
    return query, kc, vc, table, qsl, torch.tensor(seq_lens, dtype=torch.int32)


@pytest.mark.parametrize("cache_dtype,k_scale", [(torch.bfloat16, 1.0), (torch.float8_e4m3fn, 0.5),
                                                 (torch.float8_e4m3fnuz, 0.25)])
def test_paged_lowp_tracks_paged_reference(cache_dtype, k_scale):
    query, kc, vc, table, qsl, sl = _paged(cache_dtype, k_scale, 0.5)
    ref_out, ref_lse = paged_attention(query, kc, vc, table, qsl, sl, scale=0.25, k_scale=k_scale, v_scale=0.5,
                                       sinks=KNOBS["sinks"]["sinks"])
    out, lse = paged_attention_lowp(query.bfloat16(), kc, vc, table, qsl, sl, scale=0.25, k_scale=k_scale,
                                    v_scale=0.5, sinks=KNOBS["sinks"]["sinks"], dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and not torch.isnan(out).any()
    err = (out.double() - ref_out).abs().max().item()
    assert 0 < err < 0.1, err
    # float64 model dtype: the pt path collapses onto the reference (fp8 dequantised identically)
    out64, lse64 = paged_attention_lowp(query, kc, vc, table, qsl, sl, scale=0.25, k_scale=k_scale, v_scale=0.5,
                                        sinks=KNOBS["sinks"]["sinks"], dtype=torch.float64)
    torch.testing.assert_close(out64, ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse64, ref_lse, rtol=0, atol=1e-12)


def test_paged_lowp_query_chunks_do_not_change_the_math():
    query, kc, vc, table, qsl, sl = _paged(torch.float32)
    whole = paged_attention_lowp(query.float(), kc, vc, table, qsl, sl, scale=0.25, sliding_window=6)
    chunked = paged_attention_lowp(query.float(), kc, vc, table, qsl, sl, scale=0.25, sliding_window=6, block_m=2)
    torch.testing.assert_close(chunked[0], whole[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(chunked[1], whole[1], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="block_m"):
        paged_attention_lowp(query.float(), kc, vc, table, qsl, sl, scale=0.25, block_m=0)
