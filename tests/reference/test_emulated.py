"""reference.emulated: with nothing rounded it is the float64 reference (equal to reference.mha,
reference.mla and reference.merge to float64 rounding); with a model dtype it is the pt path,
whose error is that of torch's own low-precision path; the LSE sensitivity bounds what rounding
the query or the scores does to the LSE."""

import math

import pytest
import torch

from reference import emulated as em
from reference import fp, merge, mha, mla

pytestmark = pytest.mark.smoke
F64 = torch.float64


def _qkv(seed, sq=9, sk=23, hq=4, hkv=2, d=32, dtype=torch.bfloat16, q_std=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(sq, hq, d, generator=g) * q_std).to(dtype)
    k, v = (torch.randn(sk, hkv, d, generator=g).to(dtype) for _ in range(2))
    return q, k, v


KNOBS = [
    dict(),
    dict(causal=False),
    dict(sliding_window=5),
    dict(softcap=3.0),
    dict(alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625])),
    dict(sinks=torch.tensor([0.3, -1.0, 2.0, 0.0])),
    dict(q_offset=30),  # every query sees every key, none sees itself at the diagonal
]


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: ",".join(k) or "plain")
def test_float64_pipeline_is_the_reference(knobs):
    q, k, v = _qkv(0)
    kw = dict(scale=0.2, **{k_: v_ for k_, v_ in knobs.items()})
    want_o, want_l = mha.attention(q.double(), k.double(), v.double(), **kw)
    for engine in (em.EXACT, em.FAST):
        got_o, got_l = em.attention(q, k, v, engine=engine, **kw)
        assert torch.allclose(got_o, want_o, rtol=0, atol=1e-13)
        fin = torch.isfinite(want_l)
        assert torch.equal(fin, torch.isfinite(got_l)) and torch.allclose(got_l[fin], want_l[fin], rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("prescale", em.PRESCALES)
def test_pt_values_are_model_values_and_err_like_torch_lowp(dtype, prescale):
    from reference import lowp

    q, k, v = _qkv(1, dtype=dtype)
    ref_o, ref_l = mha.attention(q.double(), k.double(), v.double(), scale=0.2)
    o, l = em.attention(q, k, v, scale=0.2, dtype=dtype, prescale=prescale)
    assert torch.equal(o, fp.round_to(o, fp.format_of(dtype)))  # outputs are model-dtype values
    assert torch.equal(l, fp.round_to(l, fp.FP32))  # the LSE is a float32
    t_o, _ = lowp.attention_lowp(q, k, v, scale=0.2, reorder=prescale == "k")
    ours, torchs = float((o - ref_o).abs().max()), float((t_o.double() - ref_o).abs().max())
    assert 0 < ours < 4 * torchs and torchs < 4 * ours, (ours, torchs)  # the same kind of path


def test_fp32_accumulation_is_modelled():
    q, k, v = _qkv(2, d=128, sk=300, dtype=torch.float32)
    ref_o, _ = mha.attention(q.double(), k.double(), v.double(), scale=0.1)
    o, _ = em.attention(q, k, v, scale=0.1, dtype=torch.float32)
    err = float((o - ref_o).abs().max())
    assert err > float(fp.round_to(ref_o, fp.FP32).sub(ref_o).abs().max())  # more than the final rounding


def test_mla_float64_paths_are_the_reference_and_merge_is_vllms():
    g = torch.Generator().manual_seed(3)
    n, L, R, P, V, sq, sk = 4, 32, 16, 16, 16, 5, 19
    qn, qp = torch.randn(sq, n, P, generator=g, dtype=F64), torch.randn(sq, n, R, generator=g, dtype=F64)
    kv_c, k_pe = torch.randn(sk, L, generator=g, dtype=F64), torch.randn(sk, R, generator=g, dtype=F64)
    w_uk, w_uv = torch.randn(L, n, P, generator=g, dtype=F64) / 6, torch.randn(L, n, V, generator=g, dtype=F64) / 6
    want = mla.absorbed_attention(qn, qp, kv_c, k_pe, w_uk, w_uv, scale=0.15)
    for path in em.MLA_PATHS.values():
        got = path(qn, qp, kv_c, k_pe, w_uk, w_uv, scale=0.15)
        assert torch.allclose(got[0], want[0], atol=1e-12) and torch.allclose(got[1], want[1], atol=1e-12)
    chunked = em.mla_chunked_prefill(qn, qp, kv_c[14:], k_pe[14:], kv_c[:14], k_pe[:14], w_uk, w_uv, scale=0.15,
                                     chunk_tokens=4)
    assert torch.allclose(chunked[0], want[0], atol=1e-12) and torch.allclose(chunked[1], want[1], atol=1e-12)
    po, so = torch.randn(6, 3, 8, generator=g, dtype=F64), torch.randn(6, 3, 8, generator=g, dtype=F64)
    pl, sl = torch.randn(3, 6, generator=g, dtype=F64), torch.randn(3, 6, generator=g, dtype=F64)
    pl[0, 0], sl[0, 0], pl[1, 1], sl[2, 2] = -math.inf, -math.inf, math.inf, -math.inf
    o, l = em.merge_states(po, pl, so, sl)
    wo, wl = merge.merge_attn_states(po, pl, so, sl)
    assert torch.allclose(o, wo, atol=1e-14) and torch.equal(torch.isinf(l), torch.isinf(wl))
    assert torch.allclose(l[torch.isfinite(l)], wl[torch.isfinite(wl)], atol=1e-14)


@pytest.mark.parametrize("knobs", [dict(), dict(softcap=3.0), dict(alibi_slopes=torch.tensor([0.5, 0.25, 0.1, 1.0]))],
                         ids=["plain", "softcap", "alibi"])
def test_lse_sensitivity_bounds_rounding_the_query_or_the_scores(knobs):
    """Round Q (times the scale, in bf16) or each score once: the LSE moves by at most u B_Q or
    u B_S (to first order; 1% slack for the second order)."""
    q, k, v = _qkv(4, q_std=3.0)
    scale, u = 0.2, fp.BF16.unit_roundoff
    qd, kd, vd = q.double(), k.double(), v.double()
    _, ref = mha.attention(qd, kd, vd, scale=scale, **knobs)
    bound = em.lse_sensitivity(qd, kd, scale=scale, **knobs)
    q_rounded = fp.round_to(qd * scale, fp.BF16)
    _, lse_q = mha.attention(q_rounded, kd, vd, scale=1.0, **knobs)
    assert ((lse_q - ref).abs() <= 1.01 * u * bound).all()
    # the scores rounded once (before softcap / ALiBi) and again after: mha with a rounding hook
    s = torch.einsum("mkgd,nkd->kgmn", qd.reshape(9, 2, 2, 32), kd).reshape(4, 9, 23) * scale
    s = fp.round_to(s, fp.BF16)
    if "softcap" in knobs:
        s = fp.round_to(knobs["softcap"] * torch.tanh(s / knobs["softcap"]), fp.BF16)
    if "alibi_slopes" in knobs:
        qpos = torch.arange(9) + 23 - 9
        s = fp.round_to(s - knobs["alibi_slopes"].double()[:, None, None] * (qpos[:, None] - torch.arange(23)[None]).abs(),
                        fp.BF16)
    mask = torch.arange(23)[None, :] <= (torch.arange(9) + 14)[:, None]
    lse_s = torch.logsumexp(s.masked_fill(~mask, -math.inf), dim=-1)
    assert ((lse_s - ref).abs() <= 2 * 1.01 * u * bound).all()  # two roundings when capped or biased
    assert float((lse_q - ref).abs().max()) > 0.02 * u * float(bound.max())  # the bound is not vacuous


def _partials(seed, n, t=48, h=2, d=16):
    """n chunk partials (out [T, H, D], lse [H, T]) of similar weight, with a few empty ones."""
    g = torch.Generator().manual_seed(seed)
    outs = [torch.randn(t, h, d, generator=g, dtype=F64) for _ in range(n)]
    lses = [torch.randn(h, t, generator=g, dtype=F64) * 0.5 + 3.0 for _ in range(n)]
    for i in range(2, n, 7):  # an empty partial (a row with fewer chunks) changes and rounds nothing
        outs[i][:5], lses[i][:, :5] = 0.0, -math.inf
    return outs, lses


def _chain_bound(outs, lses, fmt):
    state, bound = (outs[0], lses[0]), fmt.unit_roundoff * outs[0].abs()
    for o, l in zip(outs[1:-1], lses[1:-1]):
        bound = em.merge_chain_step(*state, o, l, bound, fmt)
        state = em.merge_states(*state, o, l)
    return em.merge_chain_step(*state, outs[-1], lses[-1], bound, fmt, last=True)


@pytest.mark.parametrize("n", [2, 5, 40])
def test_merge_chain_bound_holds_against_the_worst_rounding(n):
    """Perturb every written partial (each chunk's output, each merged state but the last) by
    u |x| in the direction that grows the error so far: the error reaches the bound (to second
    order; merge_step's float32 terms are the slack) and never passes it."""
    fmt = fp.BF16
    u = fmt.unit_roundoff
    outs, lses = _partials(n, n)
    exact = (outs[0], lses[0])
    for o, l in zip(outs[1:], lses[1:]):
        exact = em.merge_states(*exact, o, l)
    mid = [(outs[0], lses[0])]
    for o, l in zip(outs[1:-1], lses[1:-1]):
        mid.append(em.merge_states(*mid[-1], o, l))

    def push(x, direction):  # x moved by u |x| towards ``direction``
        return x + direction * u * x.abs()

    worst = push(outs[0], torch.ones_like(outs[0]))
    for i in range(1, n):
        direction = torch.where((worst - mid[i - 1][0]) >= 0, 1.0, -1.0)
        merged, _ = em.merge_states(worst, mid[i - 1][1], push(outs[i], direction), lses[i])
        written = torch.isfinite(lses[i]).transpose(0, 1)[..., None]  # merging an empty partial writes o_p again
        if i < n - 1:  # the last merge's output rounding is the rule's round_row, not the chain's
            merged = torch.where(written, push(merged, torch.where(merged - mid[i][0] >= 0, 1.0, -1.0)), merged)
        worst = merged
    err = (worst - exact[0]).abs()
    bound = _chain_bound(outs, lses, fmt)
    assert (err <= bound * (1 + 4 * u)).all()
    assert float((err / bound.clamp_min(1e-300)).max()) > 0.9  # tight: the worst case reaches it


@pytest.mark.parametrize("n", [8, 32])
def test_one_pt_realisation_of_a_merge_chain_does_not_bound_another_pipelines(n):
    """Two legitimate bf16 merge chains (vLLM's ``merge_states``) over the same partials, one with
    each chunk output correctly rounded (the pt variants), one with the chunk outputs off by a
    sub-ulp amount before rounding (any kernel's own arithmetic): the second's error passes twice
    the first's on some rows, so 2 x pt alone would fail a correct kernel, and the chain bound
    holds both."""
    fmt = fp.BF16
    outs, lses = _partials(7, n, t=200)
    g = torch.Generator().manual_seed(1)

    def merged(parts, dtype):
        state = (parts[0], lses[0])
        for o, l in zip(parts[1:], lses[1:]):
            state = em.merge_states(*state, o, l, dtype=dtype)
        return state[0]

    exact = merged(outs, F64)
    jitter = [1 + (torch.rand(o.shape, generator=g, dtype=F64) - 0.5) * fmt.unit_roundoff for o in outs]
    pt = merged([fp.round_to(o, fmt) for o in outs], torch.bfloat16)
    kernel = merged([fp.round_to(o * j, fmt) for o, j in zip(outs, jitter)], torch.bfloat16)
    bound = _chain_bound(outs, lses, fmt)
    err_pt, err_kernel = (pt - exact).abs(), (kernel - exact).abs()
    assert (err_pt <= bound).all() and (err_kernel <= bound).all()
    assert (err_kernel.amax(dim=-1) > 2 * err_pt.amax(dim=-1)).any()
