"""TORCH_SDPA: per sequence, gather the paged K/V and call torch's
``scaled_dot_product_attention`` with a correct bottom-right causal mask.

Not a vLLM backend: it exercises the harness and gives a trusted torch baseline. Masks are
passed so that torch can pick its fused kernels on CUDA: no mask for decode rows (q_len 1
sees every key), ``is_causal=True`` when q_len == seq_len (top-left equals bottom-right
there), and ``causal_lower_right`` otherwise; sliding window and ALiBi need an explicit
float mask (math or memory-efficient kernel). SDPA has no softcap, sinks or LSE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from impl.backend import Availability, BackendOutput, BlockSizes, Capabilities
from impl.batch import FP8_DTYPES


def quantize_to_cache(x: torch.Tensor, cache_dtype: torch.dtype, scale: float) -> torch.Tensor:
    """The cache storage convention of impl/batch.py: RNE(clamp(x.float() / scale, ±max))."""
    if cache_dtype not in FP8_DTYPES.values():
        return x.to(cache_dtype)
    fmax = torch.finfo(cache_dtype).max
    return (x.float() / scale).clamp(-fmax, fmax).to(cache_dtype)


class TorchSDPABackend:
    name = "TORCH_SDPA"
    kind = "MHA"
    provider = f"torch=={torch.__version__}"
    capabilities = Capabilities(
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        block_sizes=BlockSizes(multiple_of=1),
        sliding_window=True, alibi=True, softcap=False, sinks=False,
        fp8_kv=frozenset({"fp8_e4m3fn", "fp8_e4m3fnuz"}),
        returns_lse=False,
        notes=("SDPA has no softcap, no sinks and returns no LSE",),
    )

    # (torch's fused fp32 SDPA on CUDA put a row with one visible key 2 ulp off V, ratio 2.0, before the
    # budgets' float32 step term covered the final normalisation: on an H200 it now passes at 0.06)
    known_issues = ()

    def availability(self, device: torch.device) -> Availability:
        return Availability.yes("torch scaled_dot_product_attention (fused kernels on CUDA)")

    def run(self, batch) -> BackendOutput:
        self._write_cache(batch)
        bs = batch.block_size
        qsl = batch.query_start_loc.tolist()
        out = torch.empty_like(batch.query)
        group = batch.num_heads // batch.num_kv_heads
        for b, seq_len in enumerate(batch.seq_lens.tolist()):
            q = batch.query[qsl[b]:qsl[b + 1]]
            k, v = self._gather(batch, b, seq_len, bs)
            q_len = q.shape[0]
            mask, is_causal = self._mask(batch, q_len, seq_len, q.device)
            # [1, heads, tokens, dim]: fused kernels need 4-D inputs (3-D silently falls back to
            # the math kernel). GQA by repeating K/V (enable_gqa has no kernel for every case).
            qh = q.transpose(0, 1)[None]
            kh = k.transpose(0, 1).repeat_interleave(group, dim=0)[None]
            vh = v.transpose(0, 1).repeat_interleave(group, dim=0)[None]
            if mask is not None and mask.dtype == torch.float32:
                # A float mask (window/ALiBi) must match the query dtype; rounding an ALiBi
                # bias to bf16 would cost more than the whole budget, so compute in float32.
                qh, kh, vh = qh.float(), kh.float(), vh.float()
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=is_causal, scale=batch.scale)
            out[qsl[b]:qsl[b + 1]] = o[0].transpose(0, 1).to(out.dtype)
        return BackendOutput(output=out, lse=None, info={"kernel": "torch.sdpa"})

    @staticmethod
    def _write_cache(batch) -> None:
        Hkv, D = batch.num_kv_heads, batch.head_size
        kc = batch.key_cache.view(-1, Hkv, D)
        vc = batch.value_cache.view(-1, Hkv, D)
        kc[batch.slot_mapping] = quantize_to_cache(batch.key, kc.dtype, batch.k_scale)
        vc[batch.slot_mapping] = quantize_to_cache(batch.value, vc.dtype, batch.v_scale)

    @staticmethod
    def _gather(batch, b: int, seq_len: int, bs: int):
        n_blocks = -(-seq_len // bs)
        blocks = batch.block_table[b, :n_blocks].long()
        k = batch.key_cache[blocks].reshape(-1, batch.num_kv_heads, batch.head_size)[:seq_len]
        v = batch.value_cache[blocks].reshape(-1, batch.num_kv_heads, batch.head_size)[:seq_len]
        if batch.is_fp8:
            k = (k.to(torch.float32) * batch.k_scale).to(batch.dtype)
            v = (v.to(torch.float32) * batch.v_scale).to(batch.dtype)
        return k, v

    @staticmethod
    def _mask(batch, q_len: int, seq_len: int, device):
        needs_float_mask = batch.sliding_window is not None or batch.alibi_slopes is not None
        if not needs_float_mask:
            if not batch.causal or q_len == 1:
                return None, False
            if q_len == seq_len:
                return None, True
            from torch.nn.attention.bias import causal_lower_right
            return causal_lower_right(q_len, seq_len), False
        qpos = torch.arange(seq_len - q_len, seq_len, device=device)[:, None]
        kpos = torch.arange(seq_len, device=device)[None, :]
        allowed = torch.ones(q_len, seq_len, dtype=torch.bool, device=device)
        if batch.causal:
            allowed &= kpos <= qpos
        if batch.sliding_window is not None:
            allowed &= (qpos - kpos) < batch.sliding_window
        mask = torch.zeros(batch.num_heads, q_len, seq_len, dtype=torch.float32, device=device)
        if batch.alibi_slopes is not None:
            dist = (qpos - kpos).abs().to(torch.float32)
            mask = mask - batch.alibi_slopes.to(device)[:, None, None] * dist
        if batch.alibi_slopes is None:
            return allowed, False  # boolean mask: any dtype, fused kernels allowed
        return mask.masked_fill(~allowed, float("-inf")), False


BACKENDS = (TorchSDPABackend,)  # what impl.backends.builtin_backends() registers from this module
