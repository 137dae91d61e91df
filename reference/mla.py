"""DeepSeek-style Multi-head Latent Attention (MLA), the two ways vLLM computes it.

Notation (vllm-backends.md 4.3, DeepSeek-V3 sizes in brackets): N heads, latent rank L [512],
rope dim R [64], nope dim P [128], value dim V [128]. One cache entry per token is the latent
``[kv_c (L) | k_pe (R)]`` [576]; ``w_uk [L, N, P]`` and ``w_uv [L, N, V]`` are the two halves of
``kv_b_proj``. Per head h and query t:

    k_nope[s, h] = kv_c[s] @ w_uk[:, h]          v[s, h] = kv_c[s] @ w_uv[:, h]
    score[t, s]  = scale * (q_nope[t, h] . k_nope[s, h] + q_pe[t, h] . k_pe[s])
    out[t, h]    = sum_s softmax_s(score)[t, s] * v[s, h]

* up-projected path (vLLM prefill): build k = [k_nope | k_pe] (qk dim P + R [192]) and v per
  head, then ordinary MHA;
* absorbed path (vLLM decode): ``ql = q_nope[t, h] @ w_uk[:, h]^T`` lives in latent space, so
  ``q_nope . k_nope = ql . kv_c``: MQA of the 576-wide query ``[ql | q_pe]`` over the latent
  cache with V = kv_c, then ``out = o_latent @ w_uv[:, h]``.

The two are the same sum in a different order, so in float64 they agree to rounding
(tests/reference/test_mla.py). The scale is an input (the layer's ``1/sqrt(P + R)`` times the
YaRN ``mscale**2``; see ``softmax_scale``); it is never derived from the 576-wide cache entry
(vLLM PR #41569 was exactly that bug).

Every function computes in the dtype of the tensors it is given: pass float64 for the oracle,
the model dtype for the "pt" low-precision path that sets error budgets (``lowp=True`` chooses
FlashAttention's pt operation order: K pre-scaled, probabilities rounded to the input dtype,
intermediate results such as ``ql``, the latent output and context-chunk partials rounded like
an implementation that stores them in the model dtype). Budgets: a backend may legitimately run
any row down either path (ROCM_AITER_MLA sends spec-decode rows down the absorbed path, TRITON_MLA
the same rows down the up-projected one), so a row's budget is the larger of the two
low-precision paths' errors against the float64 reference.

Causal masking is bottom-right aligned: query i of a sequence with Sq queries and Sk keys sits at
position Sk - Sq + i and sees keys <= that position. A row with no visible key gives output 0 and
LSE -inf. LSE is natural log, layout [N, Sq].

fp8 latent cache: stored = clamp(x.float() / kv_scale, +-max) rounded to nearest even, read =
stored.float() * kv_scale (the MHA convention, impl/batch.py). vLLM's prefill attends over the new
tokens' own (unquantised) latent and over the *dequantised* cached context, while decode reads every
key from the cache; ``paged_mla(new_kv_c=..., new_k_pe=...)`` models the former.

Imports nothing of this project (the reference is an independent oracle).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from reference import fp

_FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e4m3fnuz: 240.0}

# Query rows per block in the one-sequence kernels; bounds the [N, rows, Sk] score tensor so a
# float64 reference over 20000+ keys stays within a few hundred MB.
_SCORE_ELEMS = 1 << 25


# ---- scale -----------------------------------------------------------------------------------

def yarn_mscale(scaling_factor: float, mscale: float = 1.0) -> float:
    """DeepSeek's YaRN attention-magnitude correction: 0.1 * mscale * ln(factor) + 1 (1 if factor <= 1)."""
    if scaling_factor <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(scaling_factor) + 1.0


def softmax_scale(qk_head_dim: int = 192, rope_factor: Optional[float] = None,
                  mscale_all_dim: float = 1.0) -> float:
    """The MLA layer scale: ``qk_head_dim ** -0.5`` times ``yarn_mscale(factor, mscale_all_dim) ** 2``.

    DeepSeek-V3 (qk 128 + 64, YaRN factor 40, mscale_all_dim 1.0) gives 0.1352... The 576-wide
    cache entry never enters the scale.
    """
    s = 1.0 / math.sqrt(qk_head_dim)
    if rope_factor is not None:
        m = yarn_mscale(rope_factor, mscale_all_dim)
        s *= m * m
    return s


# ---- fp8 latent cache --------------------------------------------------------------------------

def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in _FP8_MAX


def quantize_fp8(x: torch.Tensor, scale: float, fp8_dtype: torch.dtype) -> torch.Tensor:
    """fl32(x / scale) clamped to +-max and rounded to nearest even in ``fp8_dtype``
    (reference.fp.quantize_fp8: the rounding written out, not torch's cast)."""
    if fp8_dtype not in _FP8_MAX:
        raise ValueError(f"fp8_dtype: expected float8_e4m3fn or float8_e4m3fnuz, got {fp8_dtype}")
    return fp.quantize_fp8(x, float(scale), fp.format_of(fp8_dtype)).to(fp8_dtype)  # exact: representable


