"""Tile helpers shared by the project's Triton attention kernels.

Every kernel here walks the keys of a sequence in tiles of BLOCK_N and keeps an online softmax
(running max ``m``, running exp-sum ``l`` and an unnormalised fp32 accumulator ``acc`` per query
row). The pieces that are the same in every kernel live here once:

* ``tanh``: softcap's tanh without libdevice (the interpreter has none);
* ``paged_rows``: where key positions live in a paged NHD cache (block, offset within it);
* ``paged_scores``: gather a K/V tile of one KV head through the block table and compute the
  scaled, soft-capped, ALiBi-biased score tile in natural units (masks are the caller's: each
  kernel knows its own visibility rule);
* ``online_softmax_update``: fold one score tile and its V tile into (acc, m, l).

Conventions: rows of a tile are query rows (tokens, or the GQA heads of one token), columns are
keys. A masked score is -inf; a row that has seen no key yet keeps ``m = -inf`` and the update
shifts by 0 instead of -inf so no ``-inf - -inf`` NaN appears. Masked K/V rows load as 0, so NaN
poison in unused cache slots never reaches P.V.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    # Odd series near 0 (the exp form loses relative accuracy there), exp form elsewhere; for
    # large |x| exp(-2|x|) underflows to 0 and the result saturates to +-1.
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = a * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    t = tl.where(a < 0.2, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def paged_rows(bt_row, kpos, k_ok, block_size):
    """(block, offset) of key positions ``kpos`` through one block-table row; masked keys -> block 0."""
    blk = tl.load(bt_row + kpos // block_size, mask=k_ok, other=0).to(tl.int64)
    within = (kpos % block_size).to(tl.int64)
    return blk, within


@triton.jit
def paged_scores(q, k_cache, v_cache, bt_row, kpos, k_ok, block_size,
                 stride_kb, stride_kt, kv_head_off_k, stride_vb, stride_vt, kv_head_off_v,
                 offs_d, d_ok, qk_scale, softcap, qpos_rows, slope_rows,
                 USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr, IS_FP8: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    """Score tile ``[rows, BLOCK_N]`` (natural units, unmasked) and the V tile ``[BLOCK_N, D]``.

    ``q`` is ``[rows, D]`` in the model dtype; ``qk_scale`` is the softmax scale times the fp8
    k scale (e4m3 values are exact in the model dtype, so the scale is applied to the scores,
    never rounded into K). ALiBi uses each row's query position and slope.
    """
    blk, within = paged_rows(bt_row, kpos, k_ok, block_size)
    ld = k_ok[:, None] & d_ok[None, :]
    k = tl.load(k_cache + blk[:, None] * stride_kb + within[:, None] * stride_kt + kv_head_off_k
                + offs_d[None, :], mask=ld, other=0.0)
    v = tl.load(v_cache + blk[:, None] * stride_vb + within[:, None] * stride_vt + kv_head_off_v
                + offs_d[None, :], mask=ld, other=0.0)
    if IS_FP8:
        k = k.to(tl.float32).to(q.dtype)
        v = v.to(tl.float32).to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if USE_SOFTCAP:
        s = softcap * tanh(s / softcap)
    if USE_ALIBI:
        dist = tl.abs(qpos_rows[:, None] - kpos[None, :]).to(tl.float32)
        s = s - slope_rows[:, None] * dist
    return s, v


@triton.jit
def online_softmax_update(acc, m_i, l_i, s, v, GUARD: tl.constexpr, EXP2: tl.constexpr,
                          DOT_PREC: tl.constexpr):
    """Fold score tile ``s`` (-inf = masked; log2 units when EXP2) and ``v`` into (acc, m, l).

    ``GUARD=False`` is for tiles where every row is known to see at least one key (no -inf
    shift can occur), which saves a select per row on the GPU.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if GUARD:
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        shift = m_new
    if EXP2:
        p = tl.exp2(s - shift[:, None])
        alpha = tl.exp2(m_i - shift)
    else:
        p = tl.exp(s - shift[:, None])
        alpha = tl.exp(m_i - shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, m_new, l_i
