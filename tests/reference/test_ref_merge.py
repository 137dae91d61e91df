"""merge_attn_states: any split of the keys merges back to the whole; every +-inf pattern is safe."""

import functools

import pytest
import torch

from reference.merge import merge_attn_states
from reference.mha import attention

pytestmark = pytest.mark.smoke

INF = float("inf")


def _inputs(sq=6, sk=17, hq=4, hkv=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(sq, hq, d, generator=g, dtype=torch.float64),
            torch.randn(sk, hkv, d, generator=g, dtype=torch.float64),
            torch.randn(sk, hkv, d, generator=g, dtype=torch.float64))


def _part(q, k, v, lo, hi, **kw):
    """Attention of all queries over keys [lo, hi), positions kept absolute."""
    first_q = k.shape[0] - q.shape[0]
    return attention(q, k[lo:hi], v[lo:hi], q_offset=first_q - lo, **kw)


@pytest.mark.parametrize("cuts", [[5], [1], [16], [0], [17], [3, 9], [2, 4, 8, 12, 16]],
                         ids=lambda c: "cuts" + "_".join(map(str, c)))
@pytest.mark.parametrize("knobs", [{}, {"causal": False}, {"sliding_window": 4},
                                   {"softcap": 50.0, "alibi_slopes": torch.tensor([0.1, 0.2, 0.3, 0.4])}],
                         ids=["causal", "non_causal", "window4", "softcap_alibi"])
def test_merge_of_any_split_equals_whole(cuts, knobs):
    q, k, v = _inputs()
    whole_out, whole_lse = attention(q, k, v, scale=0.35, **knobs)
    bounds = [0] + cuts + [k.shape[0]]
    parts = [_part(q, k, v, lo, hi, scale=0.35, **knobs) for lo, hi in zip(bounds[:-1], bounds[1:])]
    out, lse = functools.reduce(lambda a, b: merge_attn_states(*a, *b), parts)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out, whole_out, rtol=0, atol=1e-13)
    assert torch.equal(torch.isinf(lse), torch.isinf(whole_lse))
    fin = torch.isfinite(whole_lse)
    torch.testing.assert_close(lse[fin], whole_lse[fin], rtol=0, atol=1e-13)


def test_window_split_has_empty_parts():
    """The window4 grid really merges -inf partials (some rows see nothing in the early part)."""
    q, k, v = _inputs()
    _, lse = _part(q, k, v, 0, 5, scale=0.35, sliding_window=4)
    assert torch.isinf(lse).all()


# (prefix lse, suffix lse, which side wins: "p", "s", "both" (finite mix), or "none")
PATTERNS = [
    (0.3, -1.2, "both"),
    (INF, 0.5, "s"),
    (0.5, INF, "p"),
    (-INF, 0.5, "s"),
    (0.5, -INF, "p"),
    (-INF, -INF, "none"),
    (INF, INF, "none"),
    (INF, -INF, "none"),
    (-INF, INF, "none"),
    (800.0, -800.0, "p"),  # huge gap: exp underflows cleanly, no overflow
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_inf_pattern(dtype):
    t = len(PATTERNS)
    g = torch.Generator().manual_seed(1)
    p_out = torch.randn(t, 1, 4, generator=g, dtype=dtype)
    s_out = torch.randn(t, 1, 4, generator=g, dtype=dtype)
    p_lse = torch.tensor([[p for p, _, _ in PATTERNS]], dtype=dtype)
    s_lse = torch.tensor([[s for _, s, _ in PATTERNS]], dtype=dtype)
    # an empty side may carry garbage (a kernel's uninitialised output): it must not leak
    for i, (p, s, _) in enumerate(PATTERNS):
        if abs(p) == INF:
            p_out[i] = float("nan")
        if abs(s) == INF:
            s_out[i] = float("nan")
    out, lse = merge_attn_states(p_out, p_lse, s_out, s_lse)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    for i, (p, s, side) in enumerate(PATTERNS):
        if side == "p":
            assert torch.equal(out[i], p_out[i]) and lse[0, i] == p
        elif side == "s":
            assert torch.equal(out[i], s_out[i]) and lse[0, i] == s
        elif side == "none":
            assert (out[i] == 0).all() and lse[0, i] == -INF
        else:
            w_p = 1 / (1 + torch.exp(torch.tensor(s - p, dtype=torch.float64)))
            expect = p_out[i].double() * w_p + s_out[i].double() * (1 - w_p)
            torch.testing.assert_close(out[i].double(), expect, rtol=0, atol=1e-6)
            torch.testing.assert_close(lse[0, i].double(), torch.logaddexp(torch.tensor(p), torch.tensor(s)).double(),
                                       rtol=0, atol=1e-6)


def _naive_merge(p_out, p_lse, s_out, s_lse):
    """The bug class (ROCm Triton kernel without the both -inf guard)."""
    m = torch.maximum(p_lse, s_lse)
    w_p, w_s = torch.exp(p_lse - m), torch.exp(s_lse - m)
    out = (p_out * (w_p / (w_p + w_s)).T[..., None] + s_out * (w_s / (w_p + w_s)).T[..., None])
    return out, torch.log(w_p + w_s) + m


def test_naive_merge_fails_the_inf_check():
    """Teeth: the NaN assertion above catches a merge without the guard."""
    out, lse = _naive_merge(torch.zeros(1, 1, 2), torch.tensor([[-INF]]), torch.zeros(1, 1, 2),
                            torch.tensor([[-INF]]))
    assert torch.isnan(out).any() and torch.isnan(lse).any()


def test_mixed_dtypes_keep_output_and_lse_dtypes():
    out, lse = merge_attn_states(torch.ones(2, 3, 4, dtype=torch.bfloat16), torch.zeros(3, 2),
                                 torch.zeros(2, 3, 4, dtype=torch.bfloat16), torch.zeros(3, 2))
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert (out == 0.5).all() and torch.allclose(lse, torch.full((3, 2), 0.6931471805599453))


@pytest.mark.parametrize("args,message", [
    ((torch.zeros(2, 3, 4), torch.zeros(2, 3), torch.zeros(2, 3, 4), torch.zeros(3, 2)), "prefix_lse"),
    ((torch.zeros(2, 3, 4), torch.zeros(3, 2), torch.zeros(2, 3, 4), torch.zeros(3)), "suffix_lse"),
    ((torch.zeros(2, 3, 4), torch.zeros(3, 2), torch.zeros(2, 3, 5), torch.zeros(3, 2)), "suffix_out"),
])
def test_bad_shapes(args, message):
    with pytest.raises(ValueError, match=message):
        merge_attn_states(*args)
