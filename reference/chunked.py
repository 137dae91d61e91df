"""The chunked-context extend pipeline (ROCM_AITER_FA extend, MLA prefill), done plainly.

For a sequence with ``ctx`` cached context tokens and ``q_len`` new tokens (query i sits at
position ctx + i):

1. the new tokens attend to themselves, causally, with LSE;
2. the context is cut into chunks; each chunk is attended non-causally (all context keys
   precede every query), with LSE;
3. the context partials are merged one after another with ``merge_attn_states`` (starting from
   the empty result: output 0, LSE -inf), then merged with the new-token result
   (prefix = context, suffix = new tokens).

Positions stay absolute (``q_offset``), so sliding windows and ALiBi are exact in every part.
Sinks must join the softmax denominator once, so every part is computed without them and the
merged result is rescaled at the end (``apply_sinks``). The merged LSE excludes the sink.

Batch-level chunking follows vLLM's workspace: chunk c covers context tokens
[c * chunk, (c + 1) * chunk) of *every* sequence (empty for short contexts, including
sequences with no context at all), with chunk = workspace_tokens // num_extends, not rounded
to the block size.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from reference.merge import merge_attn_states
from reference.mha import apply_sinks, attention, check_paged, check_qkv, empty_result
from reference.paged import gather_kv

VLLM_ROCM_WORKSPACE_TOKENS = 32 * 1024  # _CP_TOKENS_PER_ITER_ROCM


def workspace_chunk_tokens(num_extends: int, workspace_tokens: int = VLLM_ROCM_WORKSPACE_TOKENS) -> int:
    """vLLM's per-sequence chunk: the workspace shared evenly by the extends (not block-rounded)."""
    if num_extends < 1:
        raise ValueError(f"num_extends: need at least one extend to share the workspace, got {num_extends}")
    return workspace_tokens // num_extends