def dequantize(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """fp8 -> ``x.to(dtype) * scale``; any other dtype is just cast (the scale applies to fp8 only)."""
    if is_fp8(x.dtype):
        return x.to(dtype) * scale
    return x.to(dtype)


def write_latent(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, kv_scale: float = 1.0) -> None:
    """Write ``[kv_c | k_pe]`` of each new token into ``kv_cache [nb, bs, L + R]`` in place."""
    latent = torch.cat([kv_c, k_pe], dim=-1)
    if is_fp8(kv_cache.dtype):
        latent = quantize_fp8(latent, kv_scale, kv_cache.dtype)
    else:
        latent = latent.to(kv_cache.dtype)
    flat = kv_cache.view(-1, kv_cache.shape[-1])
    flat[slot_mapping.long()] = latent


def gather_latent(kv_cache: torch.Tensor, block_table_row: torch.Tensor, start: int, end: int,
                  *, kv_scale: float = 1.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Latent entries of positions ``start..end-1`` of one sequence, dequantised: ``[n, L + R]``."""
    bs = kv_cache.shape[1]
    pos = torch.arange(start, end, device=kv_cache.device)
    blocks = block_table_row.to(kv_cache.device).long()[pos // bs]
    return dequantize(kv_cache[blocks, pos % bs], kv_scale, dtype)


# ---- one-sequence attention -------------------------------------------------------------------

def _visible(sq: int, sk: int, causal: bool, q_offset: Optional[int], device) -> torch.Tensor:
    """[sq, sk] bool: key j visible to query i (bottom-right causal unless q_offset given)."""
    if not causal:
        return torch.ones(sq, sk, dtype=torch.bool, device=device)
    first = (sk - sq) if q_offset is None else q_offset
    qpos = first + torch.arange(sq, device=device)
    return torch.arange(sk, device=device)[None, :] <= qpos[:, None]


def _softmax_rows(scores: torch.Tensor, visible: torch.Tensor, lowp: bool):
    """scores [N, sq, sk] (already scaled) -> probabilities in scores' dtype, lse [N, sq] (>= fp32).

    Rows with no visible key: probabilities 0, LSE -inf.
    """
    acc = torch.promote_types(scores.dtype, torch.float32)
    s = scores.to(acc).masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    finite = torch.isfinite(lse)
    p = torch.exp(s - torch.where(finite, lse, torch.zeros_like(lse))[..., None])
    p = torch.where(finite[..., None], p, torch.zeros_like(p))
    if lowp:
        p = p.to(scores.dtype)
    return p, lse


def _row_blocks(n_heads: int, sq: int, sk: int):
    rows = max(1, _SCORE_ELEMS // max(1, n_heads * sk))
    for a in range(0, sq, rows):
        yield a, min(sq, a + rows)


def absorbed_attention(q_nope, q_pe, kv_c, k_pe, w_uk, w_uv, *, scale: float, causal: bool = True,
                       q_offset: Optional[int] = None, lowp: bool = False,
                       return_latent: bool = False):
    """Absorbed (decode) path for one sequence.

    q_nope [Sq, N, P], q_pe [Sq, N, R], kv_c [Sk, L], k_pe [Sk, R], w_uk [L, N, P], w_uv [L, N, V]
    -> out [Sq, N, V], lse [N, Sq] (and the latent output [Sq, N, L] if ``return_latent``).
    All in the dtype of q_nope (LSE in at least float32).
    """
    dt = q_nope.dtype
    ql = torch.einsum("qnp,lnp->qnl", q_nope, w_uk.to(dt))  # [Sq, N, L]
    q = torch.cat([ql, q_pe.to(dt)], dim=-1)  # [Sq, N, L + R]
    lat = torch.cat([kv_c, k_pe], dim=-1).to(dt)  # [Sk, L + R]
    sq, n = q.shape[:2]
    sk = lat.shape[0]
    visible = _visible(sq, sk, causal, q_offset, q.device)
    k_scaled = lat * scale if lowp else lat
    o_lat = torch.empty(sq, n, kv_c.shape[1], dtype=dt, device=q.device)
    lse = torch.empty(n, sq, dtype=torch.promote_types(dt, torch.float32), device=q.device)
    for a, b in _row_blocks(n, sq, sk):
        scores = torch.einsum("qnd,kd->nqk", q[a:b], k_scaled)
        if not lowp:
            scores = scores * scale
        p, lse[:, a:b] = _softmax_rows(scores, visible[a:b], lowp)
        o_lat[a:b] = torch.einsum("nqk,kl->qnl", p.to(dt), kv_c.to(dt))
    out = torch.einsum("qnl,lnv->qnv", o_lat, w_uv.to(dt))
    return (out, lse, o_lat) if return_latent else (out, lse)


def upprojected_attention(q_nope, q_pe, kv_c, k_pe, w_uk, w_uv, *, scale: float, causal: bool = True,
                          q_offset: Optional[int] = None, lowp: bool = False):
    """Up-projected (prefill) path for one sequence: MHA with k = [kv_c@w_uk | k_pe] (qk P + R), v = kv_c@w_uv.

    Same shapes and return as ``absorbed_attention`` (without the latent).
    """
    dt = q_nope.dtype
    kv_c = kv_c.to(dt)
    k_nope = torch.einsum("kl,lnp->knp", kv_c, w_uk.to(dt))  # [Sk, N, P]
    v = torch.einsum("kl,lnv->knv", kv_c, w_uv.to(dt))  # [Sk, N, V]
    sk, n = k_nope.shape[:2]
    k = torch.cat([k_nope, k_pe.to(dt)[:, None, :].expand(sk, n, k_pe.shape[-1])], dim=-1)
    q = torch.cat([q_nope, q_pe.to(dt)], dim=-1)  # [Sq, N, P + R]
    sq = q.shape[0]
    visible = _visible(sq, sk, causal, q_offset, q.device)
    k_scaled = k * scale if lowp else k
    out = torch.empty(sq, n, v.shape[-1], dtype=dt, device=q.device)
    lse = torch.empty(n, sq, dtype=torch.promote_types(dt, torch.float32), device=q.device)
    for a, b in _row_blocks(n, sq, sk):
        scores = torch.einsum("qnd,knd->nqk", q[a:b], k_scaled)
        if not lowp:
            scores = scores * scale
        p, lse[:, a:b] = _softmax_rows(scores, visible[a:b], lowp)
        out[a:b] = torch.einsum("nqk,knv->qnv", p.to(dt), v)
    return out, lse


_PATHS = {"absorbed": absorbed_attention, "upprojected": upprojected_attention}


def merge_states(prefix_out, prefix_lse, suffix_out, suffix_lse):
    """vLLM ``merge_attn_states`` math (LSE [N, T], +inf read as -inf, both -inf -> out 0, lse -inf).

    Computed in at least float32; the output keeps prefix_out's dtype.
    """
    acc = torch.promote_types(prefix_lse.dtype, torch.float32)
    p = prefix_lse.to(acc)
    s = suffix_lse.to(acc)
    p = torch.where(p == float("inf"), torch.full_like(p, float("-inf")), p)
    s = torch.where(s == float("inf"), torch.full_like(s, float("-inf")), s)
    m = torch.maximum(p, s)
    both_empty = m == float("-inf")
    m0 = torch.where(both_empty, torch.zeros_like(m), m)
    wp, ws = torch.exp(p - m0), torch.exp(s - m0)
    tot = wp + ws
    safe = torch.where(both_empty, torch.ones_like(tot), tot)
    cp = (wp / safe).transpose(0, 1)[..., None]  # [T, N, 1]
    cs = (ws / safe).transpose(0, 1)[..., None]
    out = prefix_out.to(acc) * cp + suffix_out.to(acc) * cs
    lse = torch.where(both_empty, torch.full_like(m, float("-inf")), torch.log(safe) + m0)
    return out.to(prefix_out.dtype), lse


def chunked_prefill(q_nope, q_pe, new_kv_c, new_k_pe, ctx_kv_c, ctx_k_pe, w_uk, w_uv, *, scale: float,
                    chunk_tokens: Optional[int], path: str = "upprojected", lowp: bool = False):
    """vLLM's prefill with context: new tokens causal over themselves, the context in chunks of
    ``chunk_tokens`` (non-causal, with LSE), chunk results merged in order, then
    ``merge(prefix=context, suffix=new)``. ``chunk_tokens=None`` = the context in one chunk.
    Equals one-pass attention over ``[context | new]`` up to rounding.
    """
    attend = _PATHS[path]
    out, lse = attend(q_nope, q_pe, new_kv_c, new_k_pe, w_uk, w_uv, scale=scale, causal=True, lowp=lowp)
    n_ctx = ctx_kv_c.shape[0]
    if n_ctx == 0:
        return out, lse
    step = n_ctx if not chunk_tokens else int(chunk_tokens)
    if step < 1:
        raise ValueError(f"chunk_tokens: expected a positive number of tokens or None, got {chunk_tokens}")
    ctx_out = ctx_lse = None
    for a in range(0, n_ctx, step):
        o, l = attend(q_nope, q_pe, ctx_kv_c[a:a + step], ctx_k_pe[a:a + step], w_uk, w_uv,
                      scale=scale, causal=False, lowp=lowp)
        if ctx_out is None:
            ctx_out, ctx_lse = o, l
        else:
            ctx_out, ctx_lse = merge_states(ctx_out, ctx_lse, o, l)
    return merge_states(ctx_out, ctx_lse, out, lse)


# ---- whole paged batch ---------------------------------------------------------------------

def cheaper_path(sq: int, sk: int, n: int, L: int, R: int, P: int, V: int) -> str:
    """The path with fewer multiply-adds for one sequence (both give the same float64 result):
    absorbed ~ Sq*N*(P*L + Sk*(2L + R) + L*V); up-projected ~ Sk*N*L*(P + V) + Sq*N*Sk*(P + R + V).
    Long prefills favour the up-projected path (qk 192 instead of 576), decodes the absorbed one."""
    absorbed = sq * n * (P * L + sk * (2 * L + R) + L * V)
    up = sk * n * L * (P + V) + sq * n * sk * (P + R + V)
    return "absorbed" if absorbed <= up else "upprojected"


def paged_mla(q_nope, q_pe, kv_cache, w_uk, w_uv, block_table, query_start_loc, seq_lens, *,
              scale: float, kv_scale: float = 1.0, path: str = "absorbed",
              compute_dtype: torch.dtype = torch.float64, lowp: bool = False,
              new_kv_c: Optional[torch.Tensor] = None, new_k_pe: Optional[torch.Tensor] = None,
              context_chunk_tokens: Optional[int] = None):
    """MLA over a paged batch whose cache already holds every key (context and new).

    q_nope [T, N, P], q_pe [T, N, R], kv_cache [nb, bs, L + R] (model dtype or fp8 with
    ``kv_scale``), block_table [B, max_blocks], query_start_loc [B + 1], seq_lens [B].
    ``path``: "absorbed", "upprojected" or "auto" (the cheaper one per sequence, for the float64
    oracle on long contexts). With ``new_kv_c``/``new_k_pe`` ([T, L], [T, R]) the
    new tokens' keys come from those (vLLM's prefill) and only the context from the cache.
    ``context_chunk_tokens`` splits the context as ``chunked_prefill`` does (None = one pass).
    ``lowp=True`` is the pt path: math in ``compute_dtype`` with FlashAttention's pt ordering.
    Returns out [T, N, V] in compute_dtype and lse [N, T].
    """
    if path not in _PATHS and path != "auto":
        raise ValueError(f"path: expected 'absorbed', 'upprojected' or 'auto', got {path!r}")
    if (new_kv_c is None) != (new_k_pe is None):
        raise ValueError("new_kv_c/new_k_pe: give both or neither")
    L = w_uk.shape[0]
    T, N = q_nope.shape[:2]
    V = w_uv.shape[-1]
    dt = compute_dtype
    qn, qp = q_nope.to(dt), q_pe.to(dt)
    wk, wv = w_uk.to(dt), w_uv.to(dt)
    out = torch.zeros(T, N, V, dtype=dt, device=q_nope.device)
    lse = torch.full((N, T), float("-inf"), dtype=torch.promote_types(dt, torch.float32), device=q_nope.device)
    qsl = [int(x) for x in query_start_loc.tolist()]
    for b, s_len in enumerate(int(x) for x in seq_lens.tolist()):
        a, e = qsl[b], qsl[b + 1]
        ctx = s_len - (e - a)
        if new_kv_c is None:
            lat = gather_latent(kv_cache, block_table[b], 0, s_len, kv_scale=kv_scale, dtype=dt)
            ctx_lat, new_lat = lat[:ctx], lat[ctx:]
        else:
            ctx_lat = gather_latent(kv_cache, block_table[b], 0, ctx, kv_scale=kv_scale, dtype=dt)
            new_lat = torch.cat([new_kv_c[a:e], new_k_pe[a:e]], dim=-1).to(dt)
        p = path if path != "auto" else cheaper_path(e - a, s_len, N, L, q_pe.shape[-1], q_nope.shape[-1], V)
        if context_chunk_tokens is None:
            lat = torch.cat([ctx_lat, new_lat], dim=0)
            o, l = _PATHS[p](qn[a:e], qp[a:e], lat[:, :L], lat[:, L:], wk, wv,
                             scale=scale, causal=True, lowp=lowp)
        else:
            o, l = chunked_prefill(qn[a:e], qp[a:e], new_lat[:, :L], new_lat[:, L:], ctx_lat[:, :L],
                                   ctx_lat[:, L:], wk, wv, scale=scale, chunk_tokens=context_chunk_tokens,
                                   path=p, lowp=lowp)
        out[a:e] = o
        lse[:, a:e] = l
    return out, lse
