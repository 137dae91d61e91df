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
    qpos = query_positions(q.shape[0], k.shape[0], q_offset, q.device)[None]
    out, lse = attention_batch(q[None], k[None], v[None], qpos, None, scale=scale, causal=causal,
                               sliding_window=sliding_window, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
                               dtype=dtype, prescale=prescale, normalise=normalise, engine=engine)
    return out[0], lse[0]


def _key_mask(qpos, sk: int, key_len, causal: bool, sliding_window) -> torch.Tensor:
    """bool [B, 1, Sq, Sk]: query (at qpos [B, Sq]) sees key j (at position j) and j < key_len[b]."""
    kpos = torch.arange(sk, device=qpos.device)
    mask = visible(qpos, kpos, causal, sliding_window)
    if key_len is not None:
        mask = mask & (kpos < key_len[:, None, None])
    return mask[:, None]


def _alibi_distance(qpos, sk: int) -> torch.Tensor:
    """float64 [B, 1, Sq, Sk]: |i - j| for query position i, key position j."""
    return (qpos[:, :, None] - torch.arange(sk, device=qpos.device)).abs().to(F64)[:, None]


def attention_batch(q, k, v, qpos, key_len=None, *, scale, causal=True, sliding_window=None, softcap=None,
                    alibi_slopes=None, sinks=None, dtype: torch.dtype = F64, prescale: str = "k",
                    normalise: str = "before", engine=EXACT):
    """``attention`` of B independent rows of sequences at once (float64 tensors): q [B, Sq, Hq, D]
    at positions qpos [B, Sq], k [B, Sk, Hkv, D], v [B, Sk, Hkv, Dv] whose keys j >= key_len[b]
    are padding (0, never seen; None: no padding). Returns (out [B, Sq, Hq, Dv], lse [B, Hq, Sq]).
    With B = 1 and no padding every operation is the one-sequence one; padded keys add exact
    zeros, so only the FAST engine's summation order can tell a padded row from an unpadded one."""
    m_fmt, a_fmt = _formats(dtype)
    rm = lambda x: fp.round_to(x, m_fmt)  # noqa: E731
    nb, sq, hq, d = q.shape
    sk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    if sq == 0 or sk == 0:
        return torch.zeros(nb, sq, hq, dv, dtype=F64, device=q.device), \
            torch.full((nb, hq, sq), float("-inf"), dtype=F64, device=q.device)
    kk = rm(k * scale) if prescale == "k" else k
    s = rm(engine.contract("bmkgd,bnkd->bkgmn", q.reshape(nb, sq, hkv, g, d), kk, a_fmt)).reshape(nb, hq, sq, sk)
    if prescale == "scores":
        s = rm(s * scale)
    if softcap is not None:
        s = rm(softcap * rm(engine.tanh(rm(s / softcap))))
    if alibi_slopes is not None:
        slopes = rm(alibi_slopes.to(device=q.device, dtype=F64))
        dist = rm(_alibi_distance(qpos, sk))
        s = rm(s + rm(-slopes[:, None, None] * dist))
    s = s.masked_fill(~_key_mask(qpos, sk, key_len, causal, sliding_window), float("-inf"))

    sink = None if sinks is None else rm(sinks.to(device=q.device, dtype=F64))[:, None].expand(nb, hq, sq)
    p, lse, e, denom = _softmax(s, sink, dtype, engine)
    if normalise == "before":
        out = rm(engine.contract("bkgmn,bnkd->bkgmd", p.reshape(nb, hkv, g, sq, sk), v, a_fmt))
    else:
        acc = engine.contract("bkgmn,bnkd->bkgmd", rm(e).reshape(nb, hkv, g, sq, sk), v, a_fmt)
        safe = torch.where(denom > 0, denom, torch.ones_like(denom)).reshape(nb, hkv, g, sq, 1)
        out = rm(fp.round_to(acc / safe, _fmt(a_fmt)))
    return out.reshape(nb, hq, sq, dv).permute(0, 2, 1, 3).contiguous(), lse


