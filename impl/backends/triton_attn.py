"""TRITON_ATTN: vLLM's unified-attention pipeline.

Pipeline (research/vllm-backends.md 4.4, DESIGN.md table):
  1. write the new K/V into the paged NHD cache (fp8 caches are quantised with the k/v scales);
  2. ONE unified-attention launch over the whole batch (prefill, chunked prefill / extend,
     decode), every key read back from the cache; the split-KV ("3-D") variant with its segment
     reduce where the 2-D grid would be too small.

Two providers (``impl.vllm``; ``ATTNCHECK_PROVIDER``, default: vLLM where it loads):

* ``vllm==<version>``: vLLM's own kernels, as its TritonAttentionImpl calls them:
  ``triton_reshape_and_cache_flash`` then ``unified_attention`` with the split-KV scratch its
  metadata builder allocates (``seq_threshold_3D = 128 // num_kv_heads``, 16 segments); vLLM's
  kernel picks 2-D or 3-D itself. No LSE (vLLM's kernel has none).
* ``attncheck-stand-in``: the project's kernels (``cache_ops.reshape_and_cache``,
  ``impl.triton.unified_attention`` with ``use_split_kv``, tuned on an H200); they also
  produce the LSE ([Hq, T], natural log, sinks excluded), which this pipeline then returns.

The kernels find each sequence's rows from ``query_start_loc`` themselves, so the pipeline does
not depend on the decode | extend | prefill order. Kernels are looked up through their modules
at call time so tests can plant bugs.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from impl import platform
from impl.backend import Availability, BackendOutput, BlockSizes, Capabilities, KnownIssue
from impl.triton import cache_ops, compat, unified_attention
from impl.vllm import ProviderChoice

# vLLM's TRITON_ATTN takes any head size >= 32; ours pads to a power of two (<= 256 keeps the
# tiles within shared memory on a GPU). Multiples of 8 from 32 to 256.
HEAD_SIZES = frozenset(range(32, 257, 8))
# vLLM's own kernel takes any head size >= 32 (padded to a power of two); up to 256 here
VLLM_HEAD_SIZES = frozenset(range(32, 257))
# vLLM's kernels leave tl.dot's input_precision at Triton's default, which is TF32 on NVIDIA
# GPUs: their float32 results are TF32-accurate only. Declared for every float32 case on CUDA;
# a case where it does not reproduce is noted as such in the verdict's report.
TF32_REASON = ("vLLM's Triton attention kernels run their float32 tl.dot in TF32 on NVIDIA GPUs "
               "(Triton's default input_precision). Measured on an H200 (torch 2.11, Triton 3.6), smoke "
               "case mixed-h8x8-d64-bs16-fp32: worst error 1.86e-3, per-row ratio 102 (7798 before the "
               "budgets' float32 step term), full-mixed-h8x2-d128-bs16-fp32 ratio 99.7, for TRITON_ATTN "
               "and ROCM_ATTN alike; the stand-in kernels pass the same cases")


def tf32_issue(backend: str) -> KnownIssue:
    """The TF32 issue as ``backend`` (a backend running vLLM's kernels) declares it."""
    return KnownIssue(backend=backend, reason=TF32_REASON, link="attncheck issue 11", platform="cuda",
                      dtypes={"fp32"})


# found by the sweep (seed 3) on the CPU, vLLM's kernel in the Triton interpreter
ALIBI_WITH_SINKS = KnownIssue(
    backend="TRITON_ATTN",
    reason="vLLM 0.33.0's unified_attention adds the linear ALiBi bias as slope * (key_pos - context_len) "
           "(triton_attention_helpers.apply_alibi_to_score; its sqrt variant is query-relative): that is "
           "-slope * |q_pos - k_pos| plus slope * (q_pos - context_len), a per-row constant that cancels in "
           "the softmax but not against a sink logit, so with sinks every new-token row after the first is "
           "wrong (decode rows are right). sweep:3:53 (bf16, 40/2 heads, d256, ALiBi, sinks): ratio 845; the "
           "same case without sinks passes at 0.32, without ALiBi at 0.55; the stand-in passes at 0.40. "
           "No released model combines ALiBi and sinks",
    link="attncheck issue 11 (vllm/v1/attention/ops/triton_attention_helpers.py)",
    predicate=lambda params: params.alibi and params.sinks)
# found by the sweep (seed 0, large sizes) on an H200, reproduced on the CPU
NON_CAUSAL_ALIBI = KnownIssue(
    backend="TRITON_ATTN",
    reason="vLLM 0.33.0's unified_attention applies the same linear ALiBi bias slope * (key_pos - context_len) "
           "without the causal mask, where the bias is -slope * |q_pos - k_pos| (DESIGN.md): keys after the "
           "query get a growing bonus instead of a penalty, so every row but a sequence's last is wrong. "
           "sweep:0:12 (large sizes: fp16, 40/2 heads, d96, block 64, non-causal prefill with ALiBi): 35104 of "
           "35600 rows over budget, ratio 2402 on the H200 and the same on the CPU; TORCH_SDPA and "
           "FLEX_ATTENTION pass it. vLLM's ROCM_ATTN refuses the combination (its prefill asserts)",
    link="attncheck issue 11 (vllm/v1/attention/ops/triton_attention_helpers.py)",
    predicate=lambda params: params.alibi and not params.causal)


# What both providers of TRITON_ATTN and ROCM_ATTN take; each backend and provider replaces the
# head sizes, fp8 flavours, LSE and notes.
TRITON_MHA_CAPABILITIES = Capabilities(
    dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
    # vLLM: multiples of 16; the kernels address keys by position, so 544 works too.
    block_sizes=BlockSizes(multiple_of=16, minimum=16),
    causal=True, non_causal=True, sliding_window=True, softcap=True, alibi=True, sinks=True)


class TritonAttnBackend:
    """vLLM's TRITON_ATTN: cache write + one unified-attention launch (2-D or split-KV)."""

    name = "TRITON_ATTN"
    kind = "MHA"

    def __init__(self, provider: Optional[str] = None):
        """``provider``: 'auto', 'vllm' or 'stand-in' (None: ATTNCHECK_PROVIDER)."""
        self._choice = ProviderChoice(provider)

    @property
    def provider(self) -> str:
        return self._choice.provider

    @property
    def known_issues(self) -> tuple:
        return (tf32_issue(self.name), ALIBI_WITH_SINKS, NON_CAUSAL_ALIBI) if self._choice.uses_vllm else ()

    @property
    def capabilities(self) -> Capabilities:
        if self._choice.uses_vllm:
            from impl.vllm import kernels

            return replace(
                TRITON_MHA_CAPABILITIES, head_sizes=VLLM_HEAD_SIZES, fp8_kv=kernels.fp8_kv_flavours(), returns_lse=False,
                notes=("vLLM's triton_reshape_and_cache_flash + unified_attention (2-D, or 3-D "
                       "split-KV as vLLM's builder and kernel decide)",
                       "no LSE: vLLM's kernel does not produce one",
                       "fp8: only the platform's flavour (vLLM views fp8 caches as it)"))
        return replace(
            TRITON_MHA_CAPABILITIES, head_sizes=HEAD_SIZES, fp8_kv=platform.triton_fp8_flavours(), returns_lse=True,
            notes=("one unified-attention launch; split-KV (3-D) + segment reduce for long all-decode batches",
                   "returns the LSE its kernel computes (vLLM's TRITON_ATTN does not expose one)",
                   "fp8 e4m3fnuz only under the Triton interpreter (CUDA Triton has no fnuz)"))

    def availability(self, device) -> Availability:
        return self._choice.gate(self._triton_availability(device))

    def _triton_availability(self, device) -> Availability:
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
        if self._choice.uses_vllm:
            return self._run_vllm(batch)
        return self._run_stand_in(batch)

    def _run_vllm(self, batch) -> BackendOutput:
        from impl.vllm import kernels

        kernels.reshape_and_cache_flash(batch.key, batch.value, batch.key_cache, batch.value_cache,
                                        batch.slot_mapping, k_scale=batch.k_scale, v_scale=batch.v_scale)
        out = torch.empty_like(batch.query)
        launch = kernels.unified_attention(
            batch.query, batch.key_cache, batch.value_cache, out, query_start_loc=batch.query_start_loc,
            seq_lens=batch.seq_lens, block_table=batch.block_table, max_query_len=max(batch.query_lens()),
            max_seq_len=int(batch.seq_lens.max()), scale=batch.scale, causal=batch.causal,
            sliding_window=batch.sliding_window, softcap=batch.softcap, alibi_slopes=batch.alibi_slopes,
            sinks=batch.sinks, k_scale=batch.k_scale, v_scale=batch.v_scale)
        return BackendOutput(out, None, info={"provider": self.provider, "kernels": [
            "vllm triton_reshape_and_cache_flash", f"vllm unified_attention ({launch})"]})

    def _run_stand_in(self, batch) -> BackendOutput:
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
        return BackendOutput(out, lse, info={"provider": self.provider, "kernels": ["reshape_and_cache",
                                                         "unified_attention(3-D split-KV)" if split
                                                         else "unified_attention(2-D)"]})


BACKENDS = (TritonAttnBackend,)  # what impl.backends.builtin_backends() registers from this module
