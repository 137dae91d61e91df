"""Multi-head attention (MHA / GQA / MQA) as the equations write it.

For one sequence with queries q [Sq, Hq, D] and keys/values k [Sk, Hkv, D], v [Sk, Hkv, Dv]:

    s[h, i, j] = scale * <q[i, h], k[j, h // G]>            G = Hq // Hkv (GQA group)
    s          = softcap * tanh(s / softcap)                 (if softcap)
    s         -= slope[h] * |qpos[i] - j|                    (if ALiBi)
    s          = -inf where key j is not visible to query i
    out[i, h]  = sum_j exp(s[h,i,j]) v[j] / (sum_j exp(s[h,i,j]) + exp(sink[h]))
    lse[h, i]  = log sum_j exp(s[h,i,j])                     (the sink is not included)

Query i sits at position qpos[i] = Sk - Sq + i (bottom-right causal) unless ``q_offset``
gives the first query's position. Key j is visible iff ``j <= qpos`` (when causal) and
``qpos - j < sliding_window`` (the window counts keys including the query's own).
A row with no visible key gets output 0 and LSE -inf, never NaN.

Everything is computed in the dtype of the inputs (callers pass float64 for the oracle).
"""

from __future__ import annotations

from typing import Optional

import torch

from reference.paged import gather_kv

# ---- checks ----------------------------------------------------------------------------------


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alibi_slopes=None, sinks=None,
              sliding_window=None, softcap=None) -> None:
    """Raise ValueError naming the argument unless the shapes form a valid (GQA) attention."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name}: expected a [tokens, heads, head_dim] tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"k/v: dtype must equal q's {q.dtype}, got {k.dtype}/{v.dtype}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k: head dim {k.shape[2]} must equal q's head dim {q.shape[2]}")
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"v: expected [{k.shape[0]}, {k.shape[1]}, Dv] like k, got {tuple(v.shape)}")
    hq, hkv = q.shape[1], k.shape[1]
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"k: num kv heads {hkv} must divide num query heads {hq} (GQA group)")
    for name, t in (("alibi_slopes", alibi_slopes), ("sinks", sinks)):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (hq,)):
            raise ValueError(f"{name}: expected a tensor of shape [{hq}] (one per query head), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if sliding_window is not None and int(sliding_window) < 1:
        raise ValueError(f"sliding_window: must be >= 1 key (or None), got {sliding_window}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap: must be > 0 (or None), got {softcap}")


# ---- one concept per function ----------------------------------------------------------------


def query_positions(num_queries: int, num_keys: int, q_offset: Optional[int], device=None) -> torch.Tensor:
    """Absolute position of each query: bottom-right aligned unless q_offset is given."""
    first = num_keys - num_queries if q_offset is None else int(q_offset)
    return torch.arange(num_queries, device=device, dtype=torch.int64) + first


def visible(qpos: torch.Tensor, kpos: torch.Tensor, causal: bool, sliding_window: Optional[int]) -> torch.Tensor:
    """bool [..., M, N]: may query (at qpos [..., M]) see key (at kpos [..., N])?"""
    dist = qpos[..., :, None] - kpos[..., None, :]  # how far back the key is
    ok = torch.ones_like(dist, dtype=torch.bool)
    if causal:
        ok &= dist >= 0
    if sliding_window is not None:
        ok &= dist < int(sliding_window)
    return ok


def grouped_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[Hq, M, N] dot products; query head h meets kv head h // G (one batched matmul per group)."""
    m, hq, d = q.shape
    n, hkv, _ = k.shape
    g = hq // hkv
    s = torch.einsum("mkgd,nkd->kgmn", q.reshape(m, hkv, g, d), k)
    return s.reshape(hq, m, n)


