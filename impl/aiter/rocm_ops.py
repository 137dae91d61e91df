"""Thin adapters for AITER's ROCm-only entry points (CK / ASM / HIP).

NOT VERIFIED ON THIS MACHINE: no machine this project runs on has ROCm. These adapters are
selected only when ``loader.load().mode == "rocm"``; anywhere else they raise
``AiterUnavailable`` and the backends report the ROCm path as "not verified on this machine".

Rules: keyword arguments only (aiter's signatures changed between versions: HEAD adds a third
``window_size`` element, ``sink_ptr``, ...); the parameter names used here are those of the
0.1.7 wheel (``tests/aiter/test_rocm_ops.py`` checks them against the installed sources);
results are normalised to this project's conventions (LSE ``[H, T]`` float32, -inf for rows
that see no key, +inf mapped to -inf).
"""

from __future__ import annotations

from typing import Optional

import torch

from impl.aiter import loader
from impl.aiter.triton_kernels import empty_rows

NOT_VERIFIED = "ROCm-only AITER entry point: not verified on this machine"
PARTITION_SIZE = 256  # vLLM's _PARTITION_SIZE_ROCM for paged_attention_v1

# keyword names these adapters pass (checked against the installed wheel by the tests)
CK_VARLEN_KWARGS = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
                    "min_seqlen_q", "dropout_p", "softmax_scale", "logits_soft_cap", "causal",
                    "window_size", "alibi_slopes", "return_lse")
PA_V1_KWARGS = ("out", "workspace_buffer", "query", "key_cache", "value_cache", "scale", "block_tables",
                "cu_query_lens", "context_lens", "max_context_len", "alibi_slopes", "kv_cache_dtype",
                "kv_cache_layout", "logits_soft_cap", "k_scale", "v_scale", "fp8_out_scale",
                "partition_size")


def _rocm_aiter():
    try:
        return loader.rocm_aiter()
    except loader.AiterUnavailable as e:
        raise loader.AiterUnavailable(f"{NOT_VERIFIED}: {e}") from None


def ck_flash_attn_varlen(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                         min_seqlen_q: int, scale: float, causal: bool, sliding_window: Optional[int] = None,
                         softcap: Optional[float] = None, alibi_slopes: Optional[torch.Tensor] = None,
                         return_lse: bool = True):
    """``aiter.flash_attn_varlen_func`` (CK/ASM). Returns (out, lse [H, T] or None)."""
    aiter = _rocm_aiter()
    kw = dict(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
              max_seqlen_q=int(max_seqlen_q), max_seqlen_k=int(max_seqlen_k),
              min_seqlen_q=int(min_seqlen_q), dropout_p=0.0, softmax_scale=float(scale),
              logits_soft_cap=float(softcap) if softcap else 0.0, causal=bool(causal),
              window_size=(int(sliding_window) - 1, 0) if sliding_window else (-1, -1),
              alibi_slopes=alibi_slopes, return_lse=bool(return_lse))
    res = aiter.flash_attn_varlen_func(**kw)
    if not return_lse:
        return (res[0] if isinstance(res, tuple) else res), None
    out, lse = res[0], res[1]
    lse = lse.to(torch.float32)
    lse = torch.where(torch.isposinf(lse), torch.full_like(lse, float("-inf")), lse)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    rows = empty_rows([cq[i + 1] - cq[i] for i in range(len(cq) - 1)],
                      [ck[i + 1] - ck[i] for i in range(len(ck) - 1)], causal)
    if rows:
        lse[:, torch.tensor(rows, device=lse.device)] = float("-inf")
    return out, lse


def pa_v1_workspace_bytes(num_seqs: int, num_heads: int, head_size: int, max_seq_len: int,
                          out_dtype: torch.dtype, partition_size: int = PARTITION_SIZE) -> int:
    """Scratch for paged_attention_v1: per-partition partial outputs plus exp-sums and maxima."""
    parts = -(-max_seq_len // partition_size)
    elem = torch.finfo(out_dtype).bits // 8
    return num_seqs * num_heads * parts * head_size * elem + 2 * num_seqs * num_heads * parts * 4


def paged_attention_v1(out, query, key_cache, value_cache, *, block_table, cu_query_lens, seq_lens,
                       max_seq_len: int, scale: float, kv_cache_dtype: str, k_scale, v_scale,
                       softcap: Optional[float] = None, alibi_slopes: Optional[torch.Tensor] = None):
    """``torch.ops.aiter.paged_attention_v1`` (HIP ll4mi), NHD cache, one query per sequence.

    vLLM sends sliding-window decodes and head sizes < 64 to unified_attention instead
    (research/vllm-backends.md section 5, #3); the caller does the same.
    """
    _rocm_aiter()
    num_seqs, num_heads, head_size = query.shape[0], query.shape[1], query.shape[2]
    ws = torch.empty(pa_v1_workspace_bytes(num_seqs, num_heads, head_size, max_seq_len, out.dtype),
                     dtype=torch.uint8, device=query.device)
    dev = query.device
    torch.ops.aiter.paged_attention_v1(
        out=out, workspace_buffer=ws, query=query, key_cache=key_cache, value_cache=value_cache,
        scale=float(scale), block_tables=block_table, cu_query_lens=cu_query_lens,
        context_lens=seq_lens, max_context_len=int(max_seq_len), alibi_slopes=alibi_slopes,
        kv_cache_dtype="auto" if kv_cache_dtype == "auto" else "fp8", kv_cache_layout="NHD",
        logits_soft_cap=float(softcap) if softcap else 0.0,
        k_scale=torch.tensor([float(k_scale)], dtype=torch.float32, device=dev),
        v_scale=torch.tensor([float(v_scale)], dtype=torch.float32, device=dev),
        fp8_out_scale=None, partition_size=PARTITION_SIZE)
    return out
