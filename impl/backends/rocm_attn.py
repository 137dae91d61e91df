"""ROCM_ATTN: vLLM's chunked-prefill + paged-decode pipeline (prefill/decode split).

Pipeline (research/vllm-backends.md 4.4, DESIGN.md table):
  1. write the new K/V into the paged cache (fp8 with k/v scales);
  2. the prefix-prefill kernel for the rows of every sequence with q_len > 1 (context from the
     cache + the new tokens causally);
  3. a paged-attention decode kernel for q_len == 1.

Two providers (``impl.vllm``; ``ATTNCHECK_PROVIDER``, default: vLLM where it loads):

* ``vllm==<version>``: vLLM's ``chunked_prefill_paged_decode`` as its RocmAttentionImpl calls
  it, over vLLM's ROCM_ATTN cache layout (K ``[nb, Hkv, D/x, block, x]``, V ``[nb, Hkv, D,
  block]``, x = 16 bytes / element): the batch's NHD caches are converted to it, written by
  vLLM's ``triton_reshape_and_cache_flash`` (vLLM's own writer for that layout except block
  sizes 16/32, where it calls the compiled ``reshape_and_cache``), attended (prefix prefill reads
  the new tokens from ``key``/``value``, the context from the cache; decode is vLLM's Triton
  ``kernel_paged_attention_2d``: the compiled HIP kernel it prefers on gfx9 is switched off by
  the loader), and converted back. No LSE. Declared known issues of vLLM 0.33.0: it accepts
  ``logits_soft_cap`` but never passes it to the kernels (softcap silently ignored), and its
  prefix-prefill ALiBi kernel has no sliding window (ALiBi + window: prefill rows see too much).
* ``attncheck-stand-in``: the project's kernels on the NHD cache; new tokens are read back
  from the cache after step 1; the decode is a Triton split-K kernel (partitions of P keys + a
  reduce) standing in for the HIP kernel. Both kernels produce an LSE ([Hq, T], sinks
  excluded), which this pipeline then returns.

This project does NOT implement or run HIP: a pass here says nothing about the HIP kernel.

Both kernels filter rows by q_len themselves (like vLLM's ``chunked_prefill_paged_decode``), so
the pipeline does not depend on the decode | extend | prefill order. Kernels are looked up
through their modules at call time so tests can plant bugs.
"""

from __future__ import annotations

import torch

from dataclasses import replace
from typing import Optional

from impl import platform
from impl.backend import Availability, BackendOutput, Capabilities, KnownIssue
from impl.backends.triton_attn import TRITON_MHA_CAPABILITIES, tf32_issue
from impl.triton import cache_ops, compat, paged_decode, prefix_prefill
from impl.vllm import ProviderChoice

# late-2025 ROCM_ATTN head sizes, plus 80 (added later); all are padded to a power of two.
HEAD_SIZES = frozenset({32, 64, 80, 96, 128, 160, 192, 224, 256})


SOFTCAP_IGNORED = KnownIssue(
    backend="ROCM_ATTN",
    reason="vLLM 0.33.0's RocmAttentionImpl stores logits_soft_cap but never passes it to "
           "chunked_prefill_paged_decode (which has no softcap parameter): softcap is silently "
           "ignored, the output is plain attention (on an H200, smoke case mixed-h8x2-d64-bs16-bf16-"
           "softcap50: worst error 1.48, ratio 50.4; mixed-h8x2-d64-bs16-fp16-softcap2: ratio 2818)",
    link="attncheck issue 11 (vllm/v1/attention/backends/rocm_attn.py)",
    predicate=lambda params: bool(params.softcap))
ALIBI_WINDOW_IGNORED = KnownIssue(
    backend="ROCM_ATTN",
    reason="vLLM 0.33.0's prefix-prefill ALiBi kernel (prefix_prefill._fwd_kernel_alibi) takes no "
           "sliding window: rows with q_len > 1 attend their whole context (decode rows are right). "
           "Measured with vLLM's kernel in the Triton interpreter on the CPU (not on a GPU): the smoke case "
           "mixed-h8x2-d64-bs16-fp16-alibi with a window of 7 added: worst error 2.06, per-row ratio 899, "
           "on the prefill sequences only; the stand-in passes it at 0.40",
    link="attncheck issue 11 (vllm/v1/attention/ops/prefix_prefill.py)",
    predicate=lambda params: params.alibi and params.sliding_window is not None)


# vLLM 0.33.0's prefix_prefill.context_attention_fwd (the prefill rows) asserts on these; a
# decode-only batch would run, but a case is judged whole
VLLM_UNSUPPORTED_COMBINATIONS = (
    ("ALiBi with attention sinks: vLLM's context_attention_fwd asserts 'Sinks arg is not supported with alibi'",
     lambda p: bool(p.get("alibi") and p.get("sinks"))),
    ("ALiBi without the causal mask: vLLM's context_attention_fwd asserts 'Non-causal prefix attention is not "
     "supported with alibi'", lambda p: bool(p.get("alibi") and not p.get("causal", True))),
)
# ... and on an NVIDIA GPU (where vLLM would never pick ROCM_ATTN) this one does not fit: found by
# the sweep on an H200 (sweep:0:13, fp32, head size 256, ALiBi). Not measured on a ROCm GPU.
VLLM_NVIDIA_UNSUPPORTED_COMBINATIONS = (
    ("float32 ALiBi with head size > 128 on an NVIDIA GPU: vLLM's prefix-prefill ALiBi kernel tiles 64 queries x "
     "256 (padded) dims in float32 and Triton refuses it for shared memory (H200: 279552 bytes required, "
     "232448 available)",
     lambda p: bool(p.get("alibi") and p.get("torch_dtype") == torch.float32 and (p.get("head_size") or 0) > 128)),
)


