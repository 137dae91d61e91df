"""attention_streaming == attention, GQA == repeated-head MHA, and bad inputs raise clearly."""

import pytest
import torch

from reference.mha import attention, attention_streaming

pytestmark = pytest.mark.smoke

KNOBS = {
    "causal": {},
    "non_causal": {"causal": False},
    "window5": {"sliding_window": 5},
    "window1": {"sliding_window": 1},
    "softcap50": {"softcap": 50.0},
    "alibi": {"alibi": True},
    "sinks": {"sinks": True},
    "all": {"sliding_window": 6, "softcap": 50.0, "alibi": True, "sinks": True},
    "non_causal_window_sinks": {"causal": False, "sliding_window": 4, "sinks": True},
}
HEADS = [(8, 2), (5, 1), (3, 3)]
LENGTHS = [(7, 7), (5, 19), (1, 23), (13, 6)]  # (Sq, Sk); 13 > 6 leaves empty causal rows


def _inputs(sq, sk, hq, hkv, d=16, dv=8, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sq, hq, d, generator=g, dtype=torch.float64) * 2
    k = torch.randn(sk, hkv, d, generator=g, dtype=torch.float64) * 2
    v = torch.randn(sk, hkv, dv, generator=g, dtype=torch.float64)
    slopes = torch.rand(hq, generator=g).float()
    sinks = (torch.randn(hq, generator=g) * 2).float()
    return [t.to(device) for t in (q, k, v, slopes, sinks)]


def _run(fn, q, k, v, slopes, sinks, knobs, **extra):
    kw = dict(knobs)
    kw["alibi_slopes"] = slopes if kw.pop("alibi", False) else None
    kw["sinks"] = sinks if kw.pop("sinks", False) else None
    return fn(q, k, v, scale=q.shape[-1] ** -0.5, **kw, **extra)


def _assert_same(a, b, atol=1e-12):
    (out, lse), (ref_out, ref_lse) = a, b
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    torch.testing.assert_close(out, ref_out, rtol=0, atol=atol)
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse[fin], rtol=0, atol=atol)


@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda s: f"q{s[0]}k{s[1]}")
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"h{h[0]}kv{h[1]}")
@pytest.mark.parametrize("name", list(KNOBS))
def test_streaming_equals_direct(name, heads, lengths):
    t = _inputs(*lengths, *heads)
    direct = _run(attention, *t, KNOBS[name])
    _assert_same(_run(attention_streaming, *t, KNOBS[name], block_n=4, block_m=3), direct)
    _assert_same(_run(attention_streaming, *t, KNOBS[name], block_n=1, block_m=1), direct)


def test_streaming_grid_has_empty_rows_and_skipped_blocks():
    """The Sq > Sk causal case really produces -inf rows, and a window skips whole key blocks."""
    q, k, v, slopes, sinks = _inputs(13, 6, 8, 2)
    out, lse = attention_streaming(q, k, v, scale=0.25, block_n=4, block_m=3)
    assert torch.isinf(lse).any() and (out[torch.isinf(lse).T] == 0).all()
    q, k, v, *_ = _inputs(5, 40, 8, 2)
    direct = attention(q, k, v, scale=0.25, sliding_window=3)
    _assert_same(attention_streaming(q, k, v, scale=0.25, sliding_window=3, block_n=4, block_m=2), direct)


def test_skipping_a_visible_key_block_is_caught(monkeypatch):
    """Teeth: a block-skip rule that drops visible key blocks must break streaming == direct."""
    import reference.mha as mha

    q, k, v, *_ = _inputs(4, 20, 4, 2)
    direct = attention(q, k, v, scale=1.0)
    monkeypatch.setattr(mha, "_may_see_block", lambda q_lo, q_hi, k_lo, k_hi, causal, window: k_hi < 16)
    bad = attention_streaming(q, k, v, scale=1.0, block_n=4)
    assert (bad[0] - direct[0]).abs().max() > 1e-3


@pytest.mark.parametrize("fn", [attention, attention_streaming])
def test_gqa_equals_repeat_interleave_mha(fn):
    q, k, v, slopes, sinks = _inputs(9, 12, 8, 2)
    kw = dict(scale=0.3, sliding_window=7, alibi_slopes=slopes, sinks=sinks, softcap=50.0)
    gqa = fn(q, k, v, **kw)
    mha_out = fn(q, k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1), **kw)
    _assert_same(gqa, mha_out, atol=1e-13)
    # teeth: the other head mapping (h % Hkv, i.e. tiled heads) gives a different answer
    tiled = fn(q, k.repeat(1, 4, 1), v.repeat(1, 4, 1), **kw)
    assert (tiled[0] - gqa[0]).abs().max() > 1e-3


def test_mqa_equals_repeat_interleave_mha():
    q, k, v, *_ = _inputs(6, 6, 5, 1)
    _assert_same(attention(q, k, v, scale=0.3), attention(q, k.expand(6, 5, 16), v.expand(6, 5, 8), scale=0.3),
                 atol=1e-13)


def test_empty_inputs_give_zero_and_neg_inf():
    q, k, v, *_ = _inputs(3, 0, 4, 2)
    for fn in (attention, attention_streaming):
        out, lse = fn(q, k, v, scale=1.0)
        assert out.shape == (3, 4, 8) and (out == 0).all() and (lse == float("-inf")).all()


def test_sink_only_row_is_zero():
    """A row whose keys are all masked but which has a sink: output 0, LSE -inf, no NaN."""
    q, k, v, _, sinks = _inputs(4, 2, 2, 1)
    for fn in (attention, attention_streaming):
        out, lse = fn(q, k, v, scale=1.0, sinks=sinks[:2])
        assert not torch.isnan(out).any()
        assert (out[:2] == 0).all() and (lse[:, :2] == float("-inf")).all()


BAD = [
    (lambda q, k, v: (q, k[..., :8], v), "k: head dim"),
    (lambda q, k, v: (q[:, :6], k[:, :4], v[:, :4]), "num kv heads 4 must divide num query heads 6"),
    (lambda q, k, v: (q, k, v[:3]), "v: expected"),
    (lambda q, k, v: (q, k.float(), v), "dtype"),
    (lambda q, k, v: (q[0], k, v), "q: expected"),
]


@pytest.mark.parametrize("fn", [attention, attention_streaming])
@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_shapes_raise_value_error_naming_argument(fn, case):
    make, message = BAD[case]
    q, k, v, *_ = _inputs(4, 6, 8, 8)
    with pytest.raises(ValueError, match=message):
        fn(*make(q, k, v), scale=1.0)


@pytest.mark.parametrize("kw,message", [
    ({"alibi_slopes": torch.zeros(3)}, "alibi_slopes"),
    ({"sinks": torch.zeros(8, 1)}, "sinks"),
    ({"sliding_window": 0}, "sliding_window"),
    ({"softcap": -1.0}, "softcap"),
    ({"block_n": 0}, "block_n"),
])
def test_bad_knobs_raise_value_error_naming_argument(kw, message):
    q, k, v, *_ = _inputs(4, 6, 8, 2)
    with pytest.raises(ValueError, match=message):
        attention_streaming(q, k, v, scale=1.0, **kw)
