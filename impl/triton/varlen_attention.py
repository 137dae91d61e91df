"""Varlen flash attention (forward) with separate QK and V head dims: MLA prefill (qk 192, v 128).

Layout: packed sequences ("thd"). q ``[T, H, Dqk]``, k ``[Tk, Hkv, Dqk]``, v ``[Tk, Hkv, Dv]``;
sequence b owns query rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` and key rows
``cu_seqlens_k[b]:cu_seqlens_k[b+1]``. Query head h reads kv head ``h // (H // Hkv)``.
Outputs: ``out [T, H, Dv]`` in q's dtype and ``lse [H, T]`` float32 natural log (vLLM's
``merge_attn_states`` layout); a row with no visible key gives out 0 and LSE -inf.

Causal masking is bottom-right aligned (query i of a sequence sits at key position
``k_len - q_len + i``), so "new tokens over themselves" and "queries over a longer key list" are
the same kernel. Non-causal runs every query over every key of its sequence (context chunks).

Tiling: one program per (BLOCK_M query rows, sequence, head); it walks the keys in BLOCK_N tiles
with an online base-2 softmax (m, l, acc in fp32). The QK head dim is split into two power-of-two
parts (192 = 128 + 64) so no FLOPs are spent on padding; Dv is padded to a power of two with masks.
Causal programs stop at the last key their last row can see.
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
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _varlen_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K,
    scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_lh,
    GROUP: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
    BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, HAS_DB: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    PRESCALE_Q: tl.constexpr,
):
    pid_m = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(CU_Q + seq)
    q_len = tl.load(CU_Q + seq + 1) - q_start
    k_start = tl.load(CU_K + seq)
    k_len = tl.load(CU_K + seq + 1) - k_start
    if pid_m * BLOCK_M >= q_len:
        return
    kv_head = head // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < q_len
    q_rows = (q_start + offs_m).to(tl.int64) * stride_qt + head * stride_qh
    offs_a = tl.arange(0, BLOCK_DA)
    q_a = tl.load(Q + q_rows[:, None] + offs_a[None, :],
                  mask=m_mask[:, None] & (offs_a[None, :] < DQK), other=0.0)
    if HAS_DB:
        offs_b = BLOCK_DA + tl.arange(0, BLOCK_DB)
        q_b = tl.load(Q + q_rows[:, None] + offs_b[None, :],
                      mask=m_mask[:, None] & (offs_b[None, :] < DQK), other=0.0)
    if PRESCALE_Q:
        # fp32: fold the scale into q once (one rounding) instead of scaling every score tile,
        # which would add two roundings of the exponent argument per score
        q_a = q_a * scale_log2
        if HAS_DB:
            q_b = q_b * scale_log2
    offs_v = tl.arange(0, BLOCK_DV)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # key position that query row i may see up to (inclusive), bottom-right aligned
    q_pos = k_len - q_len + offs_m
    if CAUSAL:
        hi = tl.minimum(k_len, k_len - q_len + (pid_m + 1) * BLOCK_M)
        hi = tl.maximum(hi, 0)
    else:
        hi = k_len

    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < k_len
        k_rows = (k_start + offs_n).to(tl.int64) * stride_kt + kv_head * stride_kh
        kt_a = tl.load(K + k_rows[None, :] + offs_a[:, None],
                       mask=n_mask[None, :] & (offs_a[:, None] < DQK), other=0.0)
        s = tl.dot(q_a, kt_a, input_precision=DOT_PREC)
        if HAS_DB:
            kt_b = tl.load(K + k_rows[None, :] + offs_b[:, None],
                           mask=n_mask[None, :] & (offs_b[:, None] < DQK), other=0.0)
            s += tl.dot(q_b, kt_b, input_precision=DOT_PREC)
        if not PRESCALE_Q:
            s = s * scale_log2
        valid = n_mask[None, :] & m_mask[:, None]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= q_pos[:, None])
        s = tl.where(valid, s, float("-inf"))

        v_rows = (k_start + offs_n).to(tl.int64) * stride_vt + kv_head * stride_vh
        v = tl.load(V + v_rows[:, None] + offs_v[None, :],
                    mask=n_mask[:, None] & (offs_v[None, :] < DV), other=0.0)
        acc, m_i, l_i = online_softmax_update(acc, m_i, l_i, s, v, True, True, DOT_PREC)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_rows = (q_start + offs_m).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(O + o_rows[:, None] + offs_v[None, :], out.to(O.dtype.element_ty),
             mask=m_mask[:, None] & (offs_v[None, :] < DV))
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(LSE + head * stride_lh + q_start + offs_m, lse, mask=m_mask)


def _pow2_split(d: int) -> tuple[int, int]:
    """Split a head dim into two power-of-two tiles (a >= 16, b = 0 or >= 16): 192 -> (128, 64)."""
    a = max(16, 1 << (d.bit_length() - 1))
    rest = d - a
    if rest <= 0:
        return a, 0
    b = max(16, triton.next_power_of_2(rest))
    if b >= a:  # e.g. d = 200: two tiles would not save anything over one padded tile
        return triton.next_power_of_2(d), 0
    return a, b


def _check_cu(name: str, cu: torch.Tensor, num_seqs: Optional[int], total: int, device) -> None:
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: expected a 1-D int32/int64 tensor [num_seqs + 1]")
    if num_seqs is not None and cu.shape[0] != num_seqs + 1:
        raise ValueError(f"{name}: expected {num_seqs + 1} entries, got {cu.shape[0]}")
    if cu.device != device:
        raise ValueError(f"{name}: expected device {device}, got {cu.device}")
    first, last = int(cu[0]), int(cu[-1])
    if first != 0 or last > total:
        raise ValueError(f"{name}: must start at 0 and end at most at {total} rows, got {first}..{last}")
    if cu.shape[0] > 1 and bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"{name}: must be non-decreasing")


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, *, scale: float, causal: bool = True,
                     max_seqlen_q: Optional[int] = None, out: Optional[torch.Tensor] = None,
                     block_m: Optional[int] = None, block_n: Optional[int] = None):
    """Varlen attention forward. Returns ``(out [T, H, Dv], lse [H, T] float32)``.

    ``scale`` multiplies q.k (pass the layer scale); ``causal`` is bottom-right aligned; empty
    sequences (0 keys) give out 0 and LSE -inf. ``out`` may be a preallocated ``[T, H, Dv]``
    tensor in q's dtype (its last dim must be contiguous).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name}: expected a 3-D tensor [tokens, heads, head_dim], got "
                             f"{tuple(getattr(t, 'shape', ()))}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"q: dtype must be float16, bfloat16 or float32, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"k/v: dtype must equal q's {q.dtype}, got {k.dtype}/{v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError("k/v: must be on q's device")
    T, H, Dqk = q.shape
    Tk, Hkv, Dk = k.shape
    if Dk != Dqk:
        raise ValueError(f"k: head dim {Dk} must equal q's {Dqk}")
    if v.shape[0] != Tk or v.shape[1] != Hkv:
        raise ValueError(f"v: expected [{Tk}, {Hkv}, Dv] to match k, got {tuple(v.shape)}")
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"k: num kv heads {Hkv} must divide num query heads {H}")
    Dv = v.shape[2]
    if Dqk > 512 or Dv > 512:
        raise ValueError(f"q/v: head dims up to 512 supported, got qk {Dqk}, v {Dv}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: expected a positive finite float, got {scale!r}")
    _check_cu("cu_seqlens_q", cu_seqlens_q, None, T, q.device)
    _check_cu("cu_seqlens_k", cu_seqlens_k, cu_seqlens_q.shape[0] - 1, Tk, q.device)
    if q.device.type != "cuda":
        compat.install()  # interpreter: bf16 / fp8 arithmetic patches (no-op when compiled)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if out is None:
        out = torch.zeros(T, H, Dv, dtype=q.dtype, device=q.device)
    elif out.shape != (T, H, Dv) or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out: expected a [{T}, {H}, {Dv}] {q.dtype} tensor with a contiguous last dim, "
                         f"got {tuple(out.shape)} {out.dtype}")
    lse = torch.full((H, T), float("-inf"), dtype=torch.float32, device=q.device)
    num_seqs = cu_seqlens_q.shape[0] - 1
    if T == 0 or num_seqs == 0:
        return out, lse
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    da, db = _pow2_split(Dqk)
    big = q.dtype != torch.float32 and max(Dqk, Dv) <= 256
    bm = block_m or (64 if big else 32)
    bn = block_n or (64 if big else 32)
    if bm < 16 or bn < 16 or bm & (bm - 1) or bn & (bn - 1):
        raise ValueError(f"block_m/block_n: powers of two >= 16 required, got {bm}/{bn}")
    grid = (triton.cdiv(max(max_seqlen_q, 1), bm), num_seqs, H)
    block_dv = max(16, triton.next_power_of_2(Dv))
    # wide heads (192 split 128 + 64, V padded to 192 -> 256): 8 warps keep the fp32 accumulator
    # [BLOCK_M, BLOCK_DV] in registers without spilling
    warps = 8 if max(da + db, block_dv) > 128 and bm >= 64 else 4
    _varlen_fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
        float(scale) * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        GROUP=H // Hkv, DQK=Dqk, DV=Dv,
        BLOCK_DA=da, BLOCK_DB=db if db else 16, HAS_DB=db > 0,
        BLOCK_DV=block_dv,
        CAUSAL=bool(causal), BLOCK_M=bm, BLOCK_N=bn,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        PRESCALE_Q=q.dtype == torch.float32,
        num_warps=warps, num_stages=2,
    )
    return out, lse
