"""TRITON_ATTN: vLLM's unified-attention pipeline on the project's own Triton kernels.

Pipeline (research/vllm-backends.md 4.4, DESIGN.md table):
  1. write the new K/V into the paged NHD cache (``cache_ops.reshape_and_cache``; fp8 caches
     are quantised with the k/v scales);
  2. ONE ``unified_attention`` launch over the whole batch (prefill, chunked prefill / extend,
     decode), every key read back from the cache. An all-decode batch with long contexts whose
     2-D grid would leave the GPU underused takes the split-KV ("3-D") variant with its segment
     reduce, as vLLM does (``unified_attention.use_split_kv``).

The kernel finds each sequence's rows from ``query_start_loc`` itself, so the pipeline does not
depend on the decode | extend | prefill order. Kernels are looked up through their modules at
call time so tests can plant bugs. The kernel produces an LSE ([Hq, T], natural log, sinks
excluded), so this pipeline returns one although vLLM's TRITON_ATTN does not expose it.
"""

from __future__ import annotations

import torch

from impl import platform
from impl.backend import Availability, BackendOutput, BlockSizes, Capabilities, KnownIssue
from impl.triton import cache_ops, compat, unified_attention

# vLLM's TRITON_ATTN takes any head size >= 32; ours pads to a power of two (<= 256 keeps the
# tiles within shared memory on a GPU). Multiples of 8 from 32 to 256.
HEAD_SIZES = frozenset(range(32, 257, 8))


class TritonAttnBackend:
    """vLLM's TRITON_ATTN: reshape_and_cache + one unified-attention launch (2-D or split-KV)."""

    name = "TRITON_ATTN"
    kind = "MHA"
    known_issues = (
        KnownIssue(
            backend="TRITON_ATTN",
            reason="float32 per-row output budget gap (a budget limit, not a kernel defect): the fp32 budget is one "
                   "realisation of fp32 rounding noise, and on short rows another legitimate summation order "
                   "lands past it (and the kernel's tanh differs from torch's at large softcapped scores); seen by "
                   "the sweep on the CPU interpreter: sweep:1:40 (fp32, non-causal, d128, 10 keys) ratio 2.15, "
                   "sweep:3:2 (fp32, softcap 50, query std 8) ratio 3.39, output rel_l2 <= 8e-7; the stored fp32 "
                   "cases pass",
            link="attncheck#9 (budgets that accept every legitimate op order)", platform="all",
            dtypes=frozenset({"fp32"}), predicate=lambda p: p.tier == "sweep"),
    )

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
            head_sizes=HEAD_SIZES,
            # vLLM: multiples of 16; the kernel addresses keys by position, so 544 works too.
            block_sizes=BlockSizes(multiple_of=16, minimum=16),
            causal=True, non_causal=True, sliding_window=True, softcap=True, alibi=True,
            sinks=True, fp8_kv=platform.triton_fp8_flavours(), returns_lse=True,
            notes=("one unified-attention launch; split-KV (3-D) + segment reduce for long all-decode batches",
                   "returns the LSE its kernel computes (vLLM's TRITON_ATTN does not expose one)",
                   "fp8 e4m3fnuz only under the Triton interpreter (CUDA Triton has no fnuz)"))

    def availability(self, device) -> Availability:
        device = torch.device(device)
        try:
            import triton  # noqa: F401, PLC0415
        except ImportError:
            return Availability.no("needs Triton: a CUDA GPU or TRITON_INTERPRET=1 (triton is not installed)")
        if device.type == "cpu":
            if not platform.is_interpreter():
                return Availability.no("needs Triton: a CUDA GPU or TRITON_INTERPRET=1")
            return Availability.yes("Triton interpreter (" + ", ".join(compat.install()) + " patched)")
        if device.type == "cuda":
            if platform.is_interpreter():
                return Availability.no("TRITON_INTERPRET=1 runs Triton on the CPU; use the cpu device")
            if not torch.cuda.is_available():
                return Availability.no("needs Triton: a CUDA GPU or TRITON_INTERPRET=1 (no GPU visible)")
            return Availability.yes("compiled Triton on " + ("ROCm" if platform.is_rocm() else "CUDA"))
        return Availability.no(f"device {device}: needs Triton: a CUDA GPU or TRITON_INTERPRET=1")

    def run(self, batch) -> BackendOutput:
        if platform.is_interpreter():
            compat.install()
        cache_ops.reshape_and_cache(batch.key, batch.value, batch.key_cache, batch.value_cache,
                                    batch.slot_mapping, layout="NHD", k_scale=batch.k_scale,
                                    v_scale=batch.v_scale)
        qlens = batch.query_lens()
        slens = batch.seq_lens.tolist()
        T, Hq = batch.query.shape[:2]
        out = torch.empty_like(batch.query)
        lse = torch.empty((Hq, T), dtype=torch.float32, device=batch.query.device)
        max_q, max_s = max(qlens), max(slens)
        split = unified_attention.use_split_kv(max_q, max_s, batch.num_seqs, batch.num_kv_heads,
                                               batch.query.device)
        unified_attention.unified_attention(
            batch.query, batch.key_cache, batch.value_cache, out,
            query_start_loc=batch.query_start_loc, seq_lens=batch.seq_lens, block_table=batch.block_table,
            scale=batch.scale, causal=batch.causal, sliding_window=batch.sliding_window,
            softcap=batch.softcap, alibi_slopes=batch.alibi_slopes, sinks=batch.sinks,
            k_scale=batch.k_scale, v_scale=batch.v_scale, lse=lse,
            max_query_len=max_q, max_seq_len=max_s, split_kv=split)
        return BackendOutput(out, lse, info={"kernels": ["reshape_and_cache",
                                                         "unified_attention(3-D split-KV)" if split
                                                         else "unified_attention(2-D)"]})


BACKENDS = (TritonAttnBackend,)  # what impl.backends.builtin_backends() registers from this module
