"""Prefix-prefill attention (ROCM_ATTN's kernel for rows with q_len > 1), Triton.

Layout: query/out ``[T, Hq, D]`` (varlen, rows of sequence b are
``query_start_loc[b]:query_start_loc[b+1]``); paged NHD cache ``[num_blocks, block_size, Hkv, D]``
addressed through ``block_table [B, max_blocks]``; LSE ``[Hq, T]`` float32 natural log.

Where the keys come from: EVERY key, context and new, is read from the paged cache, so the
caller must write the new K/V first (``cache_ops.reshape_and_cache``). vLLM's kernel reads
the new tokens from the ``key``/``value`` tensors instead; reading the cache means an fp8 cache
shows the new tokens quantised, exactly like the decode kernel and ``reference.paged_attention``.

Tiling: one program per (sequence, block of BLOCK_M query tokens, query head). Two key loops:
the context ``[lo, ctx_len)`` (visible to every query of the block, sliding window aside) and
the new tokens ``[ctx_len, hi)`` under the bottom-right causal mask. Key tiles of BLOCK_N are
gathered token by token through the block table, so any cache block size works (16, 544, ...).
Online softmax in fp32; a fully masked tile is guarded so no ``-inf - -inf`` NaN appears; keys
outside ``[0, seq_len)`` are never loaded (a NaN in an unused cache slot cannot leak).
Head sizes are padded to a power of two with masks; fp32 dots use ``input_precision="ieee"``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from impl.triton.tiles import online_softmax_update, paged_scores

_FP8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
_MODEL = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q, n0, qpos, q_ok, lo, hi,
    k_cache, v_cache, bt_row, stride_kb, stride_kt, stride_vb, stride_vt, kv_head_off_k,
    kv_head_off_v, offs_d, d_ok, block_size, sm_scale, k_scale, softcap, window, slope,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr, IS_FP8: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """One BLOCK_N tile of keys [n0, n0+BLOCK_N) clipped to [lo, hi): online-softmax update."""
    kpos = n0 + tl.arange(0, BLOCK_N)
    k_ok = (kpos >= lo) & (kpos < hi)
    # one query head per program: every row shares the head's ALiBi slope
    s, v = paged_scores(q, k_cache, v_cache, bt_row, kpos, k_ok, block_size,
                        stride_kb, stride_kt, kv_head_off_k, stride_vb, stride_vt, kv_head_off_v,
                        offs_d, d_ok, sm_scale * k_scale, softcap, qpos, slope + 0.0 * qpos,
                        USE_SOFTCAP, USE_ALIBI, IS_FP8, DOT_PREC)
    dist = qpos[:, None] - kpos[None, :]
    visible = q_ok[:, None] & k_ok[None, :]
    if CAUSAL:
        visible = visible & (dist >= 0)
    if USE_WINDOW:
        visible = visible & (dist < window)
    s = tl.where(visible, s, float("-inf"))
    return online_softmax_update(acc, m_i, l_i, s, v, True, False, DOT_PREC)


# per-batch integers (token count in the LSE stride, block-table width) are not specialised on
@triton.jit(do_not_specialize=["stride_lh", "stride_bt"])
def _prefix_prefill_kernel(
    q_ptr, k_cache, v_cache, out_ptr, lse_ptr, block_table, query_start_loc, seq_lens,
    alibi_ptr, sinks_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_lh,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
    head_size, block_size, num_queries_per_kv, sm_scale, k_scale, v_scale, softcap, window,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
    CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    USE_ALIBI: tl.constexpr, USE_SINKS: tl.constexpr, IS_FP8: tl.constexpr,
    DOT_PREC: tl.constexpr, WRITE_LSE: tl.constexpr, SKIP_DECODE: tl.constexpr,
):
    b = tl.program_id(0)
    mblk = tl.program_id(1)
    h = tl.program_id(2)

    q_start = tl.load(query_start_loc + b)
    q_len = tl.load(query_start_loc + b + 1) - q_start
    seq_len = tl.load(seq_lens + b)
    ctx_len = seq_len - q_len
    if SKIP_DECODE:
        if q_len <= 1:
            return
    if mblk * BLOCK_M >= q_len:
        return

    offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = offs_m < q_len
    qpos = ctx_len + offs_m  # bottom-right alignment: last query sits at seq_len - 1
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < head_size

    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=q_ok[:, None] & d_ok[None, :], other=0.0)

    kvh = h // num_queries_per_kv
    bt_row = block_table + b.to(tl.int64) * stride_bt
    slope = 0.0
    if USE_ALIBI:
        slope = tl.load(alibi_ptr + h)

    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Key range this query block can see.
    first_q = ctx_len + mblk * BLOCK_M
    last_q = tl.minimum(first_q + BLOCK_M, seq_len) - 1
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(first_q - window + 1, 0)
    hi = seq_len
    if CAUSAL:
        hi = last_q + 1
    ctx_hi = tl.minimum(ctx_len, hi)

    # Phase 1: cached context (only the sliding window masks it).
    for n0 in range((lo // BLOCK_N) * BLOCK_N, ctx_hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, n0, qpos, q_ok, lo, ctx_hi,
            k_cache, v_cache, bt_row, stride_kb, stride_kt, stride_vb, stride_vt,
            kvh * stride_kh, kvh * stride_vh, offs_d, d_ok, block_size, sm_scale, k_scale,
            softcap, window, slope,
            BLOCK_N, CAUSAL, USE_WINDOW, USE_SOFTCAP, USE_ALIBI, IS_FP8, DOT_PREC)
    # Phase 2: the sequence's new tokens (already written to the cache), causal.
    new_lo = tl.maximum(ctx_len, lo)
    for n0 in range((new_lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, n0, qpos, q_ok, new_lo, hi,
            k_cache, v_cache, bt_row, stride_kb, stride_kt, stride_vb, stride_vt,
            kvh * stride_kh, kvh * stride_vh, offs_d, d_ok, block_size, sm_scale, k_scale,
            softcap, window, slope,
            BLOCK_N, CAUSAL, USE_WINDOW, USE_SOFTCAP, USE_ALIBI, IS_FP8, DOT_PREC)

    has_keys = l_i > 0.0
    denom = l_i
    if USE_SINKS:
        # The sink is one more logit in the denominator only (no value row).
        sink = tl.load(sinks_ptr + h)
        m_safe = tl.where(has_keys, m_i, 0.0)
        denom = l_i + tl.exp(sink - m_safe)
    denom = tl.where(has_keys, denom, 1.0)
    out = acc * (v_scale / denom)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])
    if WRITE_LSE:
        # Sinks excluded from the LSE (reference convention); empty row -> -inf.
        lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + h * stride_lh + q_start + offs_m, lse, mask=q_ok)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def validate_paged_inputs(query, key_cache, value_cache, block_table, query_start_loc, seq_lens,
                          alibi_slopes, sinks, sliding_window, softcap, kv_cache_dtype, out, lse):
    """Shared argument checks (ValueError naming the argument)."""
    _check(isinstance(query, torch.Tensor) and query.dim() == 3,
           f"query: expected [tokens, num_heads, head_size], got {getattr(query, 'shape', None)}")
    _check(query.dtype in _MODEL, f"query: dtype must be float16/bfloat16/float32, got {query.dtype}")
    _check(query.stride(-1) == 1, "query: last dimension must be contiguous")
    T, Hq, D = query.shape
    for name, c in (("key_cache", key_cache), ("value_cache", value_cache)):
        _check(isinstance(c, torch.Tensor) and c.dim() == 4,
               f"{name}: expected NHD [num_blocks, block_size, num_kv_heads, head_size], "
               f"got {getattr(c, 'shape', None)}")
        _check(c.shape[3] == D, f"{name}: head_size {c.shape[3]} differs from query's {D}")
        _check(c.stride(-1) == 1, f"{name}: last dimension must be contiguous")
        _check(c.device == query.device, f"{name}: on {c.device}, query on {query.device}")
    _check(key_cache.shape == value_cache.shape,
           f"value_cache: shape {tuple(value_cache.shape)} differs from key_cache {tuple(key_cache.shape)}")
    Hkv = key_cache.shape[2]
    _check(Hq % Hkv == 0, f"key_cache: num_kv_heads {Hkv} must divide num_heads {Hq}")
    if kv_cache_dtype == "auto":
        _check(key_cache.dtype == query.dtype and value_cache.dtype == query.dtype,
               f"key_cache: kv_cache_dtype 'auto' needs dtype {query.dtype}, got {key_cache.dtype}")
    else:
        want = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e4m3fnuz": torch.float8_e4m3fnuz}.get(kv_cache_dtype)
        _check(want is not None,
               f"kv_cache_dtype: expected 'auto', 'fp8_e4m3fn' or 'fp8_e4m3fnuz', got {kv_cache_dtype!r}")
        _check(key_cache.dtype == want and value_cache.dtype == want,
               f"key_cache: kv_cache_dtype {kv_cache_dtype} needs dtype {want}, got {key_cache.dtype}")
    for name, t in (("block_table", block_table), ("query_start_loc", query_start_loc),
                    ("seq_lens", seq_lens)):
        _check(isinstance(t, torch.Tensor) and t.dtype in (torch.int32, torch.int64),
               f"{name}: expected an int32/int64 tensor, got {getattr(t, 'dtype', type(t))}")
        _check(t.device == query.device, f"{name}: on {t.device}, query on {query.device}")
    _check(block_table.dim() == 2 and block_table.stride(1) == 1,
           f"block_table: expected a row-major [num_seqs, max_blocks] tensor, got {tuple(block_table.shape)}")
    B = seq_lens.shape[0]
    _check(query_start_loc.shape == (B + 1,),
           f"query_start_loc: expected [{B + 1}] (num_seqs + 1), got {tuple(query_start_loc.shape)}")
    _check(block_table.shape[0] == B, f"block_table: expected {B} rows, got {block_table.shape[0]}")
    for name, t in (("alibi_slopes", alibi_slopes), ("sinks", sinks)):
        if t is not None:
            _check(t.shape == (Hq,) and t.dtype == torch.float32 and t.device == query.device,
                   f"{name}: expected float32 [{Hq}] on {query.device}, got {t.dtype} {tuple(t.shape)}")
    if sliding_window is not None:
        _check(int(sliding_window) >= 1, f"sliding_window: must be >= 1 keys, got {sliding_window}")
    if softcap is not None:
        _check(softcap > 0, f"softcap: must be > 0 or None, got {softcap}")
    if out is not None:
        _check(out.shape == query.shape and out.dtype == query.dtype and out.stride(-1) == 1,
               f"out: expected {query.dtype} {tuple(query.shape)} with a contiguous last dim, "
               f"got {out.dtype} {tuple(out.shape)}")
    if lse is not None:
        _check(lse.shape == (Hq, T) and lse.dtype == torch.float32 and lse.stride(1) == 1,
               f"lse: expected float32 [{Hq}, {T}] row-major, got {lse.dtype} {tuple(lse.shape)}")
    return T, Hq, Hkv, D


def prefix_prefill(query, key_cache, value_cache, block_table, query_start_loc, seq_lens, *,
                   scale: float, causal: bool = True, sliding_window: Optional[int] = None,
                   softcap: Optional[float] = None, alibi_slopes=None, sinks=None,
                   kv_cache_dtype: str = "auto", k_scale: float = 1.0, v_scale: float = 1.0,
                   skip_decode: bool = True, max_query_len: Optional[int] = None,
                   out=None, lse=None, block_m: Optional[int] = None,
                   block_n: Optional[int] = None):
    """Attention of the query rows of every sequence with q_len > 1 (all rows when
    ``skip_decode=False``) over its keys ``[0, seq_len)`` in the paged cache.

    Rows of skipped sequences are left untouched in ``out``/``lse`` (so a decode kernel can
    fill them). Returns ``(out [T,Hq,D] in query dtype, lse [Hq,T] float32)``; a fresh ``out``
    /``lse`` is zero / -inf initialised. ``block_m``/``block_n`` (powers of two >= 16) override
    the tile sizes.
    """
    T, Hq, Hkv, D = validate_paged_inputs(query, key_cache, value_cache, block_table,
                                          query_start_loc, seq_lens, alibi_slopes, sinks,
                                          sliding_window, softcap, kv_cache_dtype, out, lse)
    is_fp32 = query.dtype == torch.float32
    is_fp8 = key_cache.dtype in _FP8
    if not is_fp8:  # a cache in the model dtype has no scale (identity), whatever was passed
        k_scale = v_scale = 1.0
    BLOCK_M = block_m or 16
    BLOCK_N = block_n or (32 if is_fp32 or D > 128 else 64)
    for name, v in (("block_m", BLOCK_M), ("block_n", BLOCK_N)):
        _check(v >= 16 and v == _next_pow2(v), f"{name}: must be a power of two >= 16, got {v}")
    D_PAD = max(16, _next_pow2(D))
    if out is None:
        out = torch.zeros_like(query)
    if lse is None:
        lse = torch.full((Hq, T), float("-inf"), dtype=torch.float32, device=query.device)
    B = seq_lens.shape[0]
    if max_query_len is None:
        qsl = query_start_loc
        max_query_len = int((qsl[1:] - qsl[:-1]).max()) if B else 0
    if T == 0 or max_query_len == 0:
        return out, lse
    dummy = lse  # stands in for absent optional pointers (never dereferenced)
    grid = (B, triton.cdiv(max_query_len, BLOCK_M), Hq)
    _prefix_prefill_kernel[grid](
        query, key_cache, value_cache, out, lse, block_table, query_start_loc, seq_lens,
        alibi_slopes if alibi_slopes is not None else dummy,
        sinks if sinks is not None else dummy,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), lse.stride(0),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), block_table.stride(0),
        D, key_cache.shape[1], Hq // Hkv, float(scale), float(k_scale), float(v_scale),
        float(softcap) if softcap else 1.0, int(sliding_window) if sliding_window else 1,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, D_PAD=D_PAD,
        CAUSAL=bool(causal), USE_WINDOW=sliding_window is not None,
        USE_SOFTCAP=bool(softcap), USE_ALIBI=alibi_slopes is not None,
        USE_SINKS=sinks is not None, IS_FP8=is_fp8, DOT_PREC="ieee" if is_fp32 else "tf32",
        WRITE_LSE=True, SKIP_DECODE=bool(skip_decode),
        num_warps=4,
    )
    return out, lse
