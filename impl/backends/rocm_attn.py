"""ROCM_ATTN: vLLM's chunked-prefill + paged-decode pipeline (prefill/decode split).

Pipeline (research/vllm-backends.md 4.4, DESIGN.md table):
  1. write the new K/V into the paged cache (``cache_ops.reshape_and_cache``, fp8 with k/v scales);
  2. the prefix-prefill kernel for the rows of every sequence with q_len > 1 (context from the
     cache + the new tokens causally; here the new tokens are read from the cache after step 1);
  3. a split-K paged-attention decode kernel (partitions of P keys + a reduce) for q_len == 1.

On ROCm vLLM's decode step is a HIP paged-attention kernel (``use_rocm_custom_paged_attention``,
else a Triton kernel). This project does NOT implement HIP: the Triton paged-decode kernel of
the same split-K algorithm (``impl.triton.paged_decode``) stands in for it everywhere, ROCm
included, so a pass here says nothing about the HIP kernel itself.

Both kernels filter rows by q_len themselves (like vLLM's ``chunked_prefill_paged_decode``), so
the pipeline does not depend on the decode | extend | prefill order. Kernels are looked up
through their modules at call time so tests can plant bugs. Both kernels produce an LSE, so this
pipeline returns one ([Hq, T], sinks excluded) although vLLM's ROCM_ATTN does not expose it.
Layout: NHD cache (vLLM's late-2025 ROCM_ATTN reinterprets the allocation as the legacy 5-D K /
4-D V layout; the math is the same).
"""

from __future__ import annotations

import torch

from impl import platform
from impl.backend import Availability, BackendOutput, BlockSizes, Capabilities
from impl.triton import cache_ops, compat, paged_decode, prefix_prefill

# late-2025 ROCM_ATTN head sizes, plus 80 (added later); all are padded to a power of two.
HEAD_SIZES = frozenset({32, 64, 80, 96, 128, 160, 192, 224, 256})


class RocmAttnBackend:
    """vLLM's ROCM_ATTN. Off ROCm (and here on ROCm too) the Triton paged-decode kernel of the
    same split-K algorithm stands in for the HIP paged-attention decode kernel."""

    name = "ROCM_ATTN"
    kind = "MHA"
    known_issues = ()

    def __init__(self, partition_size: int = 256):
        # 256 = the ROCm custom paged attention's partition (vLLM's CUDA v2 uses 512).
        self.partition_size = int(partition_size)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
            head_sizes=HEAD_SIZES,
            block_sizes=BlockSizes(multiple_of=16, minimum=16),
            causal=True, non_causal=True, sliding_window=True, softcap=True, alibi=True,
            sinks=True, fp8_kv=platform.triton_fp8_flavours(), returns_lse=True,
            notes=("decode: Triton split-K paged attention standing in for the HIP kernel",
                   "new tokens are read back from the cache after the write (fp8: quantised)",
                   "sinks: late-2025 ROCM_ATTN (Triton fallback); vLLM HEAD reports no sinks",
                   "softcap: implemented and tested in our kernels; vLLM's support not verified"))

    def availability(self, device) -> Availability:
        device = torch.device(device)
        if device.type == "cpu":
            if not platform.is_interpreter():
                return Availability.no("ROCM_ATTN's Triton kernels on the CPU need TRITON_INTERPRET=1")
            return Availability.yes("Triton interpreter")
        if device.type == "cuda":
            if platform.is_interpreter():
                return Availability.no("TRITON_INTERPRET=1 runs kernels on the CPU; use --device cpu")
            if platform.is_rocm():
                return Availability.yes("ROCm: Triton kernels; the HIP paged-attention decode kernel "
                                        "is NOT used (Triton split-K stand-in)")
            return Availability.yes("CUDA (Triton stand-in for the HIP decode kernel)")
        return Availability.no(f"device {device}: needs the Triton interpreter (CPU) or a GPU")

    def run(self, batch) -> BackendOutput:
        if platform.is_interpreter():
            compat.install()
        cache_ops.reshape_and_cache(batch.key, batch.value, batch.key_cache, batch.value_cache,
                                    batch.slot_mapping, layout="NHD", k_scale=batch.k_scale,
                                    v_scale=batch.v_scale)
        qlens = batch.query_lens()
        slens = batch.seq_lens.tolist()
        out = torch.zeros_like(batch.query)
        lse = torch.full((batch.num_heads, batch.query.shape[0]), float("-inf"), dtype=torch.float32,
                         device=batch.query.device)
        common = dict(scale=batch.scale, sliding_window=batch.sliding_window, softcap=batch.softcap,
                      alibi_slopes=batch.alibi_slopes, sinks=batch.sinks,
                      kv_cache_dtype=batch.kv_cache_dtype, k_scale=batch.k_scale,
                      v_scale=batch.v_scale, out=out, lse=lse)
        tensors = (batch.query, batch.key_cache, batch.value_cache, batch.block_table,
                   batch.query_start_loc, batch.seq_lens)
        kernels = []
        if any(q > 1 for q in qlens):
            prefix_prefill.prefix_prefill(*tensors, causal=batch.causal, skip_decode=True,
                                          max_query_len=max(qlens), **common)
            kernels.append("prefix_prefill")
        decode_lens = [s for q, s in zip(qlens, slens) if q == 1]
        if decode_lens:
            # A decode row sees every key up to itself, so causal or not makes no difference.
            paged_decode.paged_decode(*tensors, partition_size=self.partition_size,
                                      max_seq_len=max(decode_lens), **common)
            kernels.append(f"paged_decode(P={self.partition_size})")
        return BackendOutput(out, lse, info={"kernels": kernels})


BACKENDS = (RocmAttnBackend,)  # what impl.backends.builtin_backends() registers from this module
