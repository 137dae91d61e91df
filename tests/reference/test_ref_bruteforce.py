"""The vectorised reference against an independent scalar-loop implementation (tiny shapes).

The loop version below is written from the equations in reference/mha.py's docstring with
plain Python floats: it skips invisible keys instead of masking them, applies the sink in the
denominator directly, and shares no code with the reference.
"""

import math

import pytest
import torch

from reference.mha import attention, attention_streaming

pytestmark = pytest.mark.smoke


def brute_force(q, k, v, *, scale, causal=True, sliding_window=None, softcap=None, alibi_slopes=None,
                sinks=None, q_offset=None):
    sq, hq, d = q.shape
    sk, hkv, dv = v.shape
    group = hq // hkv
    out = [[[0.0] * dv for _ in range(hq)] for _ in range(sq)]
    lse = [[-math.inf] * sq for _ in range(hq)]
    for h in range(hq):
        kvh = h // group
        for i in range(sq):
            qp = (sk - sq + i) if q_offset is None else q_offset + i
            logits = {}
            for j in range(sk):
                if causal and j > qp:
                    continue
                if sliding_window is not None and qp - j >= sliding_window:
                    continue
                s = scale * sum(float(q[i, h, c]) * float(k[j, kvh, c]) for c in range(d))
                if softcap is not None:
                    s = softcap * math.tanh(s / softcap)
                if alibi_slopes is not None:
                    s -= float(alibi_slopes[h]) * abs(qp - j)
                logits[j] = s
            weights = {j: math.exp(s) for j, s in logits.items()}
            denom = sum(weights.values()) + (math.exp(float(sinks[h])) if sinks is not None else 0.0)
            if weights:
                lse[h][i] = math.log(sum(weights.values()))
                for c in range(dv):
                    out[i][h][c] = sum(w * float(v[j, kvh, c]) for j, w in weights.items()) / denom
    return torch.tensor(out, dtype=torch.float64), torch.tensor(lse, dtype=torch.float64)


def _inputs(sq, sk, hq, hkv, d=3, dv=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sq, hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(sk, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(sk, hkv, dv, generator=g, dtype=torch.float64)
    slopes = torch.rand(hq, generator=g).float()  # float32 like the batch
    sinks = torch.randn(hq, generator=g).float()
    return q, k, v, slopes, sinks


KNOBS = {
    "plain": {},
    "non_causal": {"causal": False},
    "window3": {"sliding_window": 3},
    "window1": {"sliding_window": 1},
    "non_causal_window2": {"causal": False, "sliding_window": 2},
    "softcap": {"softcap": 1.5},
    "alibi": {"alibi": True},
    "sinks": {"sinks": True},
    "q_offset": {"q_offset": 1},
    "q_offset_negative": {"q_offset": -2},
    "everything": {"sliding_window": 4, "softcap": 2.0, "alibi": True, "sinks": True},
}
SHAPES = [(3, 5, 4, 2), (4, 4, 3, 1), (6, 3, 2, 2)]  # (Sq, Sk, Hq, Hkv); the last has Sq > Sk


def _call(fn, q, k, v, slopes, sinks, knobs, **extra):
    kw = dict(knobs)
    kw["alibi_slopes"] = slopes if kw.pop("alibi", False) else None
    kw["sinks"] = sinks if kw.pop("sinks", False) else None
    return fn(q, k, v, scale=0.7, **kw, **extra)


def _assert_same(out, lse, ref_out, ref_lse):
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "empty rows differ"
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(KNOBS))
def test_attention_matches_scalar_loops(name, shape):
    q, k, v, slopes, sinks = _inputs(*shape)
    ref = _call(brute_force, q, k, v, slopes, sinks, KNOBS[name])
    _assert_same(*_call(attention, q, k, v, slopes, sinks, KNOBS[name]), *ref)
    _assert_same(*_call(attention_streaming, q, k, v, slopes, sinks, KNOBS[name], block_n=2, block_m=2), *ref)


def test_brute_force_case_has_empty_rows():
    """Sq > Sk with bottom-right causal leaves early queries without keys: the grid covers them."""
    q, k, v, slopes, sinks = _inputs(6, 3, 2, 2)
    _, lse = brute_force(q, k, v, scale=0.7)
    assert torch.isinf(lse).any() and torch.isfinite(lse).any()


def test_top_left_causal_is_caught():
    """Teeth: a top-left causal mask (SDPA's is_causal) differs from the bottom-right oracle."""
    q, k, v, _, _ = _inputs(3, 5, 2, 2)
    ref_out, _ = brute_force(q, k, v, scale=0.7)
    top_left, _ = attention(q, k, v, scale=0.7, q_offset=0)
    assert (top_left - ref_out).abs().max() > 1e-3


def test_sink_in_lse_is_caught():
    """Teeth: the returned LSE must exclude the sink; including it changes it measurably."""
    q, k, v, _, sinks = _inputs(3, 5, 2, 2)
    _, lse = attention(q, k, v, scale=0.7, sinks=sinks.double())
    _, ref_lse = brute_force(q, k, v, scale=0.7, sinks=sinks.double())
    with_sink = torch.logaddexp(ref_lse, sinks.double()[:, None])
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-12)
    assert (with_sink - lse).abs().min() > 1e-3
