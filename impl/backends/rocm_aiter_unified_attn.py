"""ROCM_AITER_UNIFIED_ATTN: write the new K/V into the paged cache, then ONE call of AITER's
Triton ``unified_attention`` over the whole batch (prefill, chunked prefill and decode rows).

vLLM's backend (research/vllm-backends.md 4.4): NHD cache, ``reshape_and_cache_flash``, one
``aiter.ops.triton.unified_attention`` call, causal only (vLLM falls back to its own kernel for
non-causal, so this pipeline declares ``non_causal=False``), sinks and fp8 KV supported.

The cache write is the project's Triton ``cache_ops.reshape_and_cache`` (vLLM's own kernel on
ROCm is ``reshape_and_cache_flash``, not AITER's), called through its module so tests can
replace it. The kernel returns no LSE.

Block sizes: the all-decode launch uses TILE_SIZE = block_size, a ``tl.arange`` length and a
``tl.dot`` dimension, so block sizes must be powers of two >= 16.
"""

from __future__ import annotations

from typing import Optional

import torch

from impl import platform
from impl.aiter import loader, support, triton_kernels
from impl.backend import BackendOutput, BlockSizes, Capabilities, CaseParams, KnownIssue
from impl.triton import cache_ops

POW2_BLOCK_SIZES = frozenset({16, 32, 64, 128, 256})


def _num_sms() -> int:
    try:
        return loader.load().num_sms
    except loader.AiterUnavailable:
        return 1


def tile_is_block(params: CaseParams, num_sms: int) -> bool:
    """Does AITER 0.1.7's launch use TILE_SIZE == block_size (where the kernel drops its tile
    mask)? Mirrors unified_attention's launch choice: the 2-D kernel tiles by block_size for an
    all-decode batch (else by 64); the split-KV 3-D kernel always tiles by block_size."""
    bs = params.block_size
    qlens, slens = list(params.query_lens), list(params.seq_lens)
    if not qlens:
        return False
    hq, hkv = params.num_heads, params.num_kv_heads
    qpk = max(1, hq // hkv)
    block_m = 16 if qpk <= 16 else 1 << (qpk - 1).bit_length()
    num_2d = (sum(qlens) // max(1, block_m // qpk) + len(qlens)) * hkv
    use_2d = bool(params.sliding_window) or max(slens) <= 512 or num_2d > 4 * num_sms
    tile = (bs if max(qlens) == 1 else 64) if use_2d else bs
    return tile == bs


def reads_poisoned_tail(params: CaseParams, num_sms: Optional[int] = None) -> bool:
    """TILE_SIZE == block_size and some sequence's last KV block is only partly written."""
    partial = any(s % params.block_size for s in params.seq_lens)
    return partial and tile_is_block(params, _num_sms() if num_sms is None else num_sms)


TILE_MASK_ISSUE = (
    "AITER 0.1.7 Triton unified_attention drops its tile mask when TILE_SIZE == block_size "
    "(all-decode 2-D launch, the 3-D split-KV launch, or block size 64); unwritten (NaN) slots of a "
    "sequence's last KV block then reach P*V as 0*NaN (bug class 14; tests/aiter/test_unified_nan_tail.py "
    "shows the same cases pass once the unused slots hold 0)")


def _i32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int32).contiguous()


class AiterUnifiedAttnBackend:
    name = "ROCM_AITER_UNIFIED_ATTN"
    kind = "MHA"
    known_issues = (
        KnownIssue(backend="ROCM_AITER_UNIFIED_ATTN", reason=TILE_MASK_ISSUE,
                   link="attncheck#5 (AITER unified_attention tile mask)", platform="all",
                   predicate=reads_poisoned_tail),
    )

    @property
    def provider(self) -> str:
        return support.provider()

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            dtypes=frozenset({torch.float16, torch.bfloat16}),
            block_sizes=BlockSizes(allowed=POW2_BLOCK_SIZES),
            causal=True, non_causal=False, sliding_window=True, softcap=True, alibi=True,
            sinks=True, fp8_kv=platform.triton_fp8_flavours(), returns_lse=False,
            notes=("AITER Triton unified_attention: causal only, no LSE output",
                   "block sizes: powers of two >= 16 (TILE_SIZE = block_size for all-decode batches)"))

    def availability(self, device):
        return support.availability(device)

    def run(self, batch) -> BackendOutput:
        if not batch.causal:
            raise ValueError("causal: ROCM_AITER_UNIFIED_ATTN (AITER unified_attention) is causal only")
        cache_ops.reshape_and_cache(batch.key, batch.value, batch.key_cache, batch.value_cache,
                                    batch.slot_mapping, layout="NHD", k_scale=batch.k_scale,
                                    v_scale=batch.v_scale)
        out = torch.empty_like(batch.query)
        qlens = batch.query_lens()
        triton_kernels.unified_attention(
            batch.query, batch.key_cache, batch.value_cache, out,
            cu_seqlens_q=_i32(batch.query_start_loc), max_seqlen_q=max(qlens),
            seqused_k=_i32(batch.seq_lens), max_seqlen_k=int(batch.seq_lens.max()),
            block_table=_i32(batch.block_table), scale=batch.scale,
            sliding_window=batch.sliding_window, softcap=batch.softcap,
            alibi_slopes=batch.alibi_slopes, sinks=batch.sinks,
            k_scale=batch.k_scale, v_scale=batch.v_scale)
        return BackendOutput(out, None, info={"kernel": "aiter.ops.triton.unified_attention",
                                              "aiter": support.describe_loader()})


BACKENDS = (AiterUnifiedAttnBackend,)  # what impl.backends.builtin_backends() registers from this module
