"""ROCM_AITER_FA as vLLM runs it (research/vllm-backends.md 4.2): decode | extend | prefill.

1. Split the batch into decodes (q_len <= ``MIN_SEQLEN_Q``), extends (q_len > 1 with context)
   and prefills (no context). vLLM's split uses argmax boundaries and silently mis-splits an
   unordered batch; here an unordered batch raises ``BatchError``.
2. Write the new K/V into the paged NHD cache (``cache_ops.reshape_and_cache``).
3. Prefill rows: varlen causal flash attention over the new tokens' own K/V
   (CK ``aiter.flash_attn_varlen_func`` on ROCm; AITER's Triton mha elsewhere).
4. Extend rows, no sliding window: (a) new tokens causal over themselves, with LSE;
   (b) the context in chunks of ``32768 // num_extends`` tokens (not rounded to blocks;
   ``batch.context_chunk_tokens`` overrides it so tests reach the multi-chunk paths): each
   chunk gathered from the cache with dequantisation (``cache_ops.gather_cache``), attended
   non-causally with LSE, and folded into a running ``merge_attn_states``; (c) a final merge
   (prefix = context, suffix = new tokens).
5. Extend rows with a sliding window W: no chunking; gather the last ``min(seq_len, q_len + W)``
   tokens of each request (new tokens are already in the cache) and run one windowed causal
   attention over them, no merge.
6. Decode rows (one query per sequence): ROCm -> ``torch.ops.aiter.paged_attention_v1``
   (NHD), except sliding window or head size < 64, where vLLM uses unified_attention;
   elsewhere -> AITER's Triton ``pa_decode`` (the Triton analogue of paged_attention_v1, over
   an HND permuted view of the cache), except sliding window (pa_decode has none; vLLM falls
   back to unified_attention too) and MHA without grouping (pa_decode's no-dot kernels index a
   rank-0 tensor, which Triton >= 3.9 rejects and the loader does not patch), which go through
   AITER's Triton ``unified_attention``.

Windowed attention over contiguous varlen K/V (prefill and SW-extend with a window) off ROCm:
AITER's Triton mha 0.1.7 raises for any window, so the contiguous K/V are viewed as a paged
cache with block size 1 and attended with ``unified_attention`` (causal, window ``(W-1, 0)``).

What the pipeline supports here: fp16/bf16, causal only, sliding window, fp8 KV; no softcap
(Triton mha has none, and the context chunks need its LSE), no ALiBi (the chunk calls would
see chunk-relative positions), no sinks. The returned LSE is None: decode rows have none.

``MIN_SEQLEN_Q`` (research 5 #1): vLLM passes ``min_seqlen_q=1`` to CK (the bug used the
batch's minimum query length). The Triton mha has no such parameter; in this pipeline the same
quantity is the threshold at or below which a row counts as a single-query decode, and it is
forwarded to CK unchanged on ROCm. Setting it to the batch minimum (the planted bug) sends a
batch whose shortest query is > 1 down the one-query-per-sequence decode path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from impl import platform
from impl.aiter import rocm_ops, support, triton_kernels
from impl.backend import BackendOutput, BlockSizes, Capabilities, CaseParams, KnownIssue
from impl.batch import check_vllm_order
from impl.backends.rocm_aiter_unified_attn import POW2_BLOCK_SIZES, TILE_MASK_ISSUE
from impl.triton import cache_ops
from impl.triton import merge_attn_states as merge_ops

CP_TOKENS_PER_ITER = 32 * 1024  # vLLM's _CP_TOKENS_PER_ITER_ROCM
MIN_SEQLEN_Q = 1


def min_seqlen_q(query_lens: list) -> int:
    """The decode threshold / CK ``min_seqlen_q`` (vLLM after PR #28670: always 1)."""
    return MIN_SEQLEN_Q


def decode_query_start_loc(query_start_loc: torch.Tensor, num_decodes: int) -> torch.Tensor:
    """cu_seqlens of the decode rows: ``num_decodes + 1`` entries (research 5 #2 sliced one short)."""
    return query_start_loc[:num_decodes + 1]


@dataclass
class Split:
    num_decodes: int
    num_extends: int
    num_prefills: int
    decode_tokens: int
    extend_tokens: int


def split_batch(query_lens: list, seq_lens: list, threshold: int) -> Split:
    """Count decode | extend | prefill rows; an unordered batch is a ``BatchError``."""
    kinds = []
    for q, s in zip(query_lens, seq_lens):
        kinds.append("decode" if q <= threshold else ("extend" if s > q else "prefill"))
    check_vllm_order(kinds)
    nd, ne = kinds.count("decode"), kinds.count("extend")
    return Split(nd, ne, kinds.count("prefill"), sum(query_lens[:nd]), sum(query_lens[nd:nd + ne]))


def _i32(x) -> torch.Tensor:
    return x.to(torch.int32).contiguous() if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.int32)


