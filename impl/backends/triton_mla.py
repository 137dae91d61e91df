"""TRITON_MLA: vLLM's MLA pipeline (research/vllm-backends.md 4.3).

Pipeline, per batch (rows ordered decode | extend | prefill, as vLLM reorders them):

1. write ``[kv_c | k_pe]`` of every new token into the latent cache (``cache_ops.reshape_and_cache``,
   fp8 quantised with ``kv_scale``);
2. decode rows (q_len <= ``decode_threshold``; TRITON_MLA: 1) take the absorbed path:
   ``ql = q_nope @ W_UK^T`` per head, query ``[ql | q_pe]`` (576), MQA over the paged latent cache
   with V = kv_c (``mla_decode.mla_decode``: split-KV + reduce), then ``o @ W_UV`` per head;
3. prefill/extend rows take the up-projected path: ``k_nope, v = kv_c @ W_UK, kv_c @ W_UV`` and
   ``k = [k_nope | k_pe]`` (192): the new tokens attend causally over themselves (from the raw
   ``kv_c``/``k_pe`` of the batch, as vLLM does), the context is gathered from the cache in chunks
   (``cache_ops.gather_cache``, fp8 dequantised), up-projected and attended non-causally with
   LSE, the chunk results are merged in order and finally merged with the new-token result
   (``merge_attn_states.merge_attn_states``, prefix = context, suffix = new tokens);
4. ``pad_v``: vLLM on ROCm pads V from 128 to the qk dim 192 because its flash attention needs equal
   head dims, then slices the output back before merging; this backend does the same by default
   (our varlen kernel could take 192/128 directly: set ``pad_v = False``).

The softmax scale is the batch's layer scale (qk_head_dim ** -0.5 * mscale ** 2) in both paths.
Every kernel is called through its module (``varlen_attention.varlen_attention``, ...) and the
small tensor helpers below are module functions, so planted-bug tests can replace them.
The pipeline returns no LSE (vLLM's MLA layer does not expose one).

TRITON_MLA's kernels come from one of two providers (``impl.vllm``; ``ATTNCHECK_PROVIDER``,
default: vLLM where it loads):

* ``vllm==<version>``: decode through vLLM's ``decode_attention_fwd(is_mla=True)`` with the
  split count of vLLM's ``_compute_num_kv_splits``, merges through vLLM's Triton
  ``merge_attn_states``. Not vLLM's: the latent cache write (vLLM's ``concat_and_cache_mla``
  and its context gather ``gather_and_maybe_dequant_cache`` are compiled only: the project's
  Triton ``cache_ops`` write and gather run instead), and the prefill attention, which vLLM on
  ROCm hands to a flash-attention library (upstream flash-attn or AITER's CK, V padded to 192):
  AITER's Triton ``flash_attn_varlen_func`` (V padded, as vLLM's FLASH_ATTN prefill backend on
  ROCm does) where amd-aiter loads, else the project's varlen kernel. The run's ``info``
  names which.
* ``attncheck-stand-in``: the project's kernels throughout.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from impl import platform
from impl.backend import Availability, BackendOutput, BlockSizes, Capabilities
from impl.backends.triton_attn import tf32_issue
from impl.batch import check_vllm_order
from impl.triton import cache_ops, mla_decode, varlen_attention
from impl.triton import merge_attn_states as merge_mod
from impl.vllm import ProviderChoice

# vLLM's MLA context workspace is at most 64 Ki tokens, shared by the prefills with context.
WORKSPACE_TOKENS = 64 * 1024


# ---- small tensor helpers (module level so tests can plant bugs in them) ---------------------

def absorbed_query(ql: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
    """[T, N, L] latent query and [T, N, R] rope query -> [T, N, L + R] (cache order [kv_c | k_pe])."""
    return torch.cat([ql, q_pe], dim=-1).contiguous()


def prefill_query(q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
    """[T, N, P] and [T, N, R] -> [T, N, P + R] (key order [k_nope | k_pe])."""
    return torch.cat([q_nope, q_pe], dim=-1).contiguous()


def prefill_key(k_nope: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
    """k_nope [T, N, P] and the shared rope key [T, R] -> [T, N, P + R]."""
    n = k_nope.shape[1]
    return torch.cat([k_nope, k_pe[:, None, :].expand(-1, n, -1)], dim=-1).contiguous()


def up_project(kv_c: torch.Tensor, w_uk: torch.Tensor, w_uv: torch.Tensor):
    """kv_c [T, L] -> (k_nope [T, N, P], v [T, N, V]) in the model dtype (vLLM's kv_b_proj)."""
    k_nope = torch.einsum("tl,lnp->tnp", kv_c, w_uk)
    v = torch.einsum("tl,lnv->tnv", kv_c, w_uv)
    return k_nope.contiguous(), v.contiguous()


def pad_v_to(v: torch.Tensor, dim: int) -> torch.Tensor:
    """Zero-pad V's head dim to ``dim`` (vLLM's ``_pad_v`` on ROCm)."""
    return torch.nn.functional.pad(v, (0, dim - v.shape[-1]))


def unpad_v(out: torch.Tensor, v_dim: int) -> torch.Tensor:
    """Slice a padded attention output [T, N, Dqk] back to [T, N, v_dim]."""
    return out[..., :v_dim]


def absorb_q(q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    """ql[t, h] = q_nope[t, h] @ W_UK[:, h]^T: [T, N, P] x [L, N, P] -> [T, N, L] (one bmm over heads)."""
    return torch.bmm(q_nope.transpose(0, 1), w_uk.permute(1, 2, 0)).transpose(0, 1)


def v_up_proj(o_lat: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """o[t, h] = o_lat[t, h] @ W_UV[:, h]: [T, N, L] x [L, N, V] -> [T, N, V]."""
    return torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(0, 1)).transpose(0, 1)


def expand_decode_entries(query_lens: list, seq_lens: list, block_table: torch.Tensor):
    """One decode entry per query token: token i of a row with q_len q and seq_len s sees keys
    0 .. s - q + i (causal spec decode). Returns (entry block-table rows [E, max_blocks], kv_lens [E])."""
    dev = block_table.device
    rows, lens = [], []
    for b, (q, s) in enumerate(zip(query_lens, seq_lens)):
        for i in range(q):
            rows.append(b)
            lens.append(s - q + i + 1)
    idx = torch.tensor(rows, dtype=torch.long, device=dev)
    return block_table.index_select(0, idx).contiguous(), torch.tensor(lens, dtype=torch.int32, device=dev)


def _cu(lens: list, device) -> torch.Tensor:
    out = [0]
    for x in lens:
        out.append(out[-1] + int(x))
    return torch.tensor(out, dtype=torch.int32, device=device)


class MLAPipeline:
    """vLLM's MLA forward with pluggable kernels (``_decode_latent`` and ``_attend``)."""

    name = "MLA_PIPELINE"
    kind = "MLA"
    known_issues = ()
    decode_threshold = 1  # rows with q_len <= this (at the head of the batch) are decodes
    uniform_decode = False  # True: decodes must share the first row's q_len (vLLM UNIFORM)
    pad_v = False
    workspace_tokens = WORKSPACE_TOKENS

    # ---- row split ------------------------------------------------------------------------
    def num_decodes(self, query_lens: list) -> int:
        n = 0
        for q in query_lens:
            if q > self.decode_threshold or (self.uniform_decode and q != query_lens[0]):
                break
            n += 1
        return n

    # ---- kernels (overridden by subclasses) ------------------------------------------------
    def _decode_latent(self, q: torch.Tensor, batch, entry_tables: torch.Tensor, kv_lens: torch.Tensor,
                       max_kv_len: int) -> torch.Tensor:
        raise NotImplementedError

    def _attend(self, q, k, v, cu_q, cu_k, max_q: int, max_k: int, q_lens: list, k_lens: list,
                causal: bool, scale: float):
        raise NotImplementedError

    def _merge(self, out, prefix_out, prefix_lse, suffix_out, suffix_lse, output_lse=None) -> None:
        merge_mod.merge_attn_states(out, prefix_out, prefix_lse, suffix_out, suffix_lse, output_lse=output_lse)

    # ---- pipeline ---------------------------------------------------------------------------
    def run(self, batch) -> BackendOutput:
        check_vllm_order(batch.row_kinds())  # the decode | prefill split below relies on it
        T, N, _ = batch.q_nope.shape
        V = batch.w_uv.shape[-1]
        latent = torch.cat([batch.kv_c, batch.k_pe], dim=-1)
        cache_ops.reshape_and_cache(latent[:, None, :], None, batch.kv_cache.unsqueeze(2), None,
                                    batch.slot_mapping, k_scale=batch.kv_scale)
        qlens, slens = batch.query_lens(), [int(s) for s in batch.seq_lens.tolist()]
        nd = self.num_decodes(qlens)
        td = sum(qlens[:nd])
        out = torch.empty(T, N, V, dtype=batch.dtype, device=batch.q_nope.device)
        info = {"decode_rows": nd, "prefill_rows": len(qlens) - nd}
        if nd:
            out[:td] = self._decode_rows(batch, qlens[:nd], slens[:nd], td)
        if nd < len(qlens):
            out[td:] = self._prefill_rows(batch, nd, td, qlens[nd:], slens[nd:], info)
        return BackendOutput(out, None, info=info)

    def _decode_rows(self, batch, qlens: list, slens: list, td: int) -> torch.Tensor:
        ql = absorb_q(batch.q_nope[:td], batch.w_uk)
        q = absorbed_query(ql, batch.q_pe[:td])
        tables, kv_lens = expand_decode_entries(qlens, slens, batch.block_table[:len(qlens)])
        o_lat = self._decode_latent(q, batch, tables, kv_lens, max(slens))
        return v_up_proj(o_lat, batch.w_uv)

    def _prefill_rows(self, batch, nd: int, td: int, qlens: list, slens: list, info: dict) -> torch.Tensor:
        dev = batch.q_nope.device
        L = batch.kv_lora_rank
        V = batch.w_uv.shape[-1]
        q = prefill_query(batch.q_nope[td:], batch.q_pe[td:])
        k_nope, v = up_project(batch.kv_c[td:], batch.w_uk, batch.w_uv)
        k = prefill_key(k_nope, batch.k_pe[td:])
        cu_q = _cu(qlens, dev)
        max_q = max(qlens)
        new_out, new_lse = self._attend_v(q, k, v, V, cu_q, cu_q, max_q, max_q, qlens, qlens, True, batch.scale)
        ctx_lens = [s - q_ for s, q_ in zip(slens, qlens)]
        if max(ctx_lens) == 0:
            info["context_chunks"] = 0
            return new_out
        ctx_out, ctx_lse, chunks = self._context(batch, nd, q, cu_q, max_q, qlens, ctx_lens, L, V)
        info["context_chunks"] = chunks
        out = torch.empty(new_out.shape, dtype=new_out.dtype, device=new_out.device)
        self._merge(out, ctx_out, ctx_lse, new_out, new_lse)
        return out

    def _attend_v(self, q, k, v, v_dim, cu_q, cu_k, max_q, max_k, q_lens, k_lens, causal, scale):
        """Attention with V padded to the qk dim and sliced back when ``pad_v`` (vLLM on ROCm)."""
        if self.pad_v and v.shape[-1] < q.shape[-1]:
            out, lse = self._attend(q, k, pad_v_to(v, q.shape[-1]), cu_q, cu_k, max_q, max_k, q_lens, k_lens,
                                    causal, scale)
            return unpad_v(out, v_dim), lse
        return self._attend(q, k, v, cu_q, cu_k, max_q, max_k, q_lens, k_lens, causal, scale)

    def chunk_tokens(self, batch, ctx_lens: list) -> int:
        if batch.context_chunk_tokens:
            return int(batch.context_chunk_tokens)
        with_ctx = sum(1 for c in ctx_lens if c > 0)
        return max(1, self.workspace_tokens // max(1, with_ctx))

    def _context(self, batch, nd, q, cu_q, max_q, qlens, ctx_lens, L, V):
        dev = q.device
        chunk = self.chunk_tokens(batch, ctx_lens)
        num_chunks = -(-max(ctx_lens) // chunk)
        table = batch.block_table[nd:].contiguous()
        acc_out: Optional[torch.Tensor] = None
        acc_lse: Optional[torch.Tensor] = None
        for c in range(num_chunks):
            start = c * chunk
            lens = [max(0, min(cl, start + chunk) - start) for cl in ctx_lens]
            cu_k = _cu(lens, dev)
            starts = torch.full((len(lens),), start, dtype=torch.int32, device=dev)
            lat, _ = cache_ops.gather_cache(batch.kv_cache.unsqueeze(2), None, table, cu_k, starts,
                                            k_scale=batch.kv_scale, out_dtype=batch.dtype)
            lat = lat[:, 0, :]
            k_nope, v = up_project(lat[:, :L], batch.w_uk, batch.w_uv)
            k = prefill_key(k_nope, lat[:, L:])
            o, lse = self._attend_v(q, k, v, V, cu_q, cu_k, max_q, max(lens), qlens, lens, False, batch.scale)
            if acc_out is None:
                acc_out, acc_lse = o, lse
            else:
                merged = torch.empty(o.shape, dtype=o.dtype, device=o.device)
                merged_lse = torch.empty_like(lse)
                self._merge(merged, acc_out, acc_lse, o, lse, output_lse=merged_lse)
                acc_out, acc_lse = merged, merged_lse
        return acc_out, acc_lse, num_chunks


def aiter_varlen_available() -> bool:
    """Whether AITER's Triton flash_attn_varlen_func can run in this process."""
    from impl.aiter import loader as aiter_loader

    try:
        aiter_loader.load()
    except aiter_loader.AiterUnavailable:
        return False
    return True


# what both providers take; each replaces the fp8 flavours and the notes
MLA_CAPABILITIES = Capabilities(dtypes=frozenset({torch.float16, torch.bfloat16}),
                                block_sizes=BlockSizes(multiple_of=16, minimum=16),
                                causal=True, non_causal=False, returns_lse=False)
BLOCK_SIZE_NOTE = "vLLM requires block_size >= 16 for TRITON_MLA (ROCM_AITER_MLA takes block size 1)"


class TritonMLABackend(MLAPipeline):
    name = "TRITON_MLA"
    decode_threshold = 1
    pad_v = True  # as vLLM on ROCm (its flash attention needs qk dim == v dim)

    def __init__(self, provider: Optional[str] = None):
        """``provider``: 'auto', 'vllm' or 'stand-in' (None: ATTNCHECK_PROVIDER)."""
        self._choice = ProviderChoice(provider)
        self._aiter_prefill: Optional[bool] = None

    @property
    def provider(self) -> str:
        return self._choice.provider

    @property
    def known_issues(self) -> tuple:
        return (tf32_issue(self.name),) if self._choice.uses_vllm else ()

    def prefill_kernel(self) -> str:
        """Which varlen kernel the prefill runs: AITER's Triton one under the vLLM provider where
        amd-aiter loads (the kernel family of vLLM's ROCm prefill), else the project's."""
        if not self._choice.uses_vllm:
            return "own varlen_attention"
        if self._aiter_prefill is None:
            self._aiter_prefill = aiter_varlen_available()
        return "AITER Triton flash_attn_varlen_func" if self._aiter_prefill else "own varlen_attention"

    @property
    def capabilities(self) -> Capabilities:
        if self._choice.uses_vllm:
            from impl.vllm import kernels

            return replace(
                MLA_CAPABILITIES, fp8_kv=kernels.fp8_kv_flavours(),
                notes=(BLOCK_SIZE_NOTE,
                       "decode: vLLM's decode_attention_fwd(is_mla=True); merges: vLLM's Triton "
                       "merge_attn_states",
                       "latent cache write and context gather: the project's Triton kernels (vLLM's "
                       "concat_and_cache_mla and gather_and_maybe_dequant_cache are compiled only)",
                       f"prefill attention (V zero-padded 128 -> 192): {self.prefill_kernel()}"))
        return replace(
            MLA_CAPABILITIES, fp8_kv=platform.triton_fp8_flavours(),
            notes=(BLOCK_SIZE_NOTE,
                   "decode: own Triton absorbed-MLA kernel (split-KV + reduce); prefill: own Triton "
                   "varlen attention with V zero-padded 128 -> 192 and sliced back, context chunks merged"))

    def availability(self, device) -> Availability:
        return self._choice.gate(self._triton_availability(device))

    def _triton_availability(self, device) -> Availability:
        device = torch.device(device)
        if device.type == "cpu":
            if not platform.is_interpreter():
                return Availability.no("TRITON_MLA's Triton kernels on the CPU need TRITON_INTERPRET=1")
            return Availability.yes("Triton interpreter")
        if device.type == "cuda":
            if platform.is_interpreter():
                return Availability.no("TRITON_INTERPRET=1 runs kernels on the CPU; use --device cpu")
            return Availability.yes("ROCm" if platform.is_rocm() else "CUDA")
        return Availability.no(f"device {device}: needs the Triton interpreter (CPU) or a GPU")

    def run(self, batch) -> BackendOutput:
        result = super().run(batch)
        vllm = self._choice.uses_vllm
        ran = ["own cache_ops.reshape_and_cache (latent write)"]
        if result.info.get("decode_rows"):
            ran.append("vllm decode_attention_fwd(is_mla)" if vllm else "own mla_decode")
        if result.info.get("prefill_rows"):
            ran.append(self.prefill_kernel())
            if result.info.get("context_chunks"):
                ran += ["own cache_ops.gather_cache (context)",
                        "vllm merge_attn_states (Triton)" if vllm else "own merge_attn_states"]
        result.info.update(provider=self.provider, kernels=ran)
        return result

    def _decode_latent(self, q, batch, entry_tables, kv_lens, max_kv_len):
        if self._choice.uses_vllm:
            from impl.vllm import kernels

            o_lat, _ = kernels.mla_decode(q, batch.kv_cache, entry_tables, kv_lens, scale=batch.scale,
                                          kv_lora_rank=batch.kv_lora_rank, kv_scale=batch.kv_scale,
                                          max_kv_len=max_kv_len)
            return o_lat
        o_lat, _ = mla_decode.mla_decode(q, batch.kv_cache, entry_tables, kv_lens, scale=batch.scale,
                                         kv_lora_rank=batch.kv_lora_rank, kv_scale=batch.kv_scale,
                                         max_kv_len=max_kv_len)
        return o_lat

    def _attend(self, q, k, v, cu_q, cu_k, max_q, max_k, q_lens, k_lens, causal, scale):
        if self.prefill_kernel().startswith("AITER"):
            from impl.aiter import triton_kernels

            return triton_kernels.flash_attn_varlen(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                                    max_seqlen_q=max_q, max_seqlen_k=max_k, scale=scale,
                                                    causal=causal)
        return varlen_attention.varlen_attention(q, k, v, cu_q, cu_k, scale=scale, causal=causal,
                                                 max_seqlen_q=max_q)

    def _merge(self, out, prefix_out, prefix_lse, suffix_out, suffix_lse, output_lse=None) -> None:
        if self._choice.uses_vllm:
            from impl.vllm import kernels

            kernels.merge_attn_states(out, prefix_out, prefix_lse, suffix_out, suffix_lse, output_lse)
            return
        super()._merge(out, prefix_out, prefix_lse, suffix_out, suffix_lse, output_lse)


BACKENDS = (TritonMLABackend,)  # what impl.backends.builtin_backends() registers from this module