def _softmax(s: torch.Tensor, sink: Optional[torch.Tensor], dtype: torch.dtype, engine):
    """Masked logits s [..., M, N] (-inf where masked) -> (P [..., M, N] in the model dtype, LSE
    [..., M] over the keys only, the exponentials, the denominator), exponentials and sums in the
    accumulator format; a sink [..., M] joins the denominator. A row with no visible key gets P = 0
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
    qpos = query_positions(q.shape[0], k.shape[0], q_offset, q.device)[None]
    return lse_sensitivity_batch(q[None], k[None], qpos, None, scale=scale, causal=causal,
                                 sliding_window=sliding_window, softcap=softcap, alibi_slopes=alibi_slopes,
                                 engine=engine)[0]


def _capped_scores(q, k, scale, softcap, engine) -> torch.Tensor:
    """float64 [B, Hq, Sq, Sk]: the scores times the scale, softcapped (before ALiBi)."""
    nb, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    capped = engine.contract("bmkgd,bnkd->bkgmn", q.reshape(nb, sq, hkv, hq // hkv, d), k,
                             None).reshape(nb, hq, sq, sk) * scale
    return capped if softcap is None else softcap * engine.tanh(capped / softcap)


def lse_sensitivity_batch(q, k, qpos, key_len=None, *, scale, causal=True, sliding_window=None, softcap=None,
                          alibi_slopes=None, engine=EXACT):
    """``lse_sensitivity`` of B rows at once ([B, Hq, Sq]; shapes as ``attention_batch``)."""
    nb, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    capped = _capped_scores(q, k, scale, softcap, engine)
    final = capped
    if alibi_slopes is not None:
        final = capped - alibi_slopes.to(device=q.device, dtype=F64)[:, None, None] * _alibi_distance(qpos, sk)
    mask = _key_mask(qpos, sk, key_len, causal, sliding_window)
    p = _probabilities(final.masked_fill(~mask, float("-inf")), engine)  # [B, Hq, Sq, Sk], 0 where masked
    b_s = engine.row_sum(p * torch.maximum(capped.abs(), final.abs()), None)
    k_mean = engine.contract("bkgmn,bnkd->bkgmd", p.reshape(nb, hkv, g, sq, sk), k, None)  # sum_j p_ij k_j
    b_q = engine.contract("bmkgd,bkgmd->bkgm", q.abs().reshape(nb, sq, hkv, g, d), k_mean.abs(),
                          None).reshape(nb, hq, sq)
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
    qpos = query_positions(q.shape[0], k.shape[0], q_offset, q.device)[None]
    return output_step_batch(q[None], k[None], v[None], qpos, None, scale=scale, causal=causal,
                             sliding_window=sliding_window, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
                             engine=engine)[0]


def output_step_batch(q, k, v, qpos, key_len=None, *, scale, causal=True, sliding_window=None, softcap=None,
                      alibi_slopes=None, sinks=None, engine=EXACT):
    """``output_step`` of B rows at once ([B, Sq, Hq, Dv]; shapes as ``attention_batch``)."""
    nb, sq, hq, d = q.shape
    sk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    if sq == 0 or sk == 0:
        return torch.zeros(nb, sq, hq, dv, dtype=F64, device=q.device)
    capped = _capped_scores(q, k, scale, softcap, engine)
    final = capped
    if alibi_slopes is not None:
        final = capped - alibi_slopes.to(device=q.device, dtype=F64)[:, None, None] * _alibi_distance(qpos, sk)
    mask = _key_mask(qpos, sk, key_len, causal, sliding_window)  # [B, 1, Sq, Sk]
    final = final.masked_fill(~mask, float("-inf"))
    shift = final.amax(dim=-1)  # [B, Hq, Sq]
    if sinks is not None:
        sink = sinks.to(device=q.device, dtype=F64)[:, None].expand(nb, hq, sq)
        shift = torch.maximum(shift, sink)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    e = engine.exp(final - shift[..., None])  # 0 where masked
    total = engine.row_sum(e, None)
    n = mask.sum(dim=-1).to(F64).expand(nb, hq, sq)
    if sinks is not None:
        e_sink = engine.exp(sink - shift)
        total = total + e_sink
        n = n + 1
    safe = torch.where(total > 0, total, torch.ones_like(total))
    p = e / safe[..., None]
    a_q = _capped_scores(q.abs(), k.abs(), scale, None, engine)
    visible_final = torch.where(mask, final, capped)  # finite where masked: p is 0 there
    w = (EXP_LEVELS * EXP_REL + 2 * a_q + 2 * torch.maximum(capped.abs(), visible_final.abs())
         + 2 * (visible_final - shift[..., None]).abs() + (visible_final - capped).abs())
    if softcap is not None:
        w = w + TANH_ABS * abs(float(softcap))
    weight_sum = engine.row_sum(p * w, None)  # [B, Hq, Sq]
    if sinks is not None:
        weight_sum = weight_sum + e_sink / safe * (EXP_LEVELS * EXP_REL + 2 * (sink - shift).abs())
    spread = ACCUMULATION_LAMBDA * n.sqrt()  # [B, Hq, Sq]

    def pv(x, values):
        return engine.contract("bkgmn,bnkd->bkgmd", x.reshape(nb, hkv, g, sq, sk), values, None).reshape(nb, hq, sq, dv)

    o = pv(p, v)
    weighted_v = pv(p * (w + spread[..., None]), v.abs())
    step = weighted_v + o.abs() * (weight_sum + spread + 2)[..., None]
    step = torch.where((total > 0)[..., None], step, torch.zeros_like(step))
    return step.permute(0, 2, 1, 3).contiguous()


def _probabilities(s, engine):
    """float64 softmax over the last dim of masked logits (rows with no visible key: 0)."""
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = engine.exp(s - m)
    total = engine.row_sum(e, None)[..., None]
    return torch.where(total > 0, e / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(e))


BATCH_ELEMENTS = 1 << 24  # FAST engine: query blocks are packed while a batch's [B, H, Sq, Sk] scores stay under this


@dataclass(frozen=True)
class _Rows:
    """Blocks of query rows computed together: block i holds rows of sequence ``seq[i]``
    (``ctx[i]`` context tokens, ``seq_len[i]`` keys) whose first new token is batch row
    ``q0[i]``; ``index`` [B, M] is the batch row of each block row (padding repeats the block's
    last row). Tensors (int64) on the batch's device; ``put_to``/``put_from``: the batch rows of
    the real (not padding) entries and their flat positions in [B * M] (what ``_put_rows``
    scatters). ``host``: (ctx, seq_len) as Python lists, so that sizes never wait for the device."""

    seq: torch.Tensor
    q0: torch.Tensor
    ctx: torch.Tensor
    seq_len: torch.Tensor
    index: torch.Tensor
    put_to: torch.Tensor
    put_from: torch.Tensor
    host: tuple

    def positions(self, rows):
        """[B, M]: the position in its sequence (context first) of each row of ``index``."""
        return self.ctx[:, None] + (rows - self.q0[:, None])

    @staticmethod
    def build(blocks: list, device) -> "_Rows":
        """From (seq, first, count, q0, ctx, seq_len) tuples (block i is rows first .. first +
        count - 1): everything is computed on the host and crosses to ``device`` in one copy (a
        host sync per tensor made on a GPU shared by several processes waits for all their work)."""
        seq, first, count, q0, ctx, seq_len = torch.tensor(blocks, dtype=torch.int64).reshape(len(blocks), 6).t()
        j = torch.arange(int(count.max()))
        valid = (j < count[:, None]).flatten()
        index = first[:, None] + torch.minimum(j, count[:, None] - 1)
        put_from = valid.nonzero().flatten()
        parts = [seq, q0, ctx, seq_len, index.flatten(), index.flatten()[put_from], put_from]
        host = torch.cat(parts)
        if torch.device(device).type == "cuda":
            host = host.pin_memory()
        seq, q0, ctx, seq_len, index_d, put_to, put_from = host.to(device, non_blocking=True).split(
            [p.numel() for p in parts])
        return _Rows(seq, q0, ctx, seq_len, index_d.reshape(index.shape), put_to, put_from,
                     (parts[2].tolist(), parts[3].tolist()))


def _put_rows(dest, x, rows: _Rows) -> None:
    """dest [T, ...] at the batch's rows (``_Rows.index``) = x [B, M, ...], padding dropped."""
    dest[rows.put_to] = x.reshape(-1, *x.shape[2:])[rows.put_from]


