"""Paged-attention decode with split-K partitions and a reduce (the v2 algorithm), Triton.

ROCM_ATTN's decode rows (q_len == 1). On ROCm vLLM runs a HIP kernel of this algorithm; this
Triton version stands in everywhere else.

Layout: query/out ``[T, Hq, D]``; a sequence b is a decode row iff
``query_start_loc[b+1] - query_start_loc[b] == 1`` (other sequences are skipped, so the same
batch can be handed to the prefix-prefill kernel); its query sits at position seq_len - 1 and
every key ``[0, seq_len)`` (the new one included) is read from the paged NHD cache
``[num_blocks, block_size, Hkv, D]`` through ``block_table``. LSE ``[Hq, T]`` (natural log,
sinks excluded).

Stage 1, ``_partition_kernel``: one program per (sequence, KV head, partition of P keys).
The GQA group's query heads are packed as the rows of one tile (padded to >= 16 for
``tl.dot``), keys are gathered BLOCK_N at a time through the block table (any cache block
size), and the program writes its partial output (normalised by its own exp-sum), its max
logit and its exp-sum into a float32 workspace. A partition with no visible key (beyond
seq_len, or entirely before the sliding window) returns without writing.

Stage 2, ``_reduce_kernel``: one program per (sequence, query head) combines the partitions:
``M = max m_p``; ``out = sum_p o_p l_p e^(m_p - M) / (sum_p l_p e^(m_p - M) [+ e^(sink - M)])``.
The -inf guard: only partitions in ``[first, last)`` (those stage 1 wrote) are read; all others
count as max -inf / weight 0. The workspace is NaN-filled by the launcher, so a reduce that
reads a partition stage 1 skipped produces NaN instead of silently reading zeros.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from impl.triton.prefix_prefill import _next_pow2, _check, validate_paged_inputs
from impl.triton.tiles import online_softmax_update, paged_scores

_FP8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


# per-batch integers (block-table width, workspace strides that follow the partition count) are
# not specialised on: one compiled variant per shape, not one per ==1 / multiple-of-16 pattern
@triton.jit(do_not_specialize=["stride_bt", "stride_wb", "stride_wh", "stride_mb", "stride_mh"])
def _partition_kernel(
    q_ptr, k_cache, v_cache, block_table, query_start_loc, seq_lens, alibi_ptr,
    ws_out, ws_max, ws_sum,
    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_bt, stride_wb, stride_wh, stride_wp, stride_mb, stride_mh,
    head_size, block_size, sm_scale, k_scale, softcap, window,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    PARTITION: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    USE_ALIBI: tl.constexpr, IS_FP8: tl.constexpr, DOT_PREC: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)

    q_start = tl.load(query_start_loc + b)
    q_len = tl.load(query_start_loc + b + 1) - q_start
    if q_len != 1:
        return
    seq_len = tl.load(seq_lens + b)
    qpos = seq_len - 1
    key_end = seq_len
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(qpos - window + 1, 0)
    part_lo = tl.maximum(part * PARTITION, lo)
    part_hi = tl.minimum((part + 1) * PARTITION, key_end)
    if part_lo >= part_hi:
        return  # empty partition: nothing written; the reduce must not read it

    r = tl.arange(0, G_PAD)
    r_ok = r < GROUP
    heads = kvh * GROUP + r
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < head_size
    q = tl.load(q_ptr + q_start.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    slope = tl.zeros([G_PAD], dtype=tl.float32)
    if USE_ALIBI:
        slope = tl.load(alibi_ptr + heads, mask=r_ok, other=0.0)

    bt_row = block_table + b.to(tl.int64) * stride_bt
    acc = tl.zeros([G_PAD, D_PAD], dtype=tl.float32)
    m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    qpos_rows = tl.zeros([G_PAD], dtype=tl.int32) + qpos  # every packed row is the same token
    for n0 in range((part_lo // BLOCK_N) * BLOCK_N, part_hi, BLOCK_N):
        kpos = n0 + tl.arange(0, BLOCK_N)
        k_ok = (kpos >= part_lo) & (kpos < part_hi)
        s, v = paged_scores(q, k_cache, v_cache, bt_row, kpos, k_ok, block_size,
                            stride_kb, stride_kt, kvh * stride_kh, stride_vb, stride_vt, kvh * stride_vh,
                            offs_d, d_ok, sm_scale * k_scale, softcap, qpos_rows, slope,
                            USE_SOFTCAP, USE_ALIBI, IS_FP8, DOT_PREC)
        s = tl.where(r_ok[:, None] & k_ok[None, :], s, float("-inf"))
        acc, m_i, l_i = online_softmax_update(acc, m_i, l_i, s, v, True, False, DOT_PREC)

    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    wrow = b.to(tl.int64) * stride_wb + heads.to(tl.int64) * stride_wh + part * stride_wp
    tl.store(ws_out + wrow[:, None] + offs_d[None, :], o, mask=r_ok[:, None] & d_ok[None, :])
    mrow = b.to(tl.int64) * stride_mb + heads.to(tl.int64) * stride_mh + part
    tl.store(ws_max + mrow, m_i, mask=r_ok)
    tl.store(ws_sum + mrow, l_i, mask=r_ok)


@triton.jit(do_not_specialize=["stride_wb", "stride_wh", "stride_mb", "stride_mh", "stride_lh"])
def _reduce_kernel(
    ws_out, ws_max, ws_sum, out_ptr, lse_ptr, query_start_loc, seq_lens, sinks_ptr,
    stride_wb, stride_wh, stride_wp, stride_mb, stride_mh, stride_ot, stride_oh, stride_lh,
    head_size, window, v_scale,
    RED_BLOCK: tl.constexpr, D_PAD: tl.constexpr, PARTITION: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SINKS: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    q_start = tl.load(query_start_loc + b)
    q_len = tl.load(query_start_loc + b + 1) - q_start
    if q_len != 1:
        return
    seq_len = tl.load(seq_lens + b)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    first = lo // PARTITION
    last = tl.cdiv(seq_len, PARTITION)

    # Pass 1: global max over the partitions stage 1 wrote. The -inf guard: a partition
    # outside [first, last) was skipped by stage 1 (empty), so it is never loaded and counts
    # as max -inf / weight 0.
    mrow = b.to(tl.int64) * stride_mb + h * stride_mh
    start = (first // RED_BLOCK) * RED_BLOCK
    m_all = tl.full([RED_BLOCK], float("-inf"), dtype=tl.float32)
    for p0 in range(start, last, RED_BLOCK):
        parts = p0 + tl.arange(0, RED_BLOCK)
        valid = (parts >= first) & (parts < last)
        m_all = tl.maximum(m_all, tl.load(ws_max + mrow + parts, mask=valid, other=float("-inf")))
    m_max = tl.max(m_all, 0)
    m_use = tl.where(m_max == float("-inf"), 0.0, m_max)

    # Pass 2: weights l_p * e^(m_p - M) and the weighted partial outputs.
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < head_size
    wrow = b.to(tl.int64) * stride_wb + h * stride_wh
    # Vector accumulators (loop-carried values keep one shape/type on every Triton version).
    total_v = tl.zeros([RED_BLOCK], dtype=tl.float32)
    num_v = tl.zeros([RED_BLOCK, D_PAD], dtype=tl.float32)
    for p0 in range(start, last, RED_BLOCK):
        parts = p0 + tl.arange(0, RED_BLOCK)
        valid = (parts >= first) & (parts < last)
        m_p = tl.load(ws_max + mrow + parts, mask=valid, other=float("-inf"))
        l_p = tl.load(ws_sum + mrow + parts, mask=valid, other=0.0)
        w_p = tl.where(valid, l_p * tl.exp(m_p - m_use), 0.0)
        o_p = tl.load(ws_out + wrow + parts[:, None] * stride_wp + offs_d[None, :],
                      mask=valid[:, None] & d_ok[None, :], other=0.0)
        total_v += w_p
        num_v += o_p * w_p[:, None]
    total = tl.sum(total_v, 0)
    num = tl.sum(num_v, 0)
    denom = total
    if USE_SINKS:
        denom = total + tl.exp(tl.load(sinks_ptr + h) - m_use)
    out = num * v_scale / tl.where(denom > 0.0, denom, 1.0)
    tl.store(out_ptr + q_start.to(tl.int64) * stride_ot + h * stride_oh + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=d_ok)
    lse = tl.where(total > 0.0, m_use + tl.log(tl.where(total > 0.0, total, 1.0)), float("-inf"))
    tl.store(lse_ptr + h * stride_lh + q_start, lse)


def paged_decode(query, key_cache, value_cache, block_table, query_start_loc, seq_lens, *,
                 scale: float, sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                 alibi_slopes=None, sinks=None, kv_cache_dtype: str = "auto", k_scale: float = 1.0,
                 v_scale: float = 1.0, partition_size: int = 256, max_seq_len: Optional[int] = None,
                 out=None, lse=None, block_n: Optional[int] = None):
    """Decode attention for the sequences with q_len == 1 (others are left untouched).

    ``partition_size`` P (a power of two, multiple of the key tile) keys per stage-1 program.
    Returns ``(out [T,Hq,D], lse [Hq,T])``; fresh ones are zero / -inf initialised.
    """
    T, Hq, Hkv, D = validate_paged_inputs(query, key_cache, value_cache, block_table,
                                          query_start_loc, seq_lens, alibi_slopes, sinks,
                                          sliding_window, softcap, kv_cache_dtype, out, lse)
    is_fp32 = query.dtype == torch.float32
    is_fp8 = key_cache.dtype in _FP8
    if not is_fp8:
        k_scale = v_scale = 1.0
    _check(partition_size >= 16 and partition_size == _next_pow2(partition_size),
           f"partition_size: must be a power of two >= 16, got {partition_size}")
    BLOCK_N = block_n or min(64 if not is_fp32 else 32, partition_size)
    _check(BLOCK_N >= 16 and BLOCK_N == _next_pow2(BLOCK_N) and BLOCK_N <= partition_size,
           f"block_n: must be a power of two in [16, partition_size={partition_size}], got {BLOCK_N}")
    if out is None:
        out = torch.zeros_like(query)
    if lse is None:
        lse = torch.full((Hq, T), float("-inf"), dtype=torch.float32, device=query.device)
    B = seq_lens.shape[0]
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max()) if B else 0
    if T == 0 or max_seq_len == 0:
        return out, lse
    num_parts = triton.cdiv(max_seq_len, partition_size)
    group = Hq // Hkv
    D_PAD = max(16, _next_pow2(D))
    # NaN-filled on purpose: a partition that stage 1 skipped must never be read.
    ws_out = torch.full((B, Hq, num_parts, D_PAD), float("nan"), dtype=torch.float32, device=query.device)
    ws_max = torch.full((B, Hq, num_parts), float("nan"), dtype=torch.float32, device=query.device)
    ws_sum = torch.full_like(ws_max, float("nan"))
    dummy = lse
    _partition_kernel[(B, Hkv, num_parts)](
        query, key_cache, value_cache, block_table, query_start_loc, seq_lens,
        alibi_slopes if alibi_slopes is not None else dummy,
        ws_out, ws_max, ws_sum,
        query.stride(0), query.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), block_table.stride(0),
        ws_out.stride(0), ws_out.stride(1), ws_out.stride(2), ws_max.stride(0), ws_max.stride(1),
        D, key_cache.shape[1], float(scale), float(k_scale),
        float(softcap) if softcap else 1.0, int(sliding_window) if sliding_window else 1,
        GROUP=group, G_PAD=max(16, _next_pow2(group)), D_PAD=D_PAD, BLOCK_N=BLOCK_N,
        PARTITION=partition_size, USE_WINDOW=sliding_window is not None, USE_SOFTCAP=bool(softcap),
        USE_ALIBI=alibi_slopes is not None, IS_FP8=is_fp8, DOT_PREC="ieee" if is_fp32 else "tf32",
        num_warps=4,
    )
    _reduce_kernel[(B, Hq)](
        ws_out, ws_max, ws_sum, out, lse, query_start_loc, seq_lens,
        sinks if sinks is not None else dummy,
        ws_out.stride(0), ws_out.stride(1), ws_out.stride(2), ws_max.stride(0), ws_max.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        D, int(sliding_window) if sliding_window else 1, float(v_scale),
        RED_BLOCK=min(_next_pow2(num_parts), 32), D_PAD=D_PAD, PARTITION=partition_size,
        USE_WINDOW=sliding_window is not None, USE_SINKS=sinks is not None, num_warps=4,
    )
    return out, lse
