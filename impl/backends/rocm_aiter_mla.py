"""ROCM_AITER_MLA: vLLM's MLA pipeline with AITER kernels (research/vllm-backends.md 4.3,
research/aiter-kernels.md 4.3, 4.10 and 6).

Same pipeline as TRITON_MLA (``impl.backends.triton_mla.MLAPipeline``: latent write, absorbed
decode, up-projected prefill with chunked context merged by ``merge_attn_states``), with AITER's
kernels:

* decode, on ROCm: ``aiter.mla.mla_decode_fwd`` (ASM), called with keyword arguments only (its
  positional order changed between AITER versions), page size 1, ``sm_scale`` always passed
  (AITER's default is 1/sqrt(576), the wrong MLA scale). **Not verified on this machine**: no
  machine this suite runs on has ROCm; the adapter is reported as such.
  Elsewhere (CPU interpreter, CUDA): AITER's Triton MLA decode
  ``aiter.ops.triton.mla_decode_rope.decode_attention_fwd_grouped_rope(use_rope=False)``, which
  reads a token-granular buffer ``[slots, 1, 576]`` through ``kv_indptr``/``kv_indices``. Like
  vLLM, the block table is expanded to page size 1 (any block size works). That Triton kernel
  dots the cache tile in q's dtype and knows no kv scale, so an fp8 cache is first gathered and
  dequantised (``cache_ops.gather_cache``) into a model-dtype buffer.
* prefill: on ROCm ``aiter.flash_attn_varlen_func`` (CK; qk 192 / v 128 directly, LSE ``[H, T]``);
  elsewhere AITER's Triton ``aiter.ops.triton.mha.flash_attn_varlen_func`` (LSE ``[T, H]`` with 0
  for rows without keys: transposed and set to -inf, as vLLM's AITER Triton MLA does).

Decode rows: vLLM's AITER MLA declares uniform multi-token decode, so with speculative decoding
the leading rows that all share the first row's q_len, up to ``decode_threshold`` (8 here: up to
7 speculative tokens), go down the absorbed path. Each query token becomes its own decode entry
whose keys end at its own position (causal); vLLM's eager path once built ``qo_indptr`` with one
query per request instead (research notes, "also worth testing"), which this layout avoids.
"""

from __future__ import annotations

import importlib
import warnings

import torch

from impl import platform
from impl.aiter import loader, rocm_ops, support, triton_kernels
from impl.backend import Availability, BlockSizes, Capabilities
from impl.backends.triton_mla import MLAPipeline, _cu
from impl.triton import cache_ops, mla_decode

NOT_VERIFIED = ("ROCm: aiter.mla.mla_decode_fwd (ASM) decode + CK flash_attn_varlen_func prefill; "
                "not verified on this machine")
# keyword names passed to aiter.mla.mla_decode_fwd (checked against the installed wheel's source)
MLA_DECODE_FWD_KWARGS = ("q", "kv_buffer", "o", "qo_indptr", "kv_indptr", "kv_indices", "kv_last_page_lens",
                         "max_seqlen_q", "sm_scale", "logit_cap", "q_scale", "kv_scale")
_FP8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


