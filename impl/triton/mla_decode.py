"""Absorbed-MLA decode: MQA of 576-wide queries over the paged latent cache (V = first 512 channels).

Layout: q ``[B, N, L + R]`` = ``[q_nope @ W_UK (L = 512) | q_pe (R = 64)]``, one query row per
entry b; latent cache ``[num_blocks, block_size, L + R]`` (model dtype, or fp8 with one per-tensor
``kv_scale``); entry b reads positions ``0 .. kv_lens[b]-1`` through ``block_table[b]`` (token p
lives in block ``block_table[b, p // block_size]`` at offset ``p % block_size``; block_size 1 is
the token-granular layout). Keys are the whole latent, values its first L channels, so one tile
load serves both dots. Output: the latent attention output ``o [B, N, L]`` in q's dtype and
``lse [N, B]`` float32 natural log; an entry with no key gives 0 and -inf. Multi-token (spec)
decode is expressed by the caller as one entry per query token with its own kv length.

Tiling, two stages (split-KV, FlashDecoding-style):
* stage 1, grid (B, cdiv(N, BLOCK_H), S): a program packs BLOCK_H = 16 heads of one entry (so
  every ``tl.dot`` has >= 16 rows on GPU) and walks its 1/S share of the keys in BLOCK_N tiles
  with an online base-2 softmax, writing a normalised partial output and its LSE per split;
* stage 2, grid (B, N): combines the S partials with weights exp(lse_s - max).
fp8: raw fp8 values are exact in fp16/bf16, so tiles are upcast to q's dtype and the kv_scale is
applied to the fp32 scores and to the final output instead of to every element.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from impl.triton import compat
from impl.triton.tiles import online_softmax_update

_LOG2E = 1.4426950408889634
_FP8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
_DTYPES = (torch.float16, torch.bfloat16)


@triton.jit
def _mla_decode_stage1(
    Q, CACHE, BT, KV_LENS, O_PART, LSE_PART,
    scale_log2, kv_scale, num_heads, page_size,
    stride_qb, stride_qh, stride_cb, stride_cs, stride_btb,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    L: tl.constexpr, R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, IS_FP8: tl.constexpr,
):
    b = tl.program_id(0)
    hb = tl.program_id(1)
    sp = tl.program_id(2)
    kv_len = tl.load(KV_LENS + b)
    # split boundaries on BLOCK_N multiples so only the last tile of the last split is ragged
    split_len = tl.cdiv(tl.cdiv(kv_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = sp * split_len
    hi = tl.minimum(lo + split_len, kv_len)

    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < num_heads
    offs_l = tl.arange(0, BLOCK_L)
    offs_r = tl.arange(0, BLOCK_R)
    l_mask = offs_l < L
    r_mask = offs_r < R
    q_rows = b.to(tl.int64) * stride_qb + offs_h * stride_qh
    q_c = tl.load(Q + q_rows[:, None] + offs_l[None, :], mask=h_mask[:, None] & l_mask[None, :], other=0.0)
    q_r = tl.load(Q + q_rows[:, None] + L + offs_r[None, :], mask=h_mask[:, None] & r_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_L], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        page = tl.load(BT + b.to(tl.int64) * stride_btb + offs_n // page_size, mask=n_mask, other=0)
        rows = page.to(tl.int64) * stride_cb + (offs_n % page_size).to(tl.int64) * stride_cs
        kc = tl.load(CACHE + rows[:, None] + offs_l[None, :], mask=n_mask[:, None] & l_mask[None, :], other=0.0)
        kr = tl.load(CACHE + rows[:, None] + L + offs_r[None, :], mask=n_mask[:, None] & r_mask[None, :],
                     other=0.0)
        if IS_FP8:
            kc = kc.to(tl.float32).to(Q.dtype.element_ty)
            kr = kr.to(tl.float32).to(Q.dtype.element_ty)
        s = tl.dot(q_c, tl.trans(kc)) + tl.dot(q_r, tl.trans(kr))
        s = s * scale_log2
        if IS_FP8:
            s = s * kv_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        # the latent is both K (with the rope part) and V: P.V multiplies by kc again
        acc, m_i, l_i = online_softmax_update(acc, m_i, l_i, s, kc, True, True, "tf32")

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if IS_FP8:
        out = out * kv_scale
    o_ptr = O_PART + b.to(tl.int64) * stride_ob + sp * stride_os + offs_h[:, None] * stride_oh + offs_l[None, :]
    tl.store(o_ptr, out, mask=h_mask[:, None] & l_mask[None, :])
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(LSE_PART + b.to(tl.int64) * stride_lb + offs_h * stride_lh + sp, lse, mask=h_mask)


@triton.jit
def _mla_decode_stage2(
    O_PART, LSE_PART, O, LSE,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    stride_ob, stride_oh, stride_lse_h,
    L: tl.constexpr, BLOCK_L: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < NUM_SPLITS
    offs_l = tl.arange(0, BLOCK_L)
    l_mask = offs_l < L
    lse_s = tl.load(LSE_PART + b.to(tl.int64) * stride_lb + h * stride_lh + offs_s, mask=s_mask,
                    other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_shift = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_shift)  # empty splits (lse -inf) weigh 0
    total = tl.sum(w, 0)
    parts = tl.load(O_PART + b.to(tl.int64) * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps
                    + offs_l[None, :], mask=s_mask[:, None] & l_mask[None, :], other=0.0)
    t_safe = tl.where(total == 0.0, 1.0, total)
    out = tl.sum(parts * w[:, None], 0) / t_safe
    tl.store(O + b.to(tl.int64) * stride_ob + h * stride_oh + offs_l, out.to(O.dtype.element_ty), mask=l_mask)
    lse = tl.where(total == 0.0, float("-inf"), m_shift + tl.log(t_safe))
    tl.store(LSE + h * stride_lse_h + b, lse)


def default_num_splits(batch: int, head_blocks: int, max_kv_len: int, device: torch.device) -> int:
    """Enough programs to fill the GPU (about 2 per SM), at least 256 keys per split, at most 16."""
    if device.type != "cuda":
        return max(1, min(4, triton.cdiv(max_kv_len, 64)))  # interpreter: few programs
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(2 * sms, max(1, batch * head_blocks))
    return int(max(1, min(16, want, triton.cdiv(max(max_kv_len, 1), 256))))


def _validate(q, kv_cache, block_table, kv_lens, kv_lora_rank, scale, kv_scale):
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q: expected [batch, heads, kv_lora_rank + rope_dim], got {tuple(getattr(q, 'shape', ()))}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"q: dtype must be float16 or bfloat16, got {q.dtype}")
    if not isinstance(kv_cache, torch.Tensor) or kv_cache.dim() != 3 or kv_cache.shape[2] != q.shape[2]:
        raise ValueError(f"kv_cache: expected [num_blocks, block_size, {q.shape[2]}], got "
                         f"{tuple(getattr(kv_cache, 'shape', ()))}")
    if kv_cache.dtype not in _FP8 and kv_cache.dtype != q.dtype:
        raise ValueError(f"kv_cache: dtype must be q's {q.dtype} or fp8 e4m3fn/e4m3fnuz, got {kv_cache.dtype}")
    if kv_cache.stride(2) != 1:
        raise ValueError("kv_cache: the latent (last) dim must be contiguous")
    if not 0 < kv_lora_rank < q.shape[2]:
        raise ValueError(f"kv_lora_rank: expected 0 < rank < {q.shape[2]}, got {kv_lora_rank}")
    for name, t, nd in (("block_table", block_table, 2), ("kv_lens", kv_lens, 1)):
        if not isinstance(t, torch.Tensor) or t.dim() != nd or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name}: expected a {nd}-D int32/int64 tensor")
        if t.shape[0] != q.shape[0]:
            raise ValueError(f"{name}: expected {q.shape[0]} rows (one per query entry), got {t.shape[0]}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device}, got {t.device}")
    if kv_cache.device != q.device:
        raise ValueError(f"kv_cache: expected device {q.device}, got {kv_cache.device}")
    if block_table.stride(1) != 1:
        raise ValueError("block_table: rows must be contiguous")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: expected a positive finite float, got {scale!r}")
    if not (math.isfinite(kv_scale) and kv_scale > 0):
        raise ValueError(f"kv_scale: expected a positive finite float, got {kv_scale!r}")
    if kv_cache.dtype == torch.float8_e4m3fnuz and q.device.type == "cuda":
        raise ValueError("kv_cache: float8_e4m3fnuz needs the Triton interpreter (CUDA Triton has no "
                         "e4m3fnuz); use float8_e4m3fn on NVIDIA GPUs")


def mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, kv_lens: torch.Tensor, *,
               scale: float, kv_lora_rank: int = 512, kv_scale: float = 1.0, num_splits: Optional[int] = None,
               max_kv_len: Optional[int] = None, out: Optional[torch.Tensor] = None,
               block_n: Optional[int] = None):
    """Absorbed MLA decode. Returns ``(o [B, N, kv_lora_rank] in q's dtype, lse [N, B] float32)``.

    ``scale`` is the layer scale (qk_head_dim ** -0.5 * mscale ** 2), not 576 ** -0.5.
    ``max_kv_len`` (host int) avoids a device sync when choosing ``num_splits``.
    """
    scale, kv_scale = float(scale), float(kv_scale)
    _validate(q, kv_cache, block_table, kv_lens, kv_lora_rank, scale, kv_scale)
    if q.device.type != "cuda":
        compat.install()  # interpreter: bf16 / fp8 arithmetic patches (no-op when compiled)
    B, N, D = q.shape
    L, R = kv_lora_rank, D - kv_lora_rank
    if q.stride(2) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty(B, N, L, dtype=q.dtype, device=q.device)
    elif out.shape != (B, N, L) or out.dtype != q.dtype or out.stride(2) != 1:
        raise ValueError(f"out: expected a [{B}, {N}, {L}] {q.dtype} tensor with a contiguous last dim")
    lse = torch.empty(N, B, dtype=torch.float32, device=q.device)
    if B == 0:
        return out, lse
    block_h = 16
    head_blocks = triton.cdiv(N, block_h)
    if num_splits is None:
        if max_kv_len is None:
            max_kv_len = int(kv_lens.max())
        num_splits = default_num_splits(B, head_blocks, max_kv_len, q.device)
    if int(num_splits) < 1:
        raise ValueError(f"num_splits: expected >= 1, got {num_splits}")
    num_splits = int(num_splits)
    bn = block_n or (32 if q.device.type == "cuda" else 16)
    if bn < 16 or bn & (bn - 1):
        raise ValueError(f"block_n: a power of two >= 16 required, got {bn}")
    block_l = triton.next_power_of_2(L)
    o_part = torch.empty(B, N, num_splits, L, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(B, N, num_splits, dtype=torch.float32, device=q.device)
    _mla_decode_stage1[(B, head_blocks, num_splits)](
        q, kv_cache, block_table, kv_lens, o_part, lse_part,
        scale * _LOG2E, kv_scale, N, kv_cache.shape[1],
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), block_table.stride(0),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        L=L, R=R, BLOCK_L=block_l, BLOCK_R=max(16, triton.next_power_of_2(R)),
        BLOCK_H=block_h, BLOCK_N=bn, NUM_SPLITS=num_splits, IS_FP8=kv_cache.dtype in _FP8,
        num_warps=4, num_stages=2,
    )
    _mla_decode_stage2[(B, N)](
        o_part, lse_part, out, lse,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        L=L, BLOCK_L=block_l, NUM_SPLITS=num_splits, BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
        num_warps=4,
    )
    return out, lse