def context_chunks(context_lens: Sequence[int], chunk_tokens: int) -> list[list[tuple[int, int]]]:
    """chunks[c][b] = (start, end) of sequence b's context tokens in chunk c (start == end: empty)."""
    if int(chunk_tokens) < 1:
        raise ValueError(f"chunk_tokens: must be >= 1, got {chunk_tokens}")
    longest = max(context_lens, default=0)
    num_chunks = -(-longest // chunk_tokens)
    return [[(min(c * chunk_tokens, ctx), min((c + 1) * chunk_tokens, ctx)) for ctx in context_lens]
            for c in range(num_chunks)]


def attend_new_tokens(q, k_new, v_new, *, scale, causal, sliding_window, softcap, alibi_slopes):
    """New tokens over themselves: query i and key i share a position, so bottom-right = diagonal."""
    return attention(q, k_new, v_new, scale=scale, causal=causal, sliding_window=sliding_window,
                     softcap=softcap, alibi_slopes=alibi_slopes)


def attend_context_chunk(q, k_chunk, v_chunk, context_len: int, chunk_start: int, *, scale, sliding_window,
                         softcap, alibi_slopes):
    """New tokens over context keys [chunk_start, ...): non-causal, positions kept absolute."""
    return attention(q, k_chunk, v_chunk, scale=scale, causal=False, sliding_window=sliding_window,
                     softcap=softcap, alibi_slopes=alibi_slopes, q_offset=context_len - chunk_start)


def chunked_extend(q, k_new, v_new, k_context, v_context, *, scale, chunk_tokens, causal=True,
                   sliding_window=None, softcap=None, alibi_slopes=None, sinks=None):
    """One sequence: (out [q_len, Hq, Dv], lse [Hq, q_len]) through chunks of ``chunk_tokens``."""
    check_qkv(q, k_new, v_new, alibi_slopes, sinks, sliding_window, softcap)
    check_qkv(q, k_context, v_context)
    if k_new.shape[0] != q.shape[0]:
        raise ValueError(f"k_new: expected one key per new token ({q.shape[0]}), got {k_new.shape[0]}")
    knobs = dict(scale=scale, sliding_window=sliding_window, softcap=softcap, alibi_slopes=alibi_slopes)
    ctx = k_context.shape[0]
    out, lse = empty_result(q, k_new.shape[1], v_new.shape[2])
    for [(start, end)] in context_chunks([ctx], chunk_tokens):
        part = attend_context_chunk(q, k_context[start:end], v_context[start:end], ctx, start, **knobs)
        out, lse = merge_attn_states(out, lse, *part)
    new = attend_new_tokens(q, k_new, v_new, causal=causal, **knobs)
    out, lse = merge_attn_states(out, lse, *new)
    return apply_sinks(out, lse, sinks), lse


def chunked_extend_paged(query, key_cache, value_cache, block_table, query_start_loc, seq_lens, *, scale,
                         chunk_tokens: Optional[int] = None, key=None, value=None, causal=True,
                         sliding_window=None, softcap=None, alibi_slopes=None, sinks=None, k_scale=1.0,
                         v_scale=1.0, compute_dtype=torch.float64,
                         workspace_tokens: int = VLLM_ROCM_WORKSPACE_TOKENS):
    """The whole batch the way the workspace does it: (out [T, Hq, Dv] in compute_dtype, lse [Hq, T]).

    Context tokens are gathered from the NHD cache chunk by chunk and dequantised (fp8).
    New tokens' K/V: from ``key``/``value`` [T, Hkv, D] when given (vLLM's extend passes the
    unquantised new K/V), else read back from the cache (then the result equals
    ``paged_attention`` exactly, fp8 included). ``chunk_tokens=None`` uses
    ``workspace_tokens // num_extends`` (extends: q_len > 1 with context).
    """
    check_paged(query, key_cache, value_cache, block_table, query_start_loc, seq_lens)
    if (key is None) != (value is None):
        raise ValueError("key/value: give both new-token tensors or neither")
    qsl, slens = query_start_loc.tolist(), seq_lens.tolist()
    qlens = [qsl[b + 1] - qsl[b] for b in range(len(slens))]
    ctx_lens = [s - q for s, q in zip(slens, qlens)]
    if chunk_tokens is None:
        num_extends = sum(1 for q, c in zip(qlens, ctx_lens) if q > 1 and c > 0)
        chunk_tokens = workspace_chunk_tokens(max(1, num_extends), workspace_tokens)
    knobs = dict(scale=scale, sliding_window=sliding_window, softcap=softcap, alibi_slopes=alibi_slopes)
    cache_kw = dict(k_scale=k_scale, v_scale=v_scale, dtype=compute_dtype)
    q_all = query.to(compute_dtype)
    rows = [slice(qsl[b], qsl[b + 1]) for b in range(len(slens))]

    # context: one workspace pass per chunk, merged into the running result of every row
    out, lse = empty_result(q_all, 1, value_cache.shape[3])
    for chunk in context_chunks(ctx_lens, chunk_tokens):
        part_out, part_lse = empty_result(q_all, 1, value_cache.shape[3])
        for b, (start, end) in enumerate(chunk):
            k, v = gather_kv(key_cache, value_cache, block_table[b], start, end, **cache_kw)
            part_out[rows[b]], part_lse[:, rows[b]] = attend_context_chunk(
                q_all[rows[b]], k.to(query.device), v.to(query.device), ctx_lens[b], start, **knobs)
        out, lse = merge_attn_states(out, lse, part_out, part_lse)

    # new tokens, then the final merge (prefix = context, suffix = new tokens)
    new_out, new_lse = empty_result(q_all, 1, value_cache.shape[3])
    for b in range(len(slens)):
        if key is not None:
            k, v = key[rows[b]].to(compute_dtype), value[rows[b]].to(compute_dtype)
        else:
            k, v = gather_kv(key_cache, value_cache, block_table[b], ctx_lens[b], slens[b], **cache_kw)
        new_out[rows[b]], new_lse[:, rows[b]] = attend_new_tokens(
            q_all[rows[b]], k.to(query.device), v.to(query.device), causal=causal, **knobs)
    out, lse = merge_attn_states(out, lse, new_out, new_lse)
    return apply_sinks(out, lse, sinks), lse