def _put_columns(dest, x, rows: _Rows) -> None:
    """dest [H, T] at the batch's rows = x [B, H, M] (an LSE or a sensitivity), padding dropped."""
    dest[:, rows.put_to] = x.permute(1, 0, 2).reshape(x.shape[1], -1)[:, rows.put_from]


def _row_blocks(query_start_loc, seq_lens, block_m, engine, device, heads: int, key_elements: int) -> list:
    """The batches (``_Rows``) a paged computation runs: EXACT computes one sequence at a time
    (its fixed summation order is defined per sequence: nothing padded); FAST takes each
    sequence's rows ``block_m`` at a time and packs blocks of similar key counts, padded, while a
    batch's biggest tensors stay under BATCH_ELEMENTS (a block bigger than that is a batch alone):
    blocks x keys x (heads x rows + key_elements), key_elements being what one key of one block
    holds in the widest key tensor (per-head keys and values). ``query_start_loc`` and
    ``seq_lens`` are read on the host (pass CPU copies: a device tensor costs a sync)."""
    qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
    blocks = []  # (seq, first, count, q0, ctx, seq_len)
    for b, seq_len in enumerate(lens):
        q0, q1 = qsl[b], qsl[b + 1]
        step = (q1 - q0) if (engine is EXACT or block_m is None) else int(block_m)
        for m0 in range(q0, q1, max(step, 1)):
            blocks.append((b, m0, min(step, q1 - m0), q0, seq_len - (q1 - q0), seq_len))
    if engine is EXACT:
        groups = [[blk] for blk in blocks]
    else:
        groups, current, rows, keys = [], [], 0, 0
        for blk in sorted(blocks, key=lambda x: (-x[5], -x[2])):
            r, k = max(rows, blk[2]), max(keys, blk[5])
            if current and (len(current) + 1) * k * (heads * r + key_elements) > BATCH_ELEMENTS:
                groups.append(current)
                current, r, k = [], blk[2], blk[5]
            current.append(blk)
            rows, keys = r, k
        if current:
            groups.append(current)
    return [_Rows.build(g, device) for g in groups]


def _span(start, length, longest: Optional[int] = None):
    """(positions [B, N], valid [B, N]): start[i] + j for j < length[i], 0 beyond; N = max(length)
    (``longest`` when the caller knows it on the host: reading it from a device tensor syncs)."""
    n = longest if longest is not None else (int(length.max()) if length.numel() else 0)
    j = torch.arange(n, device=start.device)
    valid = j < length[:, None]
    return torch.where(valid, start[:, None] + j, torch.zeros_like(j)), valid


def _zero_beyond(x, valid):
    """x [B, N, ...] with 0 where ``valid`` [B, N] is False (padded keys are exact zeros)."""
    return torch.where(valid[(...,) + (None,) * (x.dim() - 2)], x, torch.zeros((), dtype=x.dtype, device=x.device))


