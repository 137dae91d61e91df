"""``attncheck bench`` rows: MLA absorbed decode, own kernel vs AITER's, same data.

Rows: the project's own decode kernel, AITER's Triton one and vLLM's ``decode_attention_fwd``
(with vLLM's own split count), all on the same data.

Shape (the issue's row): 64 sequences x 4096 keys of context, 16 heads per rank (DeepSeek-V3 at
TP8), bf16, latent cache ``[nb, 16, 576]`` with a shuffled block table. Work = bytes of latent
cache read (``batch * context * 576 * element size``); ``attncheck bench`` turns the median time
into GB/s and compares it with the copy bandwidth and with the AITER row of the same run.

Only the attention kernels are timed: metadata (block table, AITER's page-size-1 ``kv_indices``)
is built once outside the callables, as vLLM's metadata builder does once per step.
"""

from __future__ import annotations

import torch

from impl.backends.rocm_aiter_mla import page_size_one_indices, triton_decode_config
from impl.triton import mla_decode

OWN_LABEL = "TRITON_MLA decode (own Triton split-KV)"
AITER_LABEL = "AITER Triton MLA decode (mla_decode_rope)"


def _inputs(device, batch, context, heads, dtype, block_size, latent, rope, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    blocks = -(-context // block_size)
    nb = batch * blocks
    cache = (torch.randn(nb, block_size, latent + rope, generator=g) * 0.5).to(device, dtype)
    table = torch.randperm(nb, generator=g).reshape(batch, blocks).to(device, torch.int32)
    q = torch.randn(batch, heads, latent + rope, generator=g).to(device, dtype)
    kv_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    return q, cache, table, kv_lens


def rows(device, batch: int = 64, context: int = 4096, heads: int = 16, dtype: torch.dtype = torch.bfloat16,
         block_size: int = 16, kv_lora_rank: int = 512, rope_dim: int = 64, num_splits=None, seed: int = 0):
    """[(label, zero-argument callable returning the latent output [B, N, L], bytes of cache read)]."""
    device = torch.device(device)
    q, cache, table, kv_lens = _inputs(device, batch, context, heads, dtype, block_size, kv_lora_rank,
                                       rope_dim, seed)
    scale = (128 + rope_dim) ** -0.5
    splits = num_splits or mla_decode.default_num_splits(batch, -(-heads // 16), context, device)
    nbytes = batch * context * (kv_lora_rank + rope_dim) * cache.element_size()

    own_out = torch.empty(batch, heads, kv_lora_rank, dtype=dtype, device=device)

    def own():
        return mla_decode.mla_decode(q, cache, table, kv_lens, scale=scale, kv_lora_rank=kv_lora_rank,
                                     num_splits=splits, max_kv_len=context, out=own_out)[0]

    from impl.aiter import loader  # noqa: PLC0415 (AITER is optional for the own row)
    indptr, indices = page_size_one_indices(table, kv_lens, block_size)
    buf = cache.view(-1, 1, kv_lora_rank + rope_dim)
    a_out = torch.empty(batch, heads, kv_lora_rank, dtype=dtype, device=device)
    logits = torch.empty(batch, heads, splits, kv_lora_rank + 1, dtype=torch.float32, device=device)
    k_pe_tokens = torch.empty(batch, rope_dim, dtype=dtype, device=device)
    cos_sin = torch.zeros(1, rope_dim, dtype=dtype, device=device)
    positions = torch.zeros(batch, dtype=torch.int64, device=device)
    mod = loader.triton_module("mla_decode_rope")

    def aiter():
        mod.decode_attention_fwd_grouped_rope(
            q=q, k_buffer=buf, v_buffer=buf[..., :kv_lora_rank], o=a_out, kv_indptr=indptr, kv_indices=indices,
            k_pe_tokens=k_pe_tokens, kv_lora_rank=kv_lora_rank, rotary_dim=rope_dim, cos_sin_cache=cos_sin,
            positions=positions, attn_logits=logits, num_kv_splits=splits, sm_scale=scale, logit_cap=0.0,
            use_rope=False, is_neox_style=False, config=triton_decode_config(device))
        return a_out

    result = [(f"{OWN_LABEL}, {splits} splits", own, nbytes), (f"{AITER_LABEL}, {splits} splits", aiter, nbytes)]
    from impl.vllm import bench_rows as vllm_rows, loader as vllm_loader  # noqa: PLC0415 (vLLM is optional)

    try:
        vllm_loader.load()
    except vllm_loader.VllmUnavailable as e:
        return result + [(vllm_rows.MLA_DECODE_ROW, vllm_rows.unavailable(e), nbytes)]
    for label, fn in vllm_rows.mla_decode_rows(q, cache, table, kv_lens, scale=scale, kv_lora_rank=kv_lora_rank,
                                               max_kv_len=context):
        result.append((label, fn, nbytes))
    return result