def _cumsum0(lens: list, device) -> torch.Tensor:
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


def _on_rocm() -> bool:
    return platform.kernel_target() == "rocm"


# ---- kernels behind the pipeline ---------------------------------------------------------------

def varlen_attention(q, k, v, *, cu_q, cu_k, max_q, max_k, scale, causal, min_q, sliding_window=None,
                     return_lse=True):
    """Varlen flash attention: CK on ROCm, AITER Triton mha (no window) or the windowed path."""
    if _on_rocm():
        return rocm_ops.ck_flash_attn_varlen(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                                             max_seqlen_k=max_k, min_seqlen_q=min_q, scale=scale, causal=causal,
                                             sliding_window=sliding_window, return_lse=return_lse)
    if sliding_window:
        if not causal or return_lse:
            raise ValueError("sliding_window: the Triton windowed path is causal and returns no LSE")
        return windowed_varlen_attention(q, k, v, cu_q=cu_q, cu_k=cu_k, max_q=max_q, max_k=max_k,
                                         scale=scale, sliding_window=sliding_window), None
    return triton_kernels.flash_attn_varlen(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                                            max_seqlen_k=max_k, scale=scale, causal=causal,
                                            return_lse=return_lse)


def windowed_varlen_attention(q, k, v, *, cu_q, cu_k, max_q, max_k, scale, sliding_window):
    """Causal windowed attention over contiguous K/V: the K/V viewed as a block-size-1 cache."""
    ck = cu_k.tolist()
    lens = [ck[i + 1] - ck[i] for i in range(len(ck) - 1)]
    width = -(-max(max(lens), 1) // 64) * 64  # the kernel reads whole 64-key tiles of the table
    table = torch.zeros(len(lens), width, dtype=torch.int32)
    for r, n in enumerate(lens):
        table[r, :n] = torch.arange(ck[r], ck[r] + n, dtype=torch.int32)
    out = torch.empty_like(q)
    return triton_kernels.unified_attention(
        q, k.unsqueeze(1), v.unsqueeze(1), out, cu_seqlens_q=cu_q, max_seqlen_q=max_q,
        seqused_k=torch.tensor(lens, dtype=torch.int32, device=q.device), max_seqlen_k=max_k,
        block_table=table.to(q.device), scale=scale, sliding_window=sliding_window)


# ---- known issue inherited from AITER's unified_attention ---------------------------------------

def _decode_reads_poisoned_tail(params: CaseParams) -> bool:
    """Windowed or ungrouped-MHA decode rows go through unified_attention's all-decode launch
    (TILE_SIZE == block_size, tile mask dropped): a decode whose last block is partly unwritten
    reads it."""
    if not params.sliding_window and params.num_heads != params.num_kv_heads:
        return False
    return any(q == 1 and s % params.block_size for q, s in zip(params.query_lens, params.seq_lens))


class AiterFABackend:
    name = "ROCM_AITER_FA"
    kind = "MHA"

    known_issues = (
        KnownIssue(
            backend="ROCM_AITER_FA",
            reason="off ROCm, windowed or ungrouped-MHA decode rows run unified_attention's all-decode launch: " + TILE_MASK_ISSUE,
            link="attncheck#5 (AITER unified_attention tile mask)", platform="all",
            predicate=_decode_reads_poisoned_tail),
    )

    @property
    def provider(self) -> str:
        return support.provider()

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            dtypes=frozenset({torch.float16, torch.bfloat16}),
            block_sizes=BlockSizes(allowed=POW2_BLOCK_SIZES),
            causal=True, non_causal=False, sliding_window=True, softcap=False, alibi=False, sinks=False,
            fp8_kv=platform.triton_fp8_flavours(), returns_lse=False,
            notes=("prefill/extend through AITER Triton mha off ROCm (no softcap, no window: windowed "
                   "calls use unified_attention over a block-size-1 view)",
                   "decode through AITER Triton pa_decode off ROCm (unified_attention for windowed or "
                   "ungrouped-MHA decodes); paged_attention_v1 on ROCm (not verified on this machine)"))

    def availability(self, device):
        return support.availability(device)

    # ---- the pipeline ---------------------------------------------------------------------------
    def run(self, batch) -> BackendOutput:
        if not batch.causal:
            raise ValueError("causal: ROCM_AITER_FA runs causal attention only")
        for name in ("softcap", "alibi_slopes", "sinks"):
            if getattr(batch, name) is not None:
                raise ValueError(f"{name}: not supported by the ROCM_AITER_FA pipeline here")
        qlens, slens = batch.query_lens(), batch.seq_lens.tolist()
        thr = min_seqlen_q(qlens)
        sp = split_batch(qlens, slens, thr)
        cache_ops.reshape_and_cache(batch.key, batch.value, batch.key_cache, batch.value_cache,
                                    batch.slot_mapping, layout="NHD", k_scale=batch.k_scale,
                                    v_scale=batch.v_scale)
        out = torch.full_like(batch.query, float("nan"))  # a row no path writes stays NaN
        info = {"aiter": support.describe_loader(), "split": (sp.num_decodes, sp.num_extends, sp.num_prefills),
                "min_seqlen_q": thr}
        if sp.num_decodes:
            self._decode(batch, out, sp, info)
        if sp.num_extends:
            if batch.sliding_window:
                self._extend_sliding_window(batch, out, sp, info)
            else:
                self._extend_chunked(batch, out, sp, thr, info)
        if sp.num_prefills:
            self._prefill(batch, out, sp, thr, info)
        return BackendOutput(out, None, info=info)

    def _decode(self, batch, out, sp: Split, info: dict) -> None:
        """Paged decode: one query per sequence (paged_attention_v1 with mtp=1), the last token
        of each decode row; rows are located through ``decode_query_start_loc``."""
        cu = decode_query_start_loc(_i32(batch.query_start_loc), sp.num_decodes)
        n = cu.numel() - 1
        last = (cu[1:] - 1).long()
        q = batch.query[last]
        seq_lens = _i32(batch.seq_lens[:n])
        bt = _i32(batch.block_table[:n])
        one_each = torch.arange(n + 1, dtype=torch.int32, device=q.device)
        max_k = int(seq_lens.max())
        o = torch.empty_like(q)
        if _on_rocm() and not batch.sliding_window and batch.head_size >= 64:
            rocm_ops.paged_attention_v1(o, q, batch.key_cache, batch.value_cache, block_table=bt,
                                        cu_query_lens=one_each, seq_lens=seq_lens, max_seq_len=max_k,
                                        scale=batch.scale, kv_cache_dtype=batch.kv_cache_dtype,
                                        k_scale=batch.k_scale, v_scale=batch.v_scale)
            info["decode"] = "torch.ops.aiter.paged_attention_v1"
        elif not batch.sliding_window and batch.num_heads != batch.num_kv_heads:
            triton_kernels.paged_decode(q, batch.key_cache, batch.value_cache, o, seq_lens=seq_lens,
                                        block_table=bt, max_seq_len=max_k, scale=batch.scale,
                                        k_scale=batch.k_scale, v_scale=batch.v_scale)
            info["decode"] = "aiter.ops.triton.pa_decode"
        else:
            triton_kernels.unified_attention(
                q, batch.key_cache, batch.value_cache, o, cu_seqlens_q=one_each, max_seqlen_q=1,
                seqused_k=seq_lens, max_seqlen_k=max_k, block_table=bt, scale=batch.scale,
                sliding_window=batch.sliding_window, k_scale=batch.k_scale, v_scale=batch.v_scale)
            info["decode"] = "aiter.ops.triton.unified_attention"
        out[last] = o

    def _prefill(self, batch, out, sp: Split, thr: int, info: dict) -> None:
        first = sp.num_decodes + sp.num_extends
        t0 = sp.decode_tokens + sp.extend_tokens
        qlens = batch.query_lens()[first:]
        cu = _cumsum0(qlens, batch.query.device)
        o, _ = varlen_attention(batch.query[t0:], batch.key[t0:], batch.value[t0:], cu_q=cu, cu_k=cu,
                                max_q=max(qlens), max_k=max(qlens), scale=batch.scale, causal=True,
                                min_q=thr, sliding_window=batch.sliding_window, return_lse=False)
        out[t0:] = o
        info["prefill_rows"] = len(qlens)

    def _extend_rows(self, batch, sp: Split):
        first, last = sp.num_decodes, sp.num_decodes + sp.num_extends
        t0, t1 = sp.decode_tokens, sp.decode_tokens + sp.extend_tokens
        qlens = batch.query_lens()[first:last]
        ctx = batch.context_lens()[first:last]
        return first, last, t0, t1, qlens, ctx

    def _extend_chunked(self, batch, out, sp: Split, thr: int, info: dict) -> None:
        first, last, t0, t1, qlens, ctx = self._extend_rows(batch, sp)
        dev, dt = batch.query.device, batch.dtype
        q = batch.query[t0:t1]
        cu_q = _cumsum0(qlens, dev)
        max_q = max(qlens)
        # (a) new tokens, causal over themselves
        new_o, new_lse = varlen_attention(q, batch.key[t0:t1], batch.value[t0:t1], cu_q=cu_q, cu_k=cu_q,
                                          max_q=max_q, max_k=max_q, scale=batch.scale, causal=True,
                                          min_q=thr, return_lse=True)
        # (b) the context in chunks, merged as it goes
        chunk = batch.context_chunk_tokens or CP_TOKENS_PER_ITER // sp.num_extends
        num_chunks = -(-max(ctx) // chunk)
        bt = _i32(batch.block_table[first:last])
        ctx_o = ctx_lse = None
        for c in range(num_chunks):
            start = c * chunk
            lens = [max(0, min(n, start + chunk) - start) for n in ctx]
            cu_k = _cumsum0(lens, dev)
            k, v = cache_ops.gather_cache(batch.key_cache, batch.value_cache, bt, cu_k,
                                          torch.full((len(lens),), start, dtype=torch.int32, device=dev),
                                          k_scale=batch.k_scale, v_scale=batch.v_scale, out_dtype=dt,
                                          layout="NHD")
            o, lse = varlen_attention(q, k, v, cu_q=cu_q, cu_k=cu_k, max_q=max_q, max_k=max(max(lens), 1),
                                      scale=batch.scale, causal=False, min_q=thr, return_lse=True)
            if ctx_o is None:
                ctx_o, ctx_lse = o, lse
            else:
                merged, merged_lse = torch.empty_like(o), torch.empty_like(lse)
                merge_ops.merge_attn_states(merged, ctx_o, ctx_lse, o, lse, output_lse=merged_lse)
                ctx_o, ctx_lse = merged, merged_lse
        # (c) context (prefix) + new tokens (suffix)
        final = torch.empty_like(new_o)
        merge_ops.merge_attn_states(final, ctx_o, ctx_lse, new_o, new_lse)
        out[t0:t1] = final
        info["context_chunks"] = num_chunks
        info["context_chunk_tokens"] = chunk

    def _extend_sliding_window(self, batch, out, sp: Split, info: dict) -> None:
        first, last, t0, t1, qlens, ctx = self._extend_rows(batch, sp)
        dev, W = batch.query.device, int(batch.sliding_window)
        slens = [c + q for c, q in zip(ctx, qlens)]
        lens = [min(s, q + W) for s, q in zip(slens, qlens)]
        starts = torch.tensor([s - n for s, n in zip(slens, lens)], dtype=torch.int32, device=dev)
        cu_k = _cumsum0(lens, dev)
        k, v = cache_ops.gather_cache(batch.key_cache, batch.value_cache, _i32(batch.block_table[first:last]),
                                      cu_k, starts, k_scale=batch.k_scale, v_scale=batch.v_scale,
                                      out_dtype=batch.dtype, layout="NHD")
        o, _ = varlen_attention(batch.query[t0:t1], k, v, cu_q=_cumsum0(qlens, dev), cu_k=cu_k, max_q=max(qlens),
                                max_k=max(lens), scale=batch.scale, causal=True, min_q=min_seqlen_q(qlens),
                                sliding_window=W, return_lse=False)
        out[t0:t1] = o
        info["extend"] = "sliding window: gathered last min(seq_len, q_len + W) tokens"


BACKENDS = (AiterFABackend,)  # what impl.backends.builtin_backends() registers from this module