def page_size_one_indices(entry_tables: torch.Tensor, kv_lens: torch.Tensor, block_size: int):
    """Expand block tables to page size 1: (kv_indptr [E+1] int32, kv_indices [sum kv_lens] int32),
    entry e's keys 0..kv_lens[e]-1 at slots ``table[e, p // bs] * bs + p % bs``."""
    dev = entry_tables.device
    lens = kv_lens.to(torch.long)
    indptr = torch.zeros(lens.shape[0] + 1, dtype=torch.long, device=dev)
    indptr[1:] = torch.cumsum(lens, 0)
    total = int(indptr[-1])
    entry = torch.repeat_interleave(torch.arange(lens.shape[0], device=dev), lens, output_size=total)
    pos = torch.arange(total, device=dev) - indptr[entry]
    slots = entry_tables[entry, pos // block_size].to(torch.long) * block_size + pos % block_size
    return indptr.to(torch.int32), slots.to(torch.int32)


def triton_decode_config(device: torch.device) -> dict:
    """Launch config for AITER's Triton MLA decode (replaces its gfx-keyed JSON, whose AMD-only
    options CUDA Triton rejects). A fresh dict per call: AITER writes BLOCK_C/... into it."""
    stages = 2 if device.type == "cuda" else 1
    return {"fwd_grouped_kernel_stage1_rope": {"BLOCK_N": 32, "BLOCK_H": 16, "num_stages": stages},
            "fwd_kernel_stage2": {"num_stages": stages}}


def bucketed_entries(q, entry_tables, kv_lens, pad: bool):
    """AITER's Triton MLA decode takes the entry count (``batch``) and ``NUM_KV_SPLITS`` as
    constexprs: every new count compiles both kernels again (176 compilations in 85 sweep checks
    on an H200). On CUDA the entries are padded to a power of two, as vLLM pads decode batches to
    its CUDA-graph sizes: each extra entry attends to one key (entry 0's first, a written slot),
    and its output is dropped. Entries are independent programs, so the real ones compute the
    same thing. Returns (q, entry_tables, kv_lens), padded when ``pad``."""
    E = q.shape[0]
    if not pad or E == 0 or E & (E - 1) == 0:
        return q, entry_tables, kv_lens
    extra = (1 << E.bit_length()) - E
    q = torch.cat([q, q[:1].expand(extra, *q.shape[1:])])
    entry_tables = torch.cat([entry_tables, entry_tables[:1].expand(extra, -1)])
    kv_lens = torch.cat([kv_lens, torch.ones(extra, dtype=kv_lens.dtype, device=kv_lens.device)])
    return q, entry_tables, kv_lens


def aiter_triton_mla_decode(q, kv_cache, entry_tables, kv_lens, *, scale: float, kv_lora_rank: int,
                            kv_scale: float, num_splits=None, max_kv_len=None, bucket=None):
    """AITER's Triton absorbed-MLA decode over a paged latent cache. Returns o [E, N, L] in q's dtype.
    ``bucket`` (default: on CUDA, where compilations cost) pads the entries and rounds the split
    count down to powers of two (``bucketed_entries``)."""
    bucket = q.device.type == "cuda" if bucket is None else bucket
    real = q.shape[0]
    q, entry_tables, kv_lens = bucketed_entries(q, entry_tables, kv_lens, bucket)
    E, N, D = q.shape
    L, R = kv_lora_rank, D - kv_lora_rank
    dev = q.device
    if kv_cache.dtype in _FP8:
        cu = _cu(kv_lens.tolist(), dev)
        starts = torch.zeros(E, dtype=torch.int32, device=dev)
        buf, _ = cache_ops.gather_cache(kv_cache.unsqueeze(2), None, entry_tables, cu, starts,
                                        k_scale=kv_scale, out_dtype=q.dtype)
        indptr, indices = cu, torch.arange(buf.shape[0], dtype=torch.int32, device=dev)
    else:
        buf = kv_cache.view(-1, 1, D)
        indptr, indices = page_size_one_indices(entry_tables, kv_lens, kv_cache.shape[1])
    if num_splits is None:
        mk = max_kv_len if max_kv_len is not None else int(kv_lens.max())
        num_splits = mla_decode.default_num_splits(E, -(-N // 16), mk, dev)
        if bucket:  # a power of two too: NUM_KV_SPLITS is a constexpr (bucketed_entries)
            num_splits = 1 << (int(num_splits).bit_length() - 1)
    o = torch.empty(E, N, L, dtype=q.dtype, device=dev)
    logits = torch.empty(E, N, num_splits, L + 1, dtype=torch.float32, device=dev)
    # rope inputs are unused with use_rope=False; small real tensors keep every launch argument a pointer
    k_pe_tokens = torch.empty(E, R, dtype=q.dtype, device=dev)
    cos_sin = torch.zeros(1, R, dtype=q.dtype, device=dev)
    positions = torch.zeros(E, dtype=torch.int64, device=dev)
    mod = loader.triton_module("mla_decode_rope")
    with warnings.catch_warnings():
        # With fewer than 16 heads, AITER's kernel computes exp(-inf - -inf) for the padding rows of
        # its 16-head tile (masked on store); under the interpreter numpy warns about that NaN.
        warnings.filterwarnings("ignore", "invalid value encountered in subtract", RuntimeWarning)
        mod.decode_attention_fwd_grouped_rope(
            q=q.contiguous(), k_buffer=buf, v_buffer=buf[..., :L], o=o, kv_indptr=indptr, kv_indices=indices,
            k_pe_tokens=k_pe_tokens, kv_lora_rank=L, rotary_dim=R, cos_sin_cache=cos_sin, positions=positions,
            attn_logits=logits, num_kv_splits=int(num_splits), sm_scale=float(scale), logit_cap=0.0,
            use_rope=False, is_neox_style=False, config=triton_decode_config(dev))
    return o[:real]


def rocm_mla_decode(q, kv_cache, entry_tables, kv_lens, *, scale: float, kv_lora_rank: int, kv_scale: float):
    """``aiter.mla.mla_decode_fwd`` (ASM, ROCm only; NOT VERIFIED on this machine). One query per
    entry, page size 1; fp8 caches get q quantised with q_scale 1 and the kv_scale, as vLLM does."""
    loader.rocm_aiter()  # raises AiterUnavailable off ROCm
    mla = importlib.import_module("aiter.mla")
    E, N, D = q.shape
    dev = q.device
    indptr, indices = page_size_one_indices(entry_tables, kv_lens, kv_cache.shape[1])
    o = torch.empty(E, N, kv_lora_rank, dtype=q.dtype, device=dev)
    kw = dict(q=q.contiguous(), kv_buffer=kv_cache.view(-1, 1, 1, D), o=o,
              qo_indptr=torch.arange(E + 1, dtype=torch.int32, device=dev), kv_indptr=indptr,
              kv_indices=indices, kv_last_page_lens=torch.ones(E, dtype=torch.int32, device=dev),
              max_seqlen_q=1, sm_scale=float(scale), logit_cap=0.0)
    if kv_cache.dtype in _FP8:
        m = torch.finfo(kv_cache.dtype).max
        kw["q"] = q.float().clamp(-m, m).to(kv_cache.dtype).contiguous()
        kw["q_scale"] = torch.ones(1, dtype=torch.float32, device=dev)
        kw["kv_scale"] = torch.tensor([float(kv_scale)], dtype=torch.float32, device=dev)
    assert set(kw) <= set(MLA_DECODE_FWD_KWARGS)
    mla.mla_decode_fwd(**kw)
    return o


class AiterMLABackend(MLAPipeline):
    name = "ROCM_AITER_MLA"
    decode_threshold = 8
    uniform_decode = True
    pad_v = False  # AITER's flash attention takes qk 192 / v 128 directly

    @property
    def provider(self) -> str:
        return support.provider()

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            dtypes=frozenset({torch.float16, torch.bfloat16}),
            block_sizes=BlockSizes(),  # any: block tables are expanded to page size 1
            causal=True, non_causal=False, fp8_kv=platform.triton_fp8_flavours(), returns_lse=False,
            notes=("vLLM declares block sizes 1 and 16; the page-size-1 expansion here takes any",
                   "decode: uniform q_len <= 8 rows (spec decode) through the absorbed kernel",
                   "off ROCm: AITER Triton MLA decode + Triton mha prefill; the ROCm ASM/CK path is "
                   "not verified on this machine"))

    def availability(self, device) -> Availability:
        avail = support.availability(device)
        if not avail.ok:
            return avail
        if torch.device(device).type == "cuda" and platform.is_rocm():
            return Availability(True, NOT_VERIFIED, verified=False)
        return Availability.yes(f"{avail.reason}: AITER Triton MLA decode and mha prefill "
                                f"(the ROCm ASM mla_decode_fwd path is not verified on this machine)")

    def _on_rocm(self) -> bool:
        return platform.kernel_target() == "rocm"

    def _decode_latent(self, q, batch, entry_tables, kv_lens, max_kv_len):
        kw = dict(scale=batch.scale, kv_lora_rank=batch.kv_lora_rank, kv_scale=batch.kv_scale)
        if self._on_rocm():
            return rocm_mla_decode(q, batch.kv_cache, entry_tables, kv_lens, **kw)
        return aiter_triton_mla_decode(q, batch.kv_cache, entry_tables, kv_lens, max_kv_len=max_kv_len, **kw)

    def _attend(self, q, k, v, cu_q, cu_k, max_q, max_k, q_lens, k_lens, causal, scale):
        if self._on_rocm():
            return rocm_ops.ck_flash_attn_varlen(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                                 max_seqlen_q=max_q, max_seqlen_k=max(1, max_k),
                                                 min_seqlen_q=1, scale=scale, causal=causal, return_lse=True)
        mha = loader.triton_module("mha")
        out, lse = mha.flash_attn_varlen_func(
            q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=int(max_q),
            max_seqlen_k=max(1, int(max_k)), dropout_p=0.0, softmax_scale=float(scale), causal=bool(causal),
            return_lse=True, config=triton_kernels.mha_config(q.device, q.shape[-1], q.dtype))
        return out, triton_kernels.normalize_lse(lse, triton_kernels.empty_rows(q_lens, k_lens, causal))


BACKENDS = (AiterMLABackend,)  # what impl.backends.builtin_backends() registers from this module
