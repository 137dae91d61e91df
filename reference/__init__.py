"""Pure-PyTorch reference attention math (float64-capable). Imports nothing of ours.

mha      attention, attention_streaming, paged_attention (the oracle)
paged    the paged KV cache: fp8 quantise/dequantise, write_kv, gather_kv, slot mapping, layouts
merge    merge_attn_states (vLLM semantics)
chunked  the chunked-context extend pipeline (context chunks merged with merge_attn_states)
lowp     the low-precision "pt" path used for error budgets
"""

from reference.chunked import chunked_extend, chunked_extend_paged, context_chunks, workspace_chunk_tokens
from reference.lowp import attention_lowp, paged_attention_lowp
from reference.merge import merge_attn_states
from reference.mha import attention, attention_streaming, paged_attention
from reference.paged import (dequantize, gather_kv, hnd_to_nhd, nhd_to_hnd, quantize_fp8, slot_mapping_for,
                             write_kv)

__all__ = [
    "attention", "attention_streaming", "paged_attention",
    "quantize_fp8", "dequantize", "write_kv", "gather_kv", "nhd_to_hnd", "hnd_to_nhd", "slot_mapping_for",
    "merge_attn_states",
    "chunked_extend", "chunked_extend_paged", "context_chunks", "workspace_chunk_tokens",
    "attention_lowp", "paged_attention_lowp",
]