def _gather_keys(cache, block_table, rows: "_Rows", scale, m_fmt, new=None):
    """[B, max(seq_len), Hkv, D] float64 (MLA: [B, max(seq_len), L + R]): the first
    rows.seq_len[i] tokens of sequence rows.seq[i] from the paged cache, dequantised into the
    model format (fp8: rnd_m(stored * scale)), 0 beyond. With ``new`` ([T, ...], the batch's new
    tokens), the new tokens' positions (from rows.ctx[i] on) hold new token rows.q0[i] + (position
    - rows.ctx[i]) of ``new`` rounded to the model format instead (read before, or without, the
    cache)."""
    length, new_from, q0 = rows.seq_len, rows.ctx, rows.q0
    pos, valid = _span(torch.zeros_like(length), length, max(rows.host[1]))
    bs = cache.shape[1]
    blocks = block_table.to(cache.device).long()[rows.seq[:, None], pos // bs]
    x = cache[blocks, pos % bs].to(F64)
    if cache.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
        x = fp.round_to(x * float(scale), m_fmt)
    if new is not None:
        fresh = valid & (pos >= new_from[:, None])
        index = (q0[:, None] + pos - new_from[:, None]).clamp(0, max(new.shape[0] - 1, 0))
        x = torch.where(fresh[(...,) + (None,) * (x.dim() - 2)], fp.round_to(new.to(F64), m_fmt)[index], x)
    return _zero_beyond(x, valid)


def paged_attention(query, key_cache, value_cache, block_table, query_start_loc, seq_lens, *, scale,
                    causal=True, sliding_window=None, softcap=None, alibi_slopes=None, sinks=None,
                    k_scale=1.0, v_scale=1.0, dtype: torch.dtype = F64, prescale: str = "k",
                    normalise: str = "before", new_key=None, new_value=None, engine=EXACT,
                    block_m: Optional[int] = None, context_chunk_tokens: Optional[int] = None,
                    partials: Optional[torch.dtype] = None, with_lse_sensitivity=False, with_output_step=False):
    """``attention`` over a vLLM-shaped batch whose cache holds every key (context and new).

    With ``new_key``/``new_value`` ([T, Hkv, D], the batch's new tokens) the new tokens' keys
    and values come from those instead of the cache (a pipeline that attends the new tokens
    before, or without, reading them back from an fp8 cache). ``context_chunk_tokens``: vLLM's
    prefill with context (``chunked_context``): the new tokens causal over themselves, the context
    in chunks, partials in the model dtype merged in order. ``block_m`` (FAST engine) takes each
    sequence's queries that many at a time, and blocks of several sequences are computed together
    (``_row_blocks``; rows are independent: only memory and the number of launches change).
    Returns (out [T, Hq, Dv], lse [Hq, T]) as float64, plus ``lse_sensitivity`` [Hq, T] if
    ``with_lse_sensitivity``, then ``output_step`` [T, Hq, Dv] if ``with_output_step``, then the
    chunked context's ``merge_chain_bound`` [T, Hq, Dv] (absolute; ``merge_chain_step``) if
    ``partials`` (the model dtype a real pipeline writes its partials in) is given.
    """
    check_paged(query, key_cache, value_cache, block_table, query_start_loc, seq_lens)
    if context_chunk_tokens is not None and (sliding_window is not None or alibi_slopes is not None
                                             or sinks is not None):
        raise ValueError("context_chunk_tokens: chunking with a window, ALiBi or sinks is not modelled")
    m_fmt, _ = _formats(dtype)
    t, hq = query.shape[:2]
    dev = query.device
    out = torch.zeros(t, hq, value_cache.shape[3], dtype=F64, device=dev)
    lse = torch.full((hq, t), float("-inf"), dtype=F64, device=dev)
    sensitivity = torch.zeros(hq, t, dtype=F64, device=dev)
    step_out = torch.zeros_like(out) if with_output_step else None
    chain = _chain_buffer(out, partials, context_chunk_tokens)
    knobs = dict(scale=scale, causal=causal, sliding_window=sliding_window, softcap=softcap,
                 alibi_slopes=alibi_slopes, engine=engine)
    rounding = dict(dtype=dtype, prescale=prescale, normalise=normalise)
    key_elements = key_cache.shape[2] * (key_cache.shape[3] + value_cache.shape[3])
    for rows in _row_blocks(query_start_loc, seq_lens, block_m, engine, dev, hq, key_elements):
        k = _gather_keys(key_cache, block_table, rows, k_scale, m_fmt, new=new_key)
        v = _gather_keys(value_cache, block_table, rows, v_scale, m_fmt, new=new_value)
        index = rows.index
        q = fp.round_to(query[index].to(F64), m_fmt)
        qpos = rows.positions(index)
        at = dict(qpos=qpos, key_len=rows.seq_len)
        if context_chunk_tokens is None:
            o, l = attention_batch(q, k, v, **at, **knobs, sinks=sinks, **rounding)
        else:
            o, l, *bound = chunked_context_batch(
                _mha_attend(dict(scale=scale, softcap=softcap, engine=engine, **rounding)), (q,), (k, v), qpos,
                rows.ctx, rows.seq_len, chunk_tokens=context_chunk_tokens, dtype=dtype, engine=engine,
                key_elements=key_elements, partials=partials, host=rows.host)
            if chain is not None:
                _put_rows(chain, bound[0], rows)
        _put_rows(out, o, rows)
        _put_columns(lse, l, rows)
        if with_lse_sensitivity:
            _put_columns(sensitivity, lse_sensitivity_batch(q, k, **at, **knobs), rows)
        if with_output_step:
            _put_rows(step_out, output_step_batch(q, k, v, **at, **knobs, sinks=sinks), rows)
    extra = ((sensitivity,) if with_lse_sensitivity else ()) + ((step_out,) if with_output_step else ())
    return (out, lse, *extra) + ((chain,) if chain is not None else ())


def _chain_buffer(out, partials: Optional[torch.dtype], context_chunk_tokens: Optional[int]):
    """The zeroed ``merge_chain_bound`` a paged pipeline fills when ``partials`` is given (None
    otherwise); only a chunked context has a merge chain."""
    if partials is None:
        return None
    if context_chunk_tokens is None:
        raise ValueError("partials: only a chunked context (context_chunk_tokens) merges partials")
    return torch.zeros_like(out)


def chunked_context(q, k, v, ctx: int, *, chunk_tokens: int, scale, softcap=None, dtype: torch.dtype = F64,
                    prescale: str = "k", normalise: str = "before", engine=EXACT):
    """One sequence, vLLM's prefill with context: the new tokens (keys ctx..) causal over
    themselves, the context (keys ..ctx) in chunks of ``chunk_tokens`` without a mask, the
    partials (model dtype) merged in order, then merge(prefix=context, suffix=new)."""
    q, k, v = q.to(F64), k.to(F64), v.to(F64)
    qpos = query_positions(q.shape[0], k.shape[0], None, q.device)[None]
    lengths = torch.tensor([ctx, k.shape[0]], dtype=torch.int64, device=q.device)
    kw = dict(scale=scale, softcap=softcap, dtype=dtype, prescale=prescale, normalise=normalise, engine=engine)
    out, lse = chunked_context_batch(_mha_attend(kw), (q[None],), (k[None], v[None]), qpos, lengths[:1], lengths[1:],
                                     chunk_tokens=chunk_tokens, dtype=dtype, engine=engine)
    return out[0], lse[0]


def _mha_attend(kw: dict):
    """``chunked_context_batch``'s attend for MHA: queries (q,), keys (k, v)."""
    def attend(queries, keys, qpos, key_len, causal):
        return attention_batch(*queries, *keys, qpos, key_len, causal=causal, **kw)
    return attend


def _slice_keys(k, start, length, row=None, longest: Optional[int] = None):
    """[R, max(length), ...]: keys start[i] .. start[i] + length[i] - 1 of row row[i] of k (default:
    row i), 0 beyond (``longest``: max(length), when known on the host)."""
    pos, valid = _span(start, length, longest)
    row = torch.arange(k.shape[0], device=k.device) if row is None else row
    return _zero_beyond(k[row[:, None], pos], valid)


def chunked_context_batch(attend, queries: tuple, keys: tuple, qpos, ctx, seq_len, *, chunk_tokens: Optional[int],
                          dtype: torch.dtype = F64, engine=EXACT, key_elements: int = 0,
                          partials: Optional[torch.dtype] = None, host: Optional[tuple] = None):
    """vLLM's prefill with context for B rows at once: ``queries`` ([B, Sq, ...] tensors) at
    positions qpos [B, Sq] (context first) over ``keys`` ([B, Sk, ...] tensors) that hold row i's
    ctx[i] context keys, then its new keys up to seq_len[i]. The new tokens attend causally over
    themselves; the context in chunks of ``chunk_tokens`` (None or 0: one chunk) without a mask,
    chunk c of every row in one batch (EXACT: one row and one chunk at a time, nothing padded),
    the partials merged in order (a row with fewer chunks merges empty partials, which change
    nothing), then merge(prefix=context, suffix=new). ``attend(queries, keys, qpos, key_len,
    causal)`` -> (out [B, Sq, H, Dv], lse [B, H, Sq]) is the attention of one pipeline;
    ``key_elements`` bounds the FAST engine's chunk batches as in ``_row_blocks``. With
    ``partials`` (the model dtype a real pipeline writes its partials in) also returns
    ``merge_chain_bound`` [B, Sq, H, Dv] (absolute): see ``merge_chain_step``. ``host``: (ctx,
    seq_len) as Python lists (``_Rows.host``), so that no size is read from the device."""
    nb, sq = queries[0].shape[:2]
    ctx_host, len_host = host if host is not None else (ctx.tolist(), seq_len.tolist())
    n_new = seq_len - ctx
    most_new = max((s - c for c, s in zip(ctx_host, len_host)), default=0)
    out, lse = attend(queries, tuple(_slice_keys(x, ctx, n_new, longest=most_new) for x in keys),
                      qpos - ctx[:, None], n_new, True)
    chain = fp.format_of(partials) if partials is not None else None
    longest = max(ctx_host, default=0)
    if longest == 0:  # no context: nothing merged
        return (out, lse) if chain is None else (out, lse, torch.zeros_like(out))
    chunk = int(chunk_tokens) if chunk_tokens else longest
    num_chunks = -(-longest // chunk)
    per_row = chunk * (out.shape[2] * sq + key_elements)  # as _row_blocks counts a batch row
    per_batch = 1 if engine is EXACT else max(1, BATCH_ELEMENTS // max(1, nb * per_row))
    state = bound = None
    for c0 in range(0, num_chunks, per_batch):
        cs = torch.arange(c0, min(c0 + per_batch, num_chunks), device=qpos.device)
        row = torch.arange(nb, device=qpos.device).repeat_interleave(len(cs))
        start = cs.repeat(nb) * chunk
        length = (ctx[row] - start).clamp(0, chunk)
        widest = min(chunk, longest - c0 * chunk)  # max(length): the batch's first chunk of the longest context
        o, l = attend(tuple(x[row] for x in queries),
                      tuple(_slice_keys(x, start, length, row, longest=widest) for x in keys),
                      torch.zeros_like(qpos[row]), length, False)
        o, l = o.reshape(nb, len(cs), *o.shape[1:]), l.reshape(nb, len(cs), *l.shape[1:])
        for i in range(len(cs)):
            if state is None:
                state = (o[:, i], l[:, i])
                bound = chain.unit_roundoff * o[:, i].abs() if chain is not None else None
                continue
            if chain is not None:
                bound = merge_chain_step(*state, o[:, i], l[:, i], bound, chain, engine)
            state = merge_states(*state, o[:, i], l[:, i], dtype, engine)
    merged = merge_states(*state, out, lse, dtype, engine)
    if chain is None:
        return merged
    return (*merged, merge_chain_step(*state, out, lse, bound, chain, engine, last=True))


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
    cp = ra(wp / safe).transpose(-1, -2)[..., None]  # [..., T, H, 1]
    cs = ra(ws / safe).transpose(-1, -2)[..., None]
    out = fp.round_to(ra(ra(prefix_out.to(F64) * cp) + ra(suffix_out.to(F64) * cs)), m_fmt)
    lse = torch.where(both_empty, torch.full_like(m, float("-inf")), ra(ra(engine.log(safe)) + m0))
    return out, lse


def _merge_weights(prefix_lse, suffix_lse, engine):
    """(p, s, m0, cp, cs, both_empty) of one exact merge: the two LSEs (+inf read as -inf), their
    max (0 where both are empty), the normalised weights [..., H, T] (0 for an empty partial)."""
    p = torch.where(prefix_lse == float("inf"), torch.full_like(prefix_lse, float("-inf")), prefix_lse.to(F64))
    s = torch.where(suffix_lse == float("inf"), torch.full_like(suffix_lse, float("-inf")), suffix_lse.to(F64))
    m = torch.maximum(p, s)
    both_empty = m == float("-inf")
    m0 = torch.where(both_empty, torch.zeros_like(m), m)
    wp, ws = engine.exp(p - m0), engine.exp(s - m0)
    safe = torch.where(both_empty, torch.ones_like(wp), wp + ws)
    return p, s, m0, wp / safe, ws / safe, both_empty


def merge_chain_step(prefix_out, prefix_lse, suffix_out, suffix_lse, prefix_bound, partials: fp.Format,
                     engine=EXACT, last: bool = False):
    """[..., T, H, D] float64, absolute: a worst-case bound on how far a correct pipeline's merged
    partial lands from the exact one after merging the next partial, when every partial is
    written in the model format ``partials`` (unit roundoff u_m; vLLM's chunked prefill writes
    each chunk's output and each merged state in the model dtype):

        carried = cp * prefix_bound + cs * u_m |suffix|
        bound   = (1 + u_m) carried + u_m |merged| + u32 * merge_step    (``last``: carried + u32 * merge_step)

    (cp, cs the exact normalised weights; the computed state before its rounding is within
    ``carried`` of the exact ``merged``, hence the (1 + u_m); the ``last`` merge's output is
    not rounded here: the rule's round_row and pt terms carry it). The model-dtype part is a
    worst case, not a probabilistic bound: in a long chain a low-precision running state
    stagnates (an update below half an ulp is lost every time), so its roundings are neither
    independent nor mean-zero, and one pt realisation says little about another pipeline's; the
    bound grows with the number of chunks. The chunk partials' own arithmetic is the pt
    variants' (each chunk is a short pipeline)."""
    p, s, _, cp, cs, _ = _merge_weights(prefix_lse, suffix_lse, engine)
    col = lambda x: x.transpose(-1, -2)[..., None]  # noqa: E731  [..., H, T] -> [..., T, H, 1]
    u = partials.unit_roundoff
    # With one partial empty a merge returns the other exactly (weights 1 and 0): nothing rounds,
    # and a row without context merges nothing in the end (its output's rounding is round_row's).
    has_prefix, has_suffix = col(torch.isfinite(p)), col(torch.isfinite(s))
    both = has_prefix & has_suffix
    written_suffix = both if last else has_suffix
    carried = col(cp) * prefix_bound + torch.where(written_suffix, col(cs) * u * suffix_out.to(F64).abs(), 0.0)
    arithmetic = torch.where(both, fp.FP32.unit_roundoff * merge_step(prefix_out, prefix_lse, suffix_out,
                                                                       suffix_lse, engine), 0.0)
    if last:
        return carried + arithmetic
    merged = col(cp) * prefix_out.to(F64) + col(cs) * suffix_out.to(F64)
    # the computed state is within ``carried`` of the exact one, and rounding it moves it by u of its size
    return torch.where(both, (1 + u) * carried + u * merged.abs(), carried) + arithmetic


def merge_step(prefix_out, prefix_lse, suffix_out, suffix_lse, engine=EXACT):
    """[T, H, D] float64 in units of the float32 unit roundoff: ``output_step``'s bound for the
    merge of two partials (``merge_states``). Each partial's weight exp(lse_i - m) comes from
    one exp off by up to EXP_REL u with its argument rounded twice (the subtraction, the log2(e)
    fold), so eps_i <= u (EXP_REL + 2 |lse_i - m|) and the output moves by at most
    u sum_i c_i w_i (|o_i| + |o|) (c_i the normalised weights); the two-term sum and the
    normalisation add lambda sqrt(2) u (sum_i c_i |o_i| + |o|) + 2 u |o|. Rows whose partials
    are both empty get 0."""
    p, s, m0, cp, cs, both_empty = _merge_weights(prefix_lse, suffix_lse, engine)

    def spread(lse):  # EXP_REL + 2 |lse - m|, 0 where the partial is empty (its weight is 0)
        return torch.where(torch.isfinite(lse), EXP_REL + 2 * (lse - m0).abs(), torch.zeros_like(lse))

    col = lambda x: x.transpose(-1, -2)[..., None]  # noqa: E731  [..., H, T] -> [..., T, H, 1]
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
    return _one_sequence(mla_absorbed_batch, q_nope, q_pe, kv_c, k_pe, w_uk, w_uv, q_offset, scale=scale,
                         causal=causal, dtype=dtype, prescale=prescale, normalise=normalise, engine=engine)


def _one_sequence(batched, q_nope, q_pe, kv_c, k_pe, w_uk, w_uv, q_offset, **kw):
    """An MLA path of one sequence through its batched form (B = 1, nothing padded)."""
    lat = torch.cat([kv_c, k_pe], dim=-1).to(F64)
    qpos = query_positions(q_nope.shape[0], lat.shape[0], q_offset, q_nope.device)[None]
    out, lse = batched(q_nope.to(F64)[None], q_pe.to(F64)[None], lat[None], w_uk.to(F64), w_uv.to(F64), qpos, None,
                       **kw)
    return out[0], lse[0]


def mla_absorbed_batch(q_nope, q_pe, lat, w_uk, w_uv, qpos, key_len=None, *, scale, causal=True,
                       dtype: torch.dtype = F64, prescale: str = "k", normalise: str = "before", engine=EXACT,
                       projections: Optional[torch.dtype] = None):
    """``mla_absorbed`` of B rows at once: q_nope [B, Sq, N, P], q_pe [B, Sq, N, R] at positions
    qpos [B, Sq], the latent lat [B, Sk, L + R] ([kv_c | k_pe]; keys j >= key_len[b] are padding).
    Returns (out [B, Sq, N, V], lse [B, N, Sq]). ``projections``: the dtype ql and o_lat are
    written in (default ``dtype``; a float64 pipeline with model-dtype projections is what every
    implementation computes before its own arithmetic)."""
    m_fmt, a_fmt = _formats(dtype)
    rm = lambda x: fp.round_to(x, m_fmt)  # noqa: E731
    rp = lambda x: fp.round_to(x, _projection_format(dtype, projections))  # noqa: E731
    L = w_uk.shape[0]
    ql = rp(engine.contract("bqnp,lnp->bqnl", q_nope, w_uk, a_fmt))
    q = torch.cat([ql, q_pe], dim=-1)  # [B, Sq, N, L + R]
    kk = rm(lat * scale) if prescale == "k" else lat
    s = rm(engine.contract("bqnd,bkd->bnqk", q, kk, a_fmt))
    if prescale == "scores":
        s = rm(s * scale)
    mask = _key_mask(qpos, lat.shape[1], key_len, causal, None)
    p, lse, e, denom = _softmax(s.masked_fill(~mask, float("-inf")), None, dtype, engine)
    kv_c = lat[..., :L]
    if normalise == "before":
        o_lat = rp(engine.contract("bnqk,bkl->bqnl", p, kv_c, a_fmt))
    else:  # unnormalised exponentials in the model dtype, divided by the float32 sum at the end
        safe = torch.where(denom > 0, denom, torch.ones_like(denom)).transpose(-1, -2)[..., None]
        o_lat = rp(fp.round_to(engine.contract("bnqk,bkl->bqnl", rm(e), kv_c, a_fmt) / safe, _fmt(a_fmt)))
    return rm(engine.contract("bqnl,lnv->bqnv", o_lat, w_uv, a_fmt)), lse


def mla_upproject(kv_c, k_pe, w_uk, w_uv, dtype: torch.dtype = F64, engine=EXACT):
    """Per-head keys [Sk, N, P + R] = [rnd_m(kv_c . w_uk) | k_pe] and values rnd_m(kv_c . w_uv)."""
    k, v = mla_upproject_batch(kv_c.to(F64)[None], k_pe.to(F64)[None], w_uk.to(F64), w_uv.to(F64), dtype, engine)
    return k[0], v[0]


def mla_upproject_batch(kv_c, k_pe, w_uk, w_uv, dtype: torch.dtype = F64, engine=EXACT,
                        projections: Optional[torch.dtype] = None):
    """``mla_upproject`` of B rows: kv_c [B, Sk, L], k_pe [B, Sk, R] -> keys [B, Sk, N, P + R],
    values [B, Sk, N, V], written in ``projections`` (default ``dtype``)."""
    _, a_fmt = _formats(dtype)
    p_fmt = _projection_format(dtype, projections)
    k_nope = fp.round_to(engine.contract("bkl,lnp->bknp", kv_c, w_uk, a_fmt), p_fmt)
    v = fp.round_to(engine.contract("bkl,lnv->bknv", kv_c, w_uv, a_fmt), p_fmt)
    nb, sk, n = k_nope.shape[:3]
    return torch.cat([k_nope, k_pe[:, :, None, :].expand(nb, sk, n, k_pe.shape[-1])], dim=-1), v


def mla_upprojected(q_nope, q_pe, kv_c, k_pe, w_uk, w_uv, *, scale, causal=True, q_offset=None,
                    dtype: torch.dtype = F64, prescale: str = "k", normalise: str = "before", engine=EXACT):
    """Up-projected (prefill) path for one sequence: MHA (``attention``) of [q_nope | q_pe] over
    the up-projected keys and values."""
    return _one_sequence(mla_upprojected_batch, q_nope, q_pe, kv_c, k_pe, w_uk, w_uv, q_offset, scale=scale,
                         causal=causal, dtype=dtype, prescale=prescale, normalise=normalise, engine=engine)


def mla_upprojected_batch(q_nope, q_pe, lat, w_uk, w_uv, qpos, key_len=None, *, scale, causal=True,
                          dtype: torch.dtype = F64, prescale: str = "k", normalise: str = "before", engine=EXACT,
                          projections: Optional[torch.dtype] = None):
    """``mla_upprojected`` of B rows at once (shapes and ``projections`` as ``mla_absorbed_batch``:
    here the up-projected keys and values)."""
    L = w_uk.shape[0]
    k, v = mla_upproject_batch(lat[..., :L], lat[..., L:], w_uk, w_uv, dtype, engine, projections)
    return attention_batch(torch.cat([q_nope, q_pe], dim=-1), k, v, qpos, key_len, scale=scale, causal=causal,
                           dtype=dtype, prescale=prescale, normalise=normalise, engine=engine)


def _projection_format(dtype: torch.dtype, projections: Optional[torch.dtype]) -> Optional[fp.Format]:
    """The format MLA's projections are written in: ``projections``, else the model dtype's."""
    return fp.format_of(dtype if projections is None else projections)


MLA_PATHS = {"absorbed": mla_absorbed, "upprojected": mla_upprojected}
MLA_BATCH_PATHS = {"absorbed": mla_absorbed_batch, "upprojected": mla_upprojected_batch}


def _mla_attend(path: str, w_uk, w_uv, kw: dict):
    """``chunked_context_batch``'s attend for MLA: queries (q_nope, q_pe), keys (latent,)."""
    def attend(queries, keys, qpos, key_len, causal):
        return MLA_BATCH_PATHS[path](*queries, *keys, w_uk, w_uv, qpos, key_len, causal=causal, **kw)
    return attend


def mla_chunked_prefill(q_nope, q_pe, new_kv_c, new_k_pe, ctx_kv_c, ctx_k_pe, w_uk, w_uv, *, scale,
                        chunk_tokens: Optional[int], path: str = "upprojected", dtype: torch.dtype = F64,
                        prescale: str = "k", normalise: str = "before", engine=EXACT):
    """vLLM's prefill with context (reference/mla.py ``chunked_prefill``): the new tokens causal
    over themselves, the context in chunks (non-causal), partials in the model dtype merged in
    order, then merge(prefix=context, suffix=new)."""
    lat = torch.cat([torch.cat([ctx_kv_c, ctx_k_pe], dim=-1), torch.cat([new_kv_c, new_k_pe], dim=-1)]).to(F64)
    n_ctx, sq = ctx_kv_c.shape[0], q_nope.shape[0]
    qpos = query_positions(sq, lat.shape[0], None, q_nope.device)[None]
    lengths = torch.tensor([n_ctx, lat.shape[0]], dtype=torch.int64, device=q_nope.device)
    kw = dict(scale=scale, dtype=dtype, prescale=prescale, normalise=normalise, engine=engine)
    out, lse = chunked_context_batch(_mla_attend(path, w_uk.to(F64), w_uv.to(F64), kw),
                                     (q_nope.to(F64)[None], q_pe.to(F64)[None]), (lat[None],), qpos, lengths[:1],
                                     lengths[1:], chunk_tokens=chunk_tokens, dtype=dtype, engine=engine)
    return out[0], lse[0]


def paged_mla(q_nope, q_pe, kv_cache, w_uk, w_uv, block_table, query_start_loc, seq_lens, *, scale,
              kv_scale=1.0, path="absorbed", dtype: torch.dtype = F64, prescale: str = "k",
              normalise: str = "before", new_kv_c=None,
              new_k_pe=None, context_chunk_tokens: Optional[int] = None, engine=EXACT,
              block_m: Optional[int] = None, with_lse_sensitivity=False, projections: Optional[torch.dtype] = None,
              partials: Optional[torch.dtype] = None):
    """MLA over a paged batch whose latent cache holds every key (reference/mla.py ``paged_mla``).

    ``path``: "absorbed" (one pass over all keys) or "upprojected"; with ``new_kv_c``/``new_k_pe``
    the new tokens come from those instead of the cache, and ``context_chunk_tokens`` chunks the
    context as vLLM's prefill does (``mla_chunked_prefill``); ``block_m`` (FAST engine) takes
    the queries that many at a time and computes blocks of several sequences together (memory and
    launches only); ``projections``: the dtype the path's projections are written in (default
    ``dtype``; ``mla_absorbed_batch``). Returns (out [T, N, V], lse [N, T]) float64, plus
    ``lse_sensitivity`` [N, T] if ``with_lse_sensitivity``: the larger of the two paths' (the
    query operand is [ql | q_pe] over the latent, or [q_nope | q_pe] over the up-projected keys;
    the scores are the same); then the chunked context's ``merge_chain_bound`` [T, N, V] if
    ``partials`` is given (as ``paged_attention``).
    """
    m_fmt, _ = _formats(dtype)
    T, N = q_nope.shape[:2]
    dev = q_nope.device
    out = torch.zeros(T, N, w_uv.shape[-1], dtype=F64, device=dev)
    lse = torch.full((N, T), float("-inf"), dtype=F64, device=dev)
    sensitivity = torch.zeros(N, T, dtype=F64, device=dev)
    chain = _chain_buffer(out, partials, context_chunk_tokens)
    qn, qp = fp.round_to(q_nope.to(F64), m_fmt), fp.round_to(q_pe.to(F64), m_fmt)
    wk, wv = fp.round_to(w_uk.to(F64), m_fmt), fp.round_to(w_uv.to(F64), m_fmt)
    kw = dict(scale=scale, dtype=dtype, prescale=prescale, normalise=normalise, engine=engine, projections=projections)
    new = None if new_kv_c is None else torch.cat([new_kv_c, new_k_pe], dim=-1)
    key_elements = N * (w_uk.shape[2] + q_pe.shape[2] + w_uv.shape[2]) + kv_cache.shape[2]  # up-projected K, V; latent
    for rows in _row_blocks(query_start_loc, seq_lens, block_m, engine, dev, N, key_elements):
        lat = _gather_keys(kv_cache, block_table, rows, kv_scale, m_fmt, new=new)
        index = rows.index
        queries, qpos = (qn[index], qp[index]), rows.positions(index)
        if context_chunk_tokens is not None:
            o, l, *bound = chunked_context_batch(_mla_attend(path, wk, wv, kw), queries, (lat,), qpos, rows.ctx,
                                                 rows.seq_len, chunk_tokens=context_chunk_tokens, dtype=dtype,
                                                 engine=engine, key_elements=key_elements, partials=partials,
                                                 host=rows.host)
            if chain is not None:
                _put_rows(chain, bound[0], rows)
        else:
            o, l = MLA_BATCH_PATHS[path](*queries, lat, wk, wv, qpos, rows.seq_len, causal=True, **kw)
        _put_rows(out, o, rows)
        _put_columns(lse, l, rows)
        if with_lse_sensitivity:
            _put_columns(sensitivity, _mla_lse_sensitivity(*queries, lat, wk, wv, scale, engine, qpos, rows.seq_len),
                         rows)
    return (out, lse) + ((sensitivity,) if with_lse_sensitivity else ()) + ((chain,) if chain is not None else ())


def _mla_lse_sensitivity(q_nope, q_pe, lat, w_uk, w_uv, scale, engine, qpos, key_len):
    """[B, N, Sq]: the larger ``lse_sensitivity`` of the absorbed and the up-projected path."""
    L = w_uk.shape[0]
    ql = engine.contract("bqnp,lnp->bqnl", q_nope, w_uk, None)
    absorbed = lse_sensitivity_batch(torch.cat([ql, q_pe], dim=-1), lat[:, :, None, :], qpos, key_len, scale=scale,
                                     engine=engine)
    k_up, _ = mla_upproject_batch(lat[..., :L], lat[..., L:], w_uk, w_uv, F64, engine)
    up = lse_sensitivity_batch(torch.cat([q_nope, q_pe], dim=-1), k_up, qpos, key_len, scale=scale, engine=engine)
    return torch.maximum(absorbed, up)
