"""The low-precision "pt" path (FlashAttention's ``upcast=False, reorder_ops=True``).

Same masks and knobs as reference.mha, but the math is done in the input dtype the way a
framework would, with K pre-scaled by ``scale`` (reordering the operations changes the rounding,
not the math). Every step is rounded to the input dtype: K*scale, the scores, the softcap, the
ALiBi bias, the softmax probabilities, and P @ V. Its distance from the float64 reference is the
error budget a kernel is allowed (DESIGN.md "Pass/fail rule"); it is never itself an oracle.

The LSE is reduced in at least float32 from the rounded low-precision scores (kernels keep
LSE in float32). Sinks join the softmax as one extra logit column (rounded to the dtype) that is
dropped afterwards; the LSE excludes them. Empty rows give output 0 and LSE -inf.
"""

from __future__ import annotations

from typing import Optional

import torch

from reference.mha import (alibi_bias, apply_softcap, check_paged, check_qkv, empty_result, grouped_pv,
                           grouped_scores, query_positions, visible)
from reference.paged import gather_kv


def _softmax_with_sinks(s: torch.Tensor, sinks: Optional[torch.Tensor]) -> torch.Tensor:
    """softmax over keys in the scores' dtype; a sink is an extra column, dropped after."""
    if sinks is None:
        return torch.softmax(s, dim=-1)
    hq, m, _ = s.shape
    sink_col = sinks.to(device=s.device, dtype=s.dtype)[:, None, None].expand(hq, m, 1)
    return torch.softmax(torch.cat([s, sink_col], dim=-1), dim=-1)[..., :-1]


def attention_lowp(q, k, v, *, scale, causal=True, sliding_window=None, softcap=None, alibi_slopes=None,
                   sinks=None, q_offset=None, reorder=True):
    """(out [Sq, Hq, Dv] in q.dtype, lse [Hq, Sq] in max(q.dtype, float32)).

    ``reorder=True`` pre-scales K (FlashAttention's ``reorder_ops``); ``reorder=False`` scales
    the rounded scores instead, as most kernels do. Both are the same math in the input dtype.
    """
    check_qkv(q, k, v, alibi_slopes, sinks, sliding_window, softcap)
    dtype = q.dtype
    lse_dtype = torch.promote_types(dtype, torch.float32)
    sq, sk, dv = q.shape[0], k.shape[0], v.shape[2]
    if sk == 0 or sq == 0:
        out, lse = empty_result(q, k.shape[1], dv)
        return out, lse.to(lse_dtype)
    qpos = query_positions(sq, sk, q_offset, q.device)
    kpos = torch.arange(sk, device=q.device)

    if reorder:
        s = grouped_scores(q, k * scale)  # reorder ops: scale K (rounded), not the scores
    else:
        s = grouped_scores(q, k) * scale  # scale the rounded scores (rounded again)
    s = apply_softcap(s, softcap)
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes.to(q.device), qpos, kpos, dtype)
    mask = visible(qpos, kpos, causal, sliding_window)
    s = s.masked_fill(~mask, float("-inf"))

    lse = torch.logsumexp(s.to(lse_dtype), dim=-1)  # -inf for an empty row
    p = _softmax_with_sinks(s, sinks)
    empty_row = ~mask.any(dim=-1)  # softmax of all -inf is NaN: such rows give 0
    p = p.masked_fill(empty_row[None, :, None], 0.0)
    out = grouped_pv(p, v)
    return out.permute(1, 0, 2).contiguous(), lse


def paged_attention_lowp(query, key_cache, value_cache, block_table, query_start_loc, seq_lens, *, scale,
                         causal=True, sliding_window=None, softcap=None, alibi_slopes=None, sinks=None,
                         k_scale=1.0, v_scale=1.0, dtype: Optional[torch.dtype] = None,
                         block_m: Optional[int] = None, reorder: bool = True):
    """``attention_lowp`` over a paged batch, in the model ``dtype`` (default: query's dtype).

    fp8 caches are dequantised to the model dtype first (stored.to(dtype) * scale, rounded).
    ``block_m`` splits each sequence's queries into chunks to bound memory; rows are
    independent, so this does not change the math. Returns (out [T, Hq, Dv] in dtype,
    lse [Hq, T] in max(dtype, float32)).
    """
    check_paged(query, key_cache, value_cache, block_table, query_start_loc, seq_lens)
    dtype = query.dtype if dtype is None else dtype
    if block_m is not None and int(block_m) < 1:
        raise ValueError(f"block_m: must be >= 1 (or None), got {block_m}")
    lse_dtype = torch.promote_types(dtype, torch.float32)
    t, hq = query.shape[:2]
    out = torch.zeros(t, hq, value_cache.shape[3], dtype=dtype, device=query.device)
    lse = torch.full((hq, t), float("-inf"), dtype=lse_dtype, device=query.device)
    qsl = query_start_loc.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        k, v = gather_kv(key_cache, value_cache, block_table[b], 0, seq_len, k_scale=k_scale, v_scale=v_scale,
                         dtype=dtype)
        k, v = k.to(query.device), v.to(query.device)
        q0, q1 = qsl[b], qsl[b + 1]
        step = (q1 - q0) if block_m is None else int(block_m)
        for m0 in range(q0, q1, max(step, 1)):
            m1 = min(m0 + step, q1)
            out[m0:m1], lse[:, m0:m1] = attention_lowp(
                query[m0:m1].to(dtype), k, v, scale=scale, causal=causal, sliding_window=sliding_window,
                softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
                q_offset=seq_len - (q1 - q0) + (m0 - q0), reorder=reorder)
    return out, lse
