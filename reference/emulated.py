"""Attention with every rounding written out: the float64 oracle and the low-precision "pt"
paths, computed the same way on every machine (for stored goldens).

One pipeline, parameterised by the model dtype it emulates. With ``dtype=torch.float64``
nothing is rounded and the result is the float64 reference (equal to reference.mha to float64
rounding, tests/reference/test_emulated.py). With bf16/fp16/fp32 it is FlashAttention's "pt"
path (``attention_ref(upcast=False)``): the same math done the way a low-precision kernel does
it, rounding where such a kernel rounds:

    model dtype m (rnd_m)                      float32 accumulator a (rnd_a)
    K' = rnd_m(K * scale)    [prescale="k"]
    S  = rnd_m(Q . K')       dot over the head dim accumulated in a (blocks of 16, in order)
    S  = rnd_m(S * scale)    [prescale="scores"]
    S  = rnd_m(c * rnd_m(tanh(rnd_m(S / c))))            softcap
    S  = rnd_m(S + rnd_m(-rnd_m(slope) * rnd_m(|i - j|)))  ALiBi
    e_j = rnd_a(exp(rnd_a(S_j - max)))         sum of e_j accumulated in a (blocks of 16 keys)
    P_j = rnd_m(rnd_a(e_j / sum))              (a sink is one more logit, rounded to m)
    O  = rnd_m(sum_j P_j V_j)                  accumulated in a (blocks of 16 keys, in order)
    LSE = rnd_a(rnd_a(log(sum over keys)) + max)   (sinks excluded)

``prescale="k"`` is FlashAttention's ``reorder_ops``; ``"scores"`` scales the rounded scores as
most kernels do. For fp8 caches the keys and values are dequantised into the model dtype
(``rnd_m(stored * scale)``; exact in float64).

The float32 accumulator (``Accumulator``): with bf16/fp16 operands products are exact in
float32 and blocks of 16 terms (an MMA k-step) are added per rounding; with float32 operands one
term at a time, each product rounded (no fused multiply-add), the larger of the usual errors.

Rounding and arithmetic come from reference.fp (exact float64 operations only). Two engines:
``EXACT`` sums in one fixed order (reference.fp.contract, the accumulator above) and its
elementary functions are reference.fp's (identical bytes on every CPU, ISA level and BLAS);
``FAST`` uses torch's float64 einsum/sum/exp (BLAS order, one accumulator rounding at the end)
for the large tier, which is computed live on the GPU and never stored.

Imports nothing of this project outside reference/.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from reference import fp
from reference.mha import check_paged, check_qkv, query_positions, visible

F64 = torch.float64
PRESCALES = ("k", "scores")
NORMALISES = ("before", "after")


@dataclass(frozen=True)
class Accumulator:
    """How a kernel accumulates a reduction: in ``fmt``, adding ``block`` terms at a time (their
    sum exact), products rounded to ``fmt`` first when ``round_products``."""

    fmt: fp.Format
    block: int
    round_products: bool


# bf16/fp16 operands: products exact in float32, blocks of 16 (an MMA k-step) per rounding.
# float32 operands: one term at a time, each product rounded (no fused multiply-add): the
# larger of the usual CUDA-core / CPU errors.
MMA_FP32 = Accumulator(fp.FP32, fp.BLOCK, False)
SCALAR_FP32 = Accumulator(fp.FP32, 1, True)


def _fmt(acc: Optional[Accumulator]) -> Optional[fp.Format]:
    return None if acc is None else acc.fmt


class ExactEngine:
    """Fixed-order reductions with accumulator rounding (reference.fp), reference.fp functions."""

    name = "exact"
    exp, log, tanh = staticmethod(fp.exp), staticmethod(fp.log), staticmethod(fp.tanh)

    @staticmethod
    def contract(spec: str, a: torch.Tensor, b: torch.Tensor, acc: Optional[Accumulator]) -> torch.Tensor:
        if acc is None:
            return fp.contract(spec, a, b)
        return fp.contract(spec, a, b, acc.fmt, acc.block, acc.round_products)

    @staticmethod
    def row_sum(x: torch.Tensor, acc: Optional[Accumulator]) -> torch.Tensor:
        return fp.sum_last(x) if acc is None else fp.sum_last(x, acc.fmt, acc.block)


class FastEngine:
    """torch float64 einsum/sum/exp (device-native order), one accumulator rounding at the end."""

    name = "fast"
    exp, log, tanh = staticmethod(torch.exp), staticmethod(torch.log), staticmethod(torch.tanh)

    @staticmethod
    def contract(spec, a, b, acc):
        return fp.round_to(torch.einsum(spec, a, b), _fmt(acc))

    @staticmethod
    def row_sum(x, acc):
        return fp.round_to(x.sum(dim=-1), _fmt(acc))


EXACT = ExactEngine()
FAST = FastEngine()


def _formats(dtype: torch.dtype):
    """(model format, accumulator): None for float64 (nothing rounded)."""
    model = fp.format_of(dtype)
    if model is None:
        return None, None
    return model, (SCALAR_FP32 if model is fp.FP32 else MMA_FP32)


def attention(q, k, v, *, scale, causal=True, sliding_window=None, softcap=None, alibi_slopes=None,
              sinks=None, q_offset=None, dtype: torch.dtype = F64, prescale: str = "k", normalise: str = "before",
              engine=EXACT):
    """One sequence. q [Sq, Hq, D], k [Sk, Hkv, D], v [Sk, Hkv, Dv]: values of the model dtype
    (any float tensor; read as float64). Returns (out [Sq, Hq, Dv], lse [Hq, Sq]) as float64
    tensors holding model-dtype (out) and float32 (lse) values; empty rows: 0 and -inf.

    ``normalise="before"``: P = softmax rounded to the model dtype, then P.V (FlashAttention's
    attention_ref); ``"after"``: the unnormalised exponentials rounded to the model dtype, P.V
    accumulated, then divided by the float32 sum (how flash kernels finish)."""
    q, k, v = q.to(F64), k.to(F64), v.to(F64)
    check_qkv(q, k, v, alibi_slopes, sinks, sliding_window, softcap)
    if prescale not in PRESCALES:
        raise ValueError(f"prescale: expected one of {PRESCALES}, got {prescale!r}")
    if normalise not in NORMALISES:
        raise ValueError(f"normalise: expected one of {NORMALISES}, got {normalise!r}")
    m_fmt, a_fmt = _formats(dtype)
    rm = lambda x: fp.round_to(x, m_fmt)  # noqa: E731
    sq, hq, d = q.shape
    sk, hkv, dv = k.shape[0], k.shape[1], v.shape[2]
    g = hq // hkv
    if sq == 0 or sk == 0:
        return torch.zeros(sq, hq, dv, dtype=F64, device=q.device), \
            torch.full((hq, sq), float("-inf"), dtype=F64, device=q.device)
    qpos = query_positions(sq, sk, q_offset, q.device)
    kpos = torch.arange(sk, device=q.device)

    kk = rm(k * scale) if prescale == "k" else k
    s = rm(engine.contract("mkgd,nkd->kgmn", q.reshape(sq, hkv, g, d), kk, a_fmt)).reshape(hq, sq, sk)
    if prescale == "scores":
        s = rm(s * scale)
    if softcap is not None:
        s = rm(softcap * rm(engine.tanh(rm(s / softcap))))
    if alibi_slopes is not None:
        slopes = rm(alibi_slopes.to(device=q.device, dtype=F64))
        dist = rm((qpos[:, None] - kpos[None, :]).abs().to(F64))
        s = rm(s + rm(-slopes[:, None, None] * dist))
    mask = visible(qpos, kpos, causal, sliding_window)
    s = s.masked_fill(~mask, float("-inf"))

    sink = None if sinks is None else rm(sinks.to(device=q.device, dtype=F64))[:, None].expand(hq, sq)
    p, lse, e, denom = _softmax(s, sink, dtype, engine)
    if normalise == "before":
        out = rm(engine.contract("kgmn,nkd->kgmd", p.reshape(hkv, g, sq, sk), v, a_fmt)).reshape(hq, sq, dv)
    else:
        acc = engine.contract("kgmn,nkd->kgmd", rm(e).reshape(hkv, g, sq, sk), v, a_fmt).reshape(hq, sq, dv)
        safe = torch.where(denom > 0, denom, torch.ones_like(denom))[..., None]
        out = rm(fp.round_to(acc / safe, _fmt(a_fmt)))
    return out.permute(1, 0, 2).contiguous(), lse


def _softmax(s: torch.Tensor, sink: Optional[torch.Tensor], dtype: torch.dtype, engine):
    """Masked logits s [H, M, N] (-inf where masked) -> (P [H, M, N] in the model dtype, LSE
    [H, M] over the keys only, the exponentials, the denominator), exponentials and sums in the
    accumulator format; a sink [H, M] joins the denominator. A row with no visible key gets P = 0
    and LSE -inf."""
    m_fmt, a_fmt = _formats(dtype)
    ra = lambda x: fp.round_to(x, _fmt(a_fmt))  # noqa: E731
    row_max = s.amax(dim=-1)  # -inf for an empty row
    shift = row_max if sink is None else torch.maximum(row_max, sink)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    e = ra(engine.exp(ra(s - shift[..., None])))  # exp(-inf) = 0 for masked keys
    key_sum = engine.row_sum(e, a_fmt)
    denom = key_sum if sink is None else ra(key_sum + ra(engine.exp(ra(sink - shift))))
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    p = fp.round_to(ra(e / safe[..., None]), m_fmt)
    lse = ra(ra(engine.log(key_sum)) + shift)  # log 0 = -inf for an empty row
    return p, torch.where(key_sum > 0, lse, torch.full_like(lse, float("-inf"))), e, denom


def lse_sensitivity(q, k, *, scale, causal=True, sliding_window=None, softcap=None, alibi_slopes=None,
                    q_offset=None, engine=EXACT):
    """[Hq, Sq] float64: B_Q + B_S, the first-order worst-case change of each row's LSE per unit
    roundoff when the query operand (any pre-scaling of Q) or the scores are rounded once.

    The LSE's derivative in score s_ij is p_ij (the row's probabilities over its keys), so
    rounding every score, |ds_ij| <= u |s_ij|, moves it by at most u B_S, B_S = sum_j p_ij
    max(|c_ij|, |s_ij|) with c the score before ALiBi (after the softcap: rounding the raw score
    t before the cap moves c by u |t| (1 - tanh^2(t/cap)) <= u |c|); rounding Q, |dq_d| <= u |q_d|
    (times the scale, whatever constant is folded in), moves it by sum_d dq_d sum_j p_ij k_jd, at
    most u B_Q, B_Q = scale sum_d |q_d| |sum_j p_ij k_jd|. (Rounding K is the same rounding in
    every kernel that does it, so the pt variants carry it.)
    """
    q, k = q.to(F64), k.to(F64)
    sq, hq, d = q.shape
    sk, hkv = k.shape[:2]
    g = hq // hkv
    qpos = query_positions(sq, sk, q_offset, q.device)
    kpos = torch.arange(sk, device=q.device)
    capped = engine.contract("mkgd,nkd->kgmn", q.reshape(sq, hkv, g, d), k, None).reshape(hq, sq, sk) * scale
    if softcap is not None:
        capped = softcap * engine.tanh(capped / softcap)
    final = capped
    if alibi_slopes is not None:
        final = capped - alibi_slopes.to(device=q.device, dtype=F64)[:, None, None] * (qpos[:, None] - kpos[None, :]).abs()
    mask = visible(qpos, kpos, causal, sliding_window)
    p = _probabilities(final.masked_fill(~mask, float("-inf")), engine)  # [Hq, Sq, Sk], 0 where masked
    b_s = engine.row_sum(p * torch.maximum(capped.abs(), final.abs()), None)
    k_mean = engine.contract("kgmn,nkd->kgmd", p.reshape(hkv, g, sq, sk), k, None)  # sum_j p_ij k_j
    b_q = engine.contract("mkgd,kgmd->kgm", q.abs().reshape(sq, hkv, g, d), k_mean.abs(), None).reshape(hq, sq)
    return b_q * scale + b_s


# Float32 arithmetic that every kernel does in its own way and the pt variants do not model
# term by term (output_step; golden/README.md "Budgets" gives the analysis).
EXP_ULPS = 20  # the loosest float32 exp of a shipped attention kernel: PyTorch's CPU flash attention (exp_u20, "ULP=20")
EXP_REL = 2 * EXP_ULPS  # its relative error in units of u (an ulp of y is at most 2u|y|)
EXP_LEVELS = 2  # an exp per key, and one per partial where partials are merged (split-KV, chunked context)
TANH_ABS = 2 * EXP_REL + 3  # absolute error of tanh = (e^x - e^-x)/(e^x + e^-x) from such exps, in units of u
ACCUMULATION_LAMBDA = 6.0  # lambda of the probabilistic sum bound; P(exceeded) <= 2 exp(-lambda^2 / 2) ~ 3e-8


def output_step(q, k, v, *, scale, causal=True, sliding_window=None, softcap=None, alibi_slopes=None, sinks=None,
                q_offset=None, engine=EXACT):
    """[Sq, Hq, Dv] float64, in units of the float32 unit roundoff u: a bound on how far a
    correct float32-arithmetic kernel's output may move from the exact result through what the
    pt variants carry as one realisation only, or not at all.

    To first order the output's change is sum_j p_j eps_j (v_j - o) when key j's unnormalised
    weight moves by a relative eps_j (|v_j - o| <= |v_j| + |o| keeps it to two contractions):
    eps_j <= u w_j with w_j = EXP_LEVELS * EXP_REL (the exps of a kernel are not correctly
    rounded) + 2 A_j (the query operand rounded twice, A_j = scale sum_d |q_d k_jd|) +
    2 max(|c_j|, |s_j|) (the score rounded twice) + 2 |s_j - m| (s - m and the log2(e) fold of
    exp2) + |s_j - c_j| (the ALiBi bias) + TANH_ABS * cap (softcap's tanh, absolute). A sink is
    one more logit with v = 0. Summation in any order (P.V, the exp sum, the online-softmax
    rescales): lambda sqrt(n) u (sum_j p_j |v_j| + |o|) over n keys, the probabilistic bound of
    Higham and Mary (2019) with lambda = ACCUMULATION_LAMBDA; 2 u |o| the final normalisation
    (a reciprocal and a product). Rows with no visible key get 0.
    """
    q, k, v = q.to(F64), k.to(F64), v.to(F64)
    sq, hq, d = q.shape
    sk, hkv, dv = k.shape[0], k.shape[1], v.shape[2]
    g = hq // hkv
    if sq == 0 or sk == 0:
        return torch.zeros(sq, hq, dv, dtype=F64, device=q.device)
    qpos = query_positions(sq, sk, q_offset, q.device)
    kpos = torch.arange(sk, device=q.device)
    qg = q.reshape(sq, hkv, g, d)
    capped = engine.contract("mkgd,nkd->kgmn", qg, k, None).reshape(hq, sq, sk) * scale
    if softcap is not None:
        capped = softcap * engine.tanh(capped / softcap)
    final = capped
    if alibi_slopes is not None:
        bias = alibi_slopes.to(device=q.device, dtype=F64)[:, None, None] * (qpos[:, None] - kpos[None, :]).abs()
        final = capped - bias
    mask = visible(qpos, kpos, causal, sliding_window)
    final = final.masked_fill(~mask, float("-inf"))
    shift = final.amax(dim=-1)  # [Hq, Sq]
    if sinks is not None:
        sink = sinks.to(device=q.device, dtype=F64)[:, None].expand(hq, sq)
        shift = torch.maximum(shift, sink)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    e = engine.exp(final - shift[..., None])  # 0 where masked
    total = engine.row_sum(e, None)
    n = mask.sum(dim=-1).to(F64)[None].expand(hq, sq)
    if sinks is not None:
        e_sink = engine.exp(sink - shift)
        total = total + e_sink
        n = n + 1
    safe = torch.where(total > 0, total, torch.ones_like(total))
    p = e / safe[..., None]
    a_q = engine.contract("mkgd,nkd->kgmn", qg.abs(), k.abs(), None).reshape(hq, sq, sk) * scale
    visible_final = torch.where(mask, final, capped)  # finite where masked: p is 0 there
    w = (EXP_LEVELS * EXP_REL + 2 * a_q + 2 * torch.maximum(capped.abs(), visible_final.abs())
         + 2 * (visible_final - shift[..., None]).abs() + (visible_final - capped).abs())
    if softcap is not None:
        w = w + TANH_ABS * abs(float(softcap))
    weight_sum = engine.row_sum(p * w, None)  # [Hq, Sq]
    if sinks is not None:
        weight_sum = weight_sum + e_sink / safe * (EXP_LEVELS * EXP_REL + 2 * (sink - shift).abs())
    spread = ACCUMULATION_LAMBDA * n.sqrt()  # [Hq, Sq]
    pv = lambda x: engine.contract("kgmn,nkd->kgmd", x.reshape(hkv, g, sq, sk), v, None).reshape(hq, sq, dv)  # noqa: E731
    o = pv(p)
    weighted_v = engine.contract("kgmn,nkd->kgmd", (p * (w + spread[..., None])).reshape(hkv, g, sq, sk), v.abs(),
                                 None).reshape(hq, sq, dv)
    step = weighted_v + o.abs() * (weight_sum + spread + 2)[..., None]
    step = torch.where((total > 0)[..., None], step, torch.zeros_like(step))
    return step.permute(1, 0, 2).contiguous()


def _probabilities(s, engine):
    """float64 softmax over the last dim of masked logits (rows with no visible key: 0)."""
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = engine.exp(s - m)
    total = engine.row_sum(e, None)[..., None]
    return torch.where(total > 0, e / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(e))


def _gather(cache, block_table_row, start, end, scale, m_fmt):
    """Tokens [start, end) of one sequence from an NHD cache (MLA: the latent cache), dequantised into the model format
    (fp8: rnd_m(stored * scale)), as float64."""
    bs = cache.shape[1]
    pos = torch.arange(start, end, device=cache.device)
    blocks = block_table_row.to(cache.device).long()[pos // bs]
    x = cache[blocks, pos % bs].to(F64)
    if cache.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
        x = fp.round_to(x * float(scale), m_fmt)
    return x


def paged_attention(query, key_cache, value_cache, block_table, query_start_loc, seq_lens, *, scale,
                    causal=True, sliding_window=None, softcap=None, alibi_slopes=None, sinks=None,
                    k_scale=1.0, v_scale=1.0, dtype: torch.dtype = F64, prescale: str = "k",
                    normalise: str = "before", new_key=None, new_value=None, engine=EXACT,
                    block_m: Optional[int] = None, context_chunk_tokens: Optional[int] = None,
                    with_lse_sensitivity=False, with_output_step=False):
    """``attention`` over a vLLM-shaped batch whose cache holds every key (context and new).

    With ``new_key``/``new_value`` ([T, Hkv, D], the batch's new tokens) the new tokens' keys
    and values come from those instead of the cache (a pipeline that attends the new tokens
    before, or without, reading them back from an fp8 cache). ``context_chunk_tokens``: vLLM's
    prefill with context (``chunked_context``): the new tokens causal over themselves, the context
    in chunks, partials in the model dtype merged in order. ``block_m`` takes each sequence's
    queries that many at a time (rows are independent: only memory changes). Returns (out
    [T, Hq, Dv], lse [Hq, T]) as float64, plus ``lse_sensitivity`` [Hq, T] if
    ``with_lse_sensitivity`` and then ``output_step`` [T, Hq, Dv] if ``with_output_step``.
    """
    check_paged(query, key_cache, value_cache, block_table, query_start_loc, seq_lens)
    m_fmt, _ = _formats(dtype)
    t, hq = query.shape[:2]
    dev = query.device
    out = torch.zeros(t, hq, value_cache.shape[3], dtype=F64, device=dev)
    lse = torch.full((hq, t), float("-inf"), dtype=F64, device=dev)
    sensitivity = torch.zeros(hq, t, dtype=F64, device=dev)
    step_out = torch.zeros_like(out) if with_output_step else None
    qsl = query_start_loc.tolist()
    knobs = dict(scale=scale, causal=causal, sliding_window=sliding_window)
    for b, seq_len in enumerate(seq_lens.tolist()):
        q0, q1 = qsl[b], qsl[b + 1]
        if q1 == q0:
            continue
        ctx = seq_len - (q1 - q0)
        k = _gather(key_cache, block_table[b], 0, seq_len, k_scale, m_fmt)
        v = _gather(value_cache, block_table[b], 0, seq_len, v_scale, m_fmt)
        if new_key is not None:
            k = torch.cat([k[:ctx], fp.round_to(new_key[q0:q1].to(F64), m_fmt)])
            v = torch.cat([v[:ctx], fp.round_to(new_value[q0:q1].to(F64), m_fmt)])
        if context_chunk_tokens is not None:
            if sliding_window is not None or alibi_slopes is not None or sinks is not None:
                raise ValueError("context_chunk_tokens: chunking with a window, ALiBi or sinks is not modelled")
            q = fp.round_to(query[q0:q1].to(F64), m_fmt)
            out[q0:q1], lse[:, q0:q1] = chunked_context(q, k, v, ctx, chunk_tokens=context_chunk_tokens, scale=scale,
                                                        softcap=softcap, dtype=dtype, prescale=prescale,
                                                        normalise=normalise, engine=engine)
            if not (with_lse_sensitivity or with_output_step):
                continue
        step = (q1 - q0) if block_m is None else int(block_m)
        for m0 in range(q0, q1, step):
            m1 = min(m0 + step, q1)
            rows = dict(knobs, q_offset=ctx + (m0 - q0))
            q = fp.round_to(query[m0:m1].to(F64), m_fmt)
            if context_chunk_tokens is None:
                out[m0:m1], lse[:, m0:m1] = attention(q, k, v, softcap=softcap, alibi_slopes=alibi_slopes,
                                                      sinks=sinks, dtype=dtype, prescale=prescale,
                                                      normalise=normalise, engine=engine, **rows)
            if with_lse_sensitivity:
                sensitivity[:, m0:m1] = lse_sensitivity(q, k, softcap=softcap, alibi_slopes=alibi_slopes,
                                                        engine=engine, **rows)
            if with_output_step:
                step_out[m0:m1] = output_step(q, k, v, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
                                              engine=engine, **rows)
    extra = ((sensitivity,) if with_lse_sensitivity else ()) + ((step_out,) if with_output_step else ())
    return (out, lse, *extra)


def chunked_context(q, k, v, ctx: int, *, chunk_tokens: int, scale, softcap=None, dtype: torch.dtype = F64,
                    prescale: str = "k", normalise: str = "before", engine=EXACT):
    """One sequence, vLLM's prefill with context: the new tokens (keys ctx..) causal over
    themselves, the context (keys ..ctx) in chunks of ``chunk_tokens`` without a mask, the
    partials (model dtype) merged in order, then merge(prefix=context, suffix=new)."""
    kw = dict(scale=scale, softcap=softcap, dtype=dtype, prescale=prescale, normalise=normalise, engine=engine)
    out, lse = attention(q, k[ctx:], v[ctx:], causal=True, **kw)
    if ctx == 0:
        return out, lse
    ctx_out = ctx_lse = None
    for a in range(0, ctx, max(1, int(chunk_tokens))):
        b = min(a + int(chunk_tokens), ctx)
        o, l = attention(q, k[a:b], v[a:b], causal=False, **kw)
        ctx_out, ctx_lse = (o, l) if ctx_out is None else merge_states(ctx_out, ctx_lse, o, l, dtype, engine)
    return merge_states(ctx_out, ctx_lse, out, lse, dtype, engine)


# ---- MLA (reference/mla.py's two paths, with the roundings of a model-dtype implementation) ----

def merge_states(prefix_out, prefix_lse, suffix_out, suffix_lse, dtype: torch.dtype = F64, engine=EXACT):
    """vLLM's ``merge_attn_states`` (LSE [H, T]; +inf read as -inf; both -inf -> 0 and -inf):
    weights and the weighted sum in the accumulator format, the output rounded to the model
    dtype. float64 tensors in and out."""
    m_fmt, a_fmt = _formats(dtype)
    ra = lambda x: fp.round_to(x, _fmt(a_fmt))  # noqa: E731
    p = torch.where(prefix_lse == float("inf"), torch.full_like(prefix_lse, float("-inf")), prefix_lse.to(F64))
    s = torch.where(suffix_lse == float("inf"), torch.full_like(suffix_lse, float("-inf")), suffix_lse.to(F64))
    m = torch.maximum(p, s)
    both_empty = m == float("-inf")
    m0 = torch.where(both_empty, torch.zeros_like(m), m)
    wp, ws = ra(engine.exp(ra(p - m0))), ra(engine.exp(ra(s - m0)))
    tot = ra(wp + ws)
    safe = torch.where(both_empty, torch.ones_like(tot), tot)
    cp = ra(wp / safe).transpose(0, 1)[..., None]  # [T, H, 1]
    cs = ra(ws / safe).transpose(0, 1)[..., None]
    out = fp.round_to(ra(ra(prefix_out.to(F64) * cp) + ra(suffix_out.to(F64) * cs)), m_fmt)
    lse = torch.where(both_empty, torch.full_like(m, float("-inf")), ra(ra(engine.log(safe)) + m0))
    return out, lse


def merge_step(prefix_out, prefix_lse, suffix_out, suffix_lse, engine=EXACT):
    """[T, H, D] float64 in units of the float32 unit roundoff: ``output_step``'s bound for the
    merge of two partials (``merge_states``). Each partial's weight exp(lse_i - m) comes from
    one exp off by up to EXP_REL u with its argument rounded twice (the subtraction, the log2(e)
    fold), so eps_i <= u (EXP_REL + 2 |lse_i - m|) and the output moves by at most
    u sum_i c_i w_i (|o_i| + |o|) (c_i the normalised weights); the two-term sum and the
    normalisation add lambda sqrt(2) u (sum_i c_i |o_i| + |o|) + 2 u |o|. Rows whose partials
    are both empty get 0."""
    p = torch.where(prefix_lse == float("inf"), torch.full_like(prefix_lse, float("-inf")), prefix_lse.to(F64))
    s = torch.where(suffix_lse == float("inf"), torch.full_like(suffix_lse, float("-inf")), suffix_lse.to(F64))
    m = torch.maximum(p, s)
    both_empty = m == float("-inf")
    m0 = torch.where(both_empty, torch.zeros_like(m), m)
    wp, ws = engine.exp(p - m0), engine.exp(s - m0)
    safe = torch.where(both_empty, torch.ones_like(wp), wp + ws)
    cp, cs = (w / safe for w in (wp, ws))

    def spread(lse):  # EXP_REL + 2 |lse - m|, 0 where the partial is empty (its weight is 0)
        return torch.where(torch.isfinite(lse), EXP_REL + 2 * (lse - m0).abs(), torch.zeros_like(lse))

    col = lambda x: x.transpose(0, 1)[..., None]  # noqa: E731  [H, T] -> [T, H, 1]
    op, os_ = prefix_out.to(F64), suffix_out.to(F64)
    o = op * col(cp) + os_ * col(cs)
    step = (col(cp * spread(p)) * (op.abs() + o.abs()) + col(cs * spread(s)) * (os_.abs() + o.abs())
            + ACCUMULATION_LAMBDA * 2 ** 0.5 * (col(cp) * op.abs() + col(cs) * os_.abs() + o.abs()) + 2 * o.abs())
    return torch.where(col(both_empty), torch.zeros_like(step), step)


def mla_absorbed(q_nope, q_pe, kv_c, k_pe, w_uk, w_uv, *, scale, causal=True, q_offset=None,
                 dtype: torch.dtype = F64, prescale: str = "k", normalise: str = "before", engine=EXACT):
    """Absorbed (decode) path for one sequence, float64 in and out (model-dtype values):
    ql = rnd_m(q_nope . w_uk), MQA of [ql | q_pe] over the latent [kv_c | k_pe] (the MHA steps),
    o_lat = rnd_m(P . kv_c), out = rnd_m(o_lat . w_uv)."""
    m_fmt, a_fmt = _formats(dtype)
    rm = lambda x: fp.round_to(x, m_fmt)  # noqa: E731
    ql = rm(engine.contract("qnp,lnp->qnl", q_nope.to(F64), w_uk.to(F64), a_fmt))
    q = torch.cat([ql, q_pe.to(F64)], dim=-1)  # [Sq, N, L + R]
    lat = torch.cat([kv_c, k_pe], dim=-1).to(F64)  # [Sk, L + R]
    sq, n = q.shape[:2]
    sk = lat.shape[0]
    kk = rm(lat * scale) if prescale == "k" else lat
    s = rm(engine.contract("qnd,kd->nqk", q, kk, a_fmt))
    if prescale == "scores":
        s = rm(s * scale)
    qpos = query_positions(sq, sk, q_offset, q.device)
    mask = visible(qpos, torch.arange(sk, device=q.device), causal, None)
    p, lse, e, denom = _softmax(s.masked_fill(~mask, float("-inf")), None, dtype, engine)
    if normalise == "before":
        o_lat = rm(engine.contract("nqk,kl->qnl", p, kv_c.to(F64), a_fmt))
    else:  # unnormalised exponentials in the model dtype, divided by the float32 sum at the end
        safe = torch.where(denom > 0, denom, torch.ones_like(denom)).transpose(0, 1)[..., None]
        o_lat = rm(fp.round_to(engine.contract("nqk,kl->qnl", rm(e), kv_c.to(F64), a_fmt) / safe, _fmt(a_fmt)))
    return rm(engine.contract("qnl,lnv->qnv", o_lat, w_uv.to(F64), a_fmt)), lse


def mla_upproject(kv_c, k_pe, w_uk, w_uv, dtype: torch.dtype = F64, engine=EXACT):
    """Per-head keys [Sk, N, P + R] = [rnd_m(kv_c . w_uk) | k_pe] and values rnd_m(kv_c . w_uv)."""
    m_fmt, a_fmt = _formats(dtype)
    k_nope = fp.round_to(engine.contract("kl,lnp->knp", kv_c.to(F64), w_uk.to(F64), a_fmt), m_fmt)
    v = fp.round_to(engine.contract("kl,lnv->knv", kv_c.to(F64), w_uv.to(F64), a_fmt), m_fmt)
    sk, n = k_nope.shape[:2]
    return torch.cat([k_nope, k_pe.to(F64)[:, None, :].expand(sk, n, k_pe.shape[-1])], dim=-1), v


def mla_upprojected(q_nope, q_pe, kv_c, k_pe, w_uk, w_uv, *, scale, causal=True, q_offset=None,
                    dtype: torch.dtype = F64, prescale: str = "k", normalise: str = "before", engine=EXACT):
    """Up-projected (prefill) path for one sequence: MHA (``attention``) of [q_nope | q_pe] over
    the up-projected keys and values."""
    k, v = mla_upproject(kv_c, k_pe, w_uk, w_uv, dtype, engine)
    q = torch.cat([q_nope, q_pe], dim=-1).to(F64)
    return attention(q, k, v, scale=scale, causal=causal, q_offset=q_offset, dtype=dtype, prescale=prescale,
                     normalise=normalise, engine=engine)


MLA_PATHS = {"absorbed": mla_absorbed, "upprojected": mla_upprojected}


def mla_chunked_prefill(q_nope, q_pe, new_kv_c, new_k_pe, ctx_kv_c, ctx_k_pe, w_uk, w_uv, *, scale,
                        chunk_tokens: Optional[int], path: str = "upprojected", dtype: torch.dtype = F64,
                        prescale: str = "k", normalise: str = "before", engine=EXACT):
    """vLLM's prefill with context (reference/mla.py ``chunked_prefill``): the new tokens causal
    over themselves, the context in chunks (non-causal), partials in the model dtype merged in
    order, then merge(prefix=context, suffix=new)."""
    attend = MLA_PATHS[path]
    kw = dict(scale=scale, dtype=dtype, prescale=prescale, normalise=normalise, engine=engine)
    out, lse = attend(q_nope, q_pe, new_kv_c, new_k_pe, w_uk, w_uv, causal=True, **kw)
    n_ctx = ctx_kv_c.shape[0]
    if n_ctx == 0:
        return out, lse
    step = n_ctx if not chunk_tokens else int(chunk_tokens)
    ctx_out = ctx_lse = None
    for a in range(0, n_ctx, step):
        o, l = attend(q_nope, q_pe, ctx_kv_c[a:a + step], ctx_k_pe[a:a + step], w_uk, w_uv, causal=False, **kw)
        if ctx_out is None:
            ctx_out, ctx_lse = o, l
        else:
            ctx_out, ctx_lse = merge_states(ctx_out, ctx_lse, o, l, dtype, engine)
    return merge_states(ctx_out, ctx_lse, out, lse, dtype, engine)


def paged_mla(q_nope, q_pe, kv_cache, w_uk, w_uv, block_table, query_start_loc, seq_lens, *, scale,
              kv_scale=1.0, path="absorbed", dtype: torch.dtype = F64, prescale: str = "k",
              normalise: str = "before", new_kv_c=None,
              new_k_pe=None, context_chunk_tokens: Optional[int] = None, engine=EXACT,
              block_m: Optional[int] = None, with_lse_sensitivity=False):
    """MLA over a paged batch whose latent cache holds every key (reference/mla.py ``paged_mla``).

    ``path``: "absorbed" (one pass over all keys) or "upprojected"; with ``new_kv_c``/``new_k_pe``
    the new tokens come from those instead of the cache, and ``context_chunk_tokens`` chunks the
    context as vLLM's prefill does (``mla_chunked_prefill``); without chunking, ``block_m``
    takes the queries that many at a time (memory only). Returns (out [T, N, V], lse [N, T])
    float64, plus ``lse_sensitivity`` [N, T] if ``with_lse_sensitivity``: the larger of the two
    paths' (the query operand is [ql | q_pe] over the latent, or [q_nope | q_pe] over the
    up-projected keys; the scores are the same).
    """
    L = w_uk.shape[0]
    m_fmt, _ = _formats(dtype)
    T, N = q_nope.shape[:2]
    out = torch.zeros(T, N, w_uv.shape[-1], dtype=F64, device=q_nope.device)
    lse = torch.full((N, T), float("-inf"), dtype=F64, device=q_nope.device)
    sensitivity = torch.zeros(N, T, dtype=F64, device=q_nope.device)
    qn, qp = fp.round_to(q_nope.to(F64), m_fmt), fp.round_to(q_pe.to(F64), m_fmt)
    wk, wv = fp.round_to(w_uk.to(F64), m_fmt), fp.round_to(w_uv.to(F64), m_fmt)
    kw = dict(scale=scale, dtype=dtype, prescale=prescale, normalise=normalise, engine=engine)
    qsl = [int(x) for x in query_start_loc.tolist()]
    for b, s_len in enumerate(int(x) for x in seq_lens.tolist()):
        a, e = qsl[b], qsl[b + 1]
        ctx = s_len - (e - a)
        lat = _gather(kv_cache, block_table[b], 0, s_len, kv_scale, m_fmt)
        if new_kv_c is not None:
            new = torch.cat([new_kv_c[a:e], new_k_pe[a:e]], dim=-1).to(F64)
            lat = torch.cat([lat[:ctx], fp.round_to(new, m_fmt)])
        if context_chunk_tokens is not None:
            out[a:e], lse[:, a:e] = mla_chunked_prefill(qn[a:e], qp[a:e], lat[ctx:, :L], lat[ctx:, L:], lat[:ctx, :L],
                                                        lat[:ctx, L:], wk, wv, chunk_tokens=context_chunk_tokens,
                                                        path=path, **kw)
        step = (e - a) if block_m is None else int(block_m)
        for m0 in range(a, e, step):
            m1 = min(m0 + step, e)
            where = dict(causal=True, q_offset=ctx + (m0 - a))
            if context_chunk_tokens is None:
                out[m0:m1], lse[:, m0:m1] = MLA_PATHS[path](qn[m0:m1], qp[m0:m1], lat[:, :L], lat[:, L:], wk, wv,
                                                            **where, **kw)
            if with_lse_sensitivity:
                sensitivity[:, m0:m1] = _mla_lse_sensitivity(qn[m0:m1], qp[m0:m1], lat[:, :L], lat[:, L:], wk, wv,
                                                             scale, engine, where["q_offset"])
    return (out, lse, sensitivity) if with_lse_sensitivity else (out, lse)


def _mla_lse_sensitivity(q_nope, q_pe, kv_c, k_pe, w_uk, w_uv, scale, engine, q_offset):
    """[N, Sq]: the larger ``lse_sensitivity`` of the absorbed and the up-projected path."""
    ql = engine.contract("qnp,lnp->qnl", q_nope, w_uk, None)
    absorbed = lse_sensitivity(torch.cat([ql, q_pe], dim=-1), torch.cat([kv_c, k_pe], dim=-1)[:, None, :],
                               scale=scale, q_offset=q_offset, engine=engine)
    k_up, _ = mla_upproject(kv_c, k_pe, w_uk, w_uv, F64, engine)
    up = lse_sensitivity(torch.cat([q_nope, q_pe], dim=-1), k_up, scale=scale, q_offset=q_offset, engine=engine)
    return torch.maximum(absorbed, up)