class RocmAttnBackend:
    """vLLM's ROCM_ATTN: prefix prefill for q_len > 1, paged decode for q_len == 1."""

    name = "ROCM_ATTN"
    kind = "MHA"

    def __init__(self, partition_size: int = 256, provider: Optional[str] = None):
        """``partition_size``: the stand-in decode's split-K partition (256 = the ROCm custom
        paged attention's; vLLM's CUDA v2 uses 512). ``provider``: 'auto', 'vllm' or 'stand-in'
        (None: ATTNCHECK_PROVIDER)."""
        self.partition_size = int(partition_size)
        self._choice = ProviderChoice(provider)

    @property
    def provider(self) -> str:
        return self._choice.provider

    @property
    def known_issues(self) -> tuple:
        return (SOFTCAP_IGNORED, ALIBI_WINDOW_IGNORED, tf32_issue(self.name)) if self._choice.uses_vllm else ()

    @property
    def capabilities(self) -> Capabilities:
        if self._choice.uses_vllm:
            from impl.vllm import kernels

            return replace(
                TRITON_MHA_CAPABILITIES, head_sizes=HEAD_SIZES, fp8_kv=kernels.fp8_kv_flavours(), returns_lse=False,
                unsupported_combinations=VLLM_UNSUPPORTED_COMBINATIONS
                + (VLLM_NVIDIA_UNSUPPORTED_COMBINATIONS if kernels.runs_on_nvidia() else ()),
                notes=("vLLM's chunked_prefill_paged_decode over its 5-D K / 4-D V layout; decode: "
                       "vLLM's Triton kernel (the compiled HIP kernel is not run)",
                       "softcap: accepted by vLLM's backend and silently ignored (known issue)",
                       "ALiBi with a sliding window: the prefill ignores the window (known issue)",
                       "no LSE: vLLM's kernels do not produce one"))
        return replace(
            TRITON_MHA_CAPABILITIES, head_sizes=HEAD_SIZES, fp8_kv=platform.triton_fp8_flavours(), returns_lse=True,
            notes=("decode: Triton split-K paged attention standing in for the HIP kernel",
                   "new tokens are read back from the cache after the write (fp8: quantised)",
                   "sinks: late-2025 ROCM_ATTN (Triton fallback); vLLM HEAD reports no sinks",
                   "softcap: implemented and tested in our kernels; vLLM's support not verified"))

    def availability(self, device) -> Availability:
        return self._choice.gate(self._triton_availability(device))

    def _triton_availability(self, device) -> Availability:
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
                                        "is NOT used (a Triton decode kernel runs instead)")
            return Availability.yes("CUDA (a Triton decode kernel in place of the HIP one)")
        return Availability.no(f"device {device}: needs the Triton interpreter (CPU) or a GPU")

    def run(self, batch) -> BackendOutput:
        if self._choice.uses_vllm:
            return self._run_vllm(batch)
        return self._run_stand_in(batch)

    def _run_vllm(self, batch) -> BackendOutput:
        from impl.vllm import kernels

        key_cache, value_cache = kernels.rocm_attn_layout(batch.key_cache, batch.value_cache)
        kernels.reshape_and_cache_flash(batch.key, batch.value, key_cache, value_cache, batch.slot_mapping,
                                        k_scale=batch.k_scale, v_scale=batch.v_scale)
        out = torch.empty_like(batch.query)
        qlens = batch.query_lens()
        kernels.chunked_prefill_paged_decode(
            batch.query, batch.key, batch.value, out, key_cache, value_cache, block_table=batch.block_table,
            query_start_loc=batch.query_start_loc, seq_lens=batch.seq_lens, max_query_len=max(qlens),
            max_seq_len=int(batch.seq_lens.max()), scale=batch.scale, causal=batch.causal,
            sliding_window=batch.sliding_window, alibi_slopes=batch.alibi_slopes, sinks=batch.sinks,
            k_scale=batch.k_scale, v_scale=batch.v_scale)
        kernels.nhd_from_rocm_attn_layout(key_cache, value_cache, batch.key_cache, batch.value_cache)
        ran = ["vllm triton_reshape_and_cache_flash (ROCM_ATTN layout)"]
        if max(qlens) > 1:
            ran.append("vllm context_attention_fwd (prefix prefill)")
        if min(qlens) == 1:
            ran.append("vllm kernel_paged_attention_2d (Triton decode)")
        return BackendOutput(out, None, info={"provider": self.provider, "kernels": ran})

    def _run_stand_in(self, batch) -> BackendOutput:
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
        return BackendOutput(out, lse, info={"provider": self.provider, "kernels": kernels})


BACKENDS = (RocmAttnBackend,)  # what impl.backends.builtin_backends() registers from this module
