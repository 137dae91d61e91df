"""Callables for ``attncheck bench`` rows of vLLM's kernels (timed beside the stand-ins, AITER
and SDPA in the same run).

Each function takes inputs built once outside the timed call (a batch from the bench's shape
builder, or MLA tensors) and returns ``[(row label, zero-argument callable)]``. Kernel rows time
vLLM's kernel alone (cache already written, layouts already converted, scratch and scales
allocated once, as vLLM's metadata builder and layer do). The backend rows per provider are
built by ``attncheck.bench.rows`` (``impl.vllm`` does not import the backends).
"""

from __future__ import annotations

import torch

from impl.vllm import kernels, loader

UNIFIED_KERNEL_ROW = "vLLM Triton unified_attention (kernel)"
ROCM_KERNEL_ROW = "vLLM Triton chunked_prefill_paged_decode (kernel)"
MLA_DECODE_ROW = "TRITON_MLA decode (vLLM decode_attention_fwd)"


def unavailable(error):
    """A row callable that reports why vLLM's kernels could not be timed (the table shows it)."""
    def call():
        raise RuntimeError(f"vLLM not loadable: {error}")
    return call


def _scales(batch):
    return (torch.tensor([float(batch.k_scale)], dtype=torch.float32, device=batch.query.device),
            torch.tensor([float(batch.v_scale)], dtype=torch.float32, device=batch.query.device))


def kernel_rows(batch) -> list:
    """vLLM's unified_attention and chunked_prefill_paged_decode alone on ``batch`` (NHD cache,
    every key already written)."""
    loader.load()
    out = torch.empty_like(batch.query)
    k_scale, v_scale = _scales(batch)
    mq, ms = max(batch.query_lens()), int(batch.seq_lens.max())
    common = dict(query_start_loc=batch.query_start_loc, seq_lens=batch.seq_lens, block_table=batch.block_table,
                  max_query_len=mq, max_seq_len=ms, scale=batch.scale, k_scale=k_scale, v_scale=v_scale)
    launch = kernels.unified_attention(batch.query, batch.key_cache, batch.value_cache, out, **common)

    def unified():
        kernels.unified_attention(batch.query, batch.key_cache, batch.value_cache, out, **common)
        return out

    k5, v4 = kernels.rocm_attn_layout(batch.key_cache, batch.value_cache)
    rocm_out = torch.empty_like(batch.query)

    def rocm():
        kernels.chunked_prefill_paged_decode(batch.query, batch.key, batch.value, rocm_out, k5, v4, **common)
        return rocm_out

    return [(f"{UNIFIED_KERNEL_ROW}, {launch}", unified), (ROCM_KERNEL_ROW, rocm)]


def mla_decode_rows(q, cache, table, kv_lens, *, scale: float, kv_lora_rank: int, max_kv_len: int) -> list:
    """vLLM's TRITON_MLA decode on the bench's latent cache ``[nb, block, L + R]`` with the split
    count of vLLM's ``_compute_num_kv_splits`` for the real device."""
    splits = kernels.mla_num_kv_splits(max_kv_len)
    scale_t = torch.ones(1, dtype=torch.float32, device=q.device)

    def decode():
        return kernels.mla_decode(q, cache, table, kv_lens, scale=scale, kv_lora_rank=kv_lora_rank,
                                  kv_scale=scale_t, max_kv_len=max_kv_len, num_kv_splits=splits)[0]

    return [(f"{MLA_DECODE_ROW}, {splits} splits", decode)]