def grouped_pv(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[Hq, M, Dv] = p [Hq, M, N] @ v, query head h reading kv head h // G."""
    hq, m, n = p.shape
    _, hkv, dv = v.shape
    g = hq // hkv
    o = torch.einsum("kgmn,nkd->kgmd", p.reshape(hkv, g, m, n), v)
    return o.reshape(hq, m, dv)


def apply_softcap(s: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    return s if softcap is None else softcap * torch.tanh(s / softcap)


def alibi_bias(slopes: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor, dtype) -> torch.Tensor:
    """[Hq, M, N] = -slope[h] * |qpos - kpos|."""
    dist = (qpos[:, None] - kpos[None, :]).abs().to(dtype)
    return -slopes.to(dtype)[:, None, None] * dist


def masked_scores(q, k, qpos, kpos, *, scale, causal, sliding_window, softcap, alibi_slopes) -> torch.Tensor:
    """[Hq, M, N] final logits of a query chunk against a key block, -inf where masked."""
    s = grouped_scores(q, k) * scale
    s = apply_softcap(s, softcap)
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes.to(s.device), qpos, kpos, s.dtype)
    return s.masked_fill(~visible(qpos, kpos, causal, sliding_window), float("-inf"))


def finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    """A safe softmax shift: -inf (an empty row) becomes 0 so exp(s - shift) is exp(-inf) = 0."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def apply_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: Optional[torch.Tensor]) -> torch.Tensor:
    """Add a sink to the denominator after the fact: out * e^lse / (e^lse + e^sink) = out * sigmoid(lse - sink).

    ``out [M, Hq, Dv]`` and ``lse [Hq, M]`` must be a sink-free result; the LSE stays sink-free.
    """
    if sinks is None:
        return out
    factor = torch.sigmoid(lse - sinks.to(device=lse.device, dtype=lse.dtype)[:, None])  # [Hq, M]
    return out * factor.transpose(0, 1)[:, :, None].to(out.dtype)


def empty_result(q: torch.Tensor, num_kv_heads: int, dv: int):
    """No keys at all: every row is empty -> output 0, LSE -inf."""
    sq, hq, _ = q.shape
    out = q.new_zeros(sq, hq, dv)
    lse = torch.full((hq, sq), float("-inf"), dtype=q.dtype, device=q.device)
    return out, lse


# ---- attention -------------------------------------------------------------------------------


def attention(q, k, v, *, scale, causal=True, sliding_window=None, softcap=None, alibi_slopes=None,
              sinks=None, q_offset=None):
    """One sequence, all keys at once. Returns (out [Sq, Hq, Dv], lse [Hq, Sq])."""
    check_qkv(q, k, v, alibi_slopes, sinks, sliding_window, softcap)
    sq, sk, dv = q.shape[0], k.shape[0], v.shape[2]
    if sk == 0 or sq == 0:
        return empty_result(q, k.shape[1], dv)
    qpos = query_positions(sq, sk, q_offset, q.device)
    kpos = torch.arange(sk, device=q.device)
    s = masked_scores(q, k, qpos, kpos, scale=scale, causal=causal, sliding_window=sliding_window,
                      softcap=softcap, alibi_slopes=alibi_slopes)  # [Hq, Sq, Sk]

    row_max = s.amax(dim=-1)  # [Hq, Sq]; -inf for an empty row
    sink = None if sinks is None else sinks.to(device=q.device, dtype=q.dtype)[:, None]
    if sink is not None:
        row_max = torch.maximum(row_max, sink)
    shift = finite_or_zero(row_max)
    p = torch.exp(s - shift[..., None])  # unnormalised probabilities
    key_sum = p.sum(dim=-1)  # sum_j exp(s - shift)
    denom = key_sum if sink is None else key_sum + torch.exp(sink - shift)
    pv = grouped_pv(p, v)  # [Hq, Sq, Dv]
    out = torch.where(denom[..., None] > 0, pv / denom[..., None], torch.zeros_like(pv))
    lse = torch.log(key_sum) + shift  # log 0 = -inf for an empty row
    return out.permute(1, 0, 2).contiguous(), lse


def _may_see_block(qpos_lo: int, qpos_hi: int, k_lo: int, k_hi: int, causal: bool, sliding_window) -> bool:
    """Could any query in [qpos_lo, qpos_hi] see any key in [k_lo, k_hi]? (only skips work)."""
    if causal and k_lo > qpos_hi:
        return False
    if sliding_window is not None and qpos_lo - k_hi >= int(sliding_window):
        return False
    return True


def _stream_query_chunk(q, k, v, qpos, *, block_n, scale, causal, sliding_window, softcap, alibi_slopes):
    """Online softmax of one query chunk over key blocks: (out [M, Hq, Dv], lse [Hq, M]), sink-free."""
    m, hq, _ = q.shape
    sk, dv = k.shape[0], v.shape[2]
    run_max = torch.full((hq, m), float("-inf"), dtype=q.dtype, device=q.device)
    run_sum = torch.zeros((hq, m), dtype=q.dtype, device=q.device)
    acc = torch.zeros((hq, m, dv), dtype=q.dtype, device=q.device)
    qpos_lo, qpos_hi = int(qpos[0]), int(qpos[-1])
    for n0 in range(0, sk, block_n):
        n1 = min(n0 + block_n, sk)
        if not _may_see_block(qpos_lo, qpos_hi, n0, n1 - 1, causal, sliding_window):
            continue
        kpos = torch.arange(n0, n1, device=q.device)
        s = masked_scores(q, k[n0:n1], qpos, kpos, scale=scale, causal=causal, sliding_window=sliding_window,
                          softcap=softcap, alibi_slopes=alibi_slopes)  # [Hq, M, N]
        new_max = torch.maximum(run_max, s.amax(dim=-1))
        shift = finite_or_zero(new_max)
        rescale = torch.exp(run_max - shift)  # old terms were relative to the old max
        s.sub_(shift[..., None]).exp_()  # in place: s becomes the block's probabilities
        run_sum = run_sum * rescale + s.sum(dim=-1)
        acc = acc * rescale[..., None] + grouped_pv(s, v[n0:n1])
        run_max = new_max
    out = torch.where(run_sum[..., None] > 0, acc / run_sum[..., None], torch.zeros_like(acc))
    lse = torch.log(run_sum) + finite_or_zero(run_max)
    return out.permute(1, 0, 2), lse


def attention_streaming(q, k, v, *, scale, causal=True, sliding_window=None, softcap=None, alibi_slopes=None,
                        sinks=None, q_offset=None, block_n=2048, block_m=1024):
    """Same result as ``attention`` with memory bounded by block_m x block_n x Hq scores.

    Queries are taken ``block_m`` at a time; for each chunk the keys are visited ``block_n`` at a
    time with the online-softmax recurrence (running max, running sum, rescaled accumulator).
    Sinks join the denominator once, at the end (``apply_sinks``). Runs on the inputs' device.
    """
    check_qkv(q, k, v, alibi_slopes, sinks, sliding_window, softcap)
    if int(block_n) < 1 or int(block_m) < 1:
        raise ValueError(f"block_n/block_m: must be >= 1, got {block_n}/{block_m}")
    sq, sk, dv = q.shape[0], k.shape[0], v.shape[2]
    if sk == 0 or sq == 0:
        return empty_result(q, k.shape[1], dv)
    qpos = query_positions(sq, sk, q_offset, q.device)
    out = q.new_empty(sq, q.shape[1], dv)
    lse = q.new_empty(q.shape[1], sq)
    for m0 in range(0, sq, block_m):
        m1 = min(m0 + block_m, sq)
        out[m0:m1], lse[:, m0:m1] = _stream_query_chunk(
            q[m0:m1], k, v, qpos[m0:m1], block_n=block_n, scale=scale, causal=causal,
            sliding_window=sliding_window, softcap=softcap, alibi_slopes=alibi_slopes)
    return apply_sinks(out, lse, sinks), lse


# ---- the paged batch -------------------------------------------------------------------------


def check_paged(query, key_cache, value_cache, block_table, query_start_loc, seq_lens) -> None:
    if query.dim() != 3:
        raise ValueError(f"query: expected [tokens, heads, head_dim], got {tuple(query.shape)}")
    for name, c in (("key_cache", key_cache), ("value_cache", value_cache)):
        if c.dim() != 4:
            raise ValueError(f"{name}: expected NHD [num_blocks, block_size, Hkv, D], got {tuple(c.shape)}")
    if key_cache.shape[:3] != value_cache.shape[:3]:
        raise ValueError(f"value_cache: shape {tuple(value_cache.shape)} does not match key_cache "
                         f"{tuple(key_cache.shape)} in blocks/block size/heads")
    b = seq_lens.shape[0]
    if query_start_loc.shape[0] != b + 1:
        raise ValueError(f"query_start_loc: expected {b + 1} entries (num_seqs + 1), got {query_start_loc.shape[0]}")
    if block_table.dim() != 2 or block_table.shape[0] != b:
        raise ValueError(f"block_table: expected [{b}, max_blocks], got {tuple(block_table.shape)}")
    qsl = query_start_loc.tolist()
    if qsl[0] != 0 or qsl[-1] != query.shape[0] or any(qsl[i + 1] < qsl[i] for i in range(b)):
        raise ValueError(f"query_start_loc: must rise from 0 to num_tokens {query.shape[0]}, got {qsl}")
    for i, s in enumerate(seq_lens.tolist()):
        if s < qsl[i + 1] - qsl[i]:
            raise ValueError(f"seq_lens: sequence {i} has {s} keys but {qsl[i + 1] - qsl[i]} query tokens")


def paged_attention(query, key_cache, value_cache, block_table, query_start_loc, seq_lens, *, scale,
                    causal=True, sliding_window=None, softcap=None, alibi_slopes=None, sinks=None,
                    k_scale=1.0, v_scale=1.0, compute_dtype=torch.float64, streaming=False, block_n=2048,
                    block_m=1024):
    """Attention of a vLLM-shaped batch whose keys (context and new) are all in the NHD cache.

    Sequence b's queries are rows query_start_loc[b]:query_start_loc[b+1]; its seq_lens[b] keys
    are read from the cache through block_table[b] and dequantised (fp8) to ``compute_dtype``.
    Returns (out [T, Hq, Dv] in compute_dtype, lse [Hq, T]).
    """
    check_paged(query, key_cache, value_cache, block_table, query_start_loc, seq_lens)
    run = attention
    extra = {}
    if streaming:
        run, extra = attention_streaming, {"block_n": block_n, "block_m": block_m}
    t, hq = query.shape[:2]
    out = torch.zeros(t, hq, value_cache.shape[3], dtype=compute_dtype, device=query.device)
    lse = torch.full((hq, t), float("-inf"), dtype=compute_dtype, device=query.device)
    qsl = query_start_loc.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        q0, q1 = qsl[b], qsl[b + 1]
        if q1 == q0:
            continue
        k, v = gather_kv(key_cache, value_cache, block_table[b], 0, seq_len, k_scale=k_scale, v_scale=v_scale,
                         dtype=compute_dtype)
        out[q0:q1], lse[:, q0:q1] = run(query[q0:q1].to(compute_dtype), k.to(query.device), v.to(query.device),
                                        scale=scale, causal=causal, sliding_window=sliding_window,
                                        softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, **extra)
    return out, lse
