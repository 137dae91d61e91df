"""Adapters for AITER's Triton attention kernels (run on CUDA and under the CPU interpreter).

Each adapter validates its inputs (ValueError naming the argument), converts this project's
conventions to the kernel's, calls AITER with keyword arguments only (signatures changed
between aiter versions), and converts the result back:

* ``unified_attention``: paged NHD cache, causal only; window W keys -> FA ``(W-1, 0)``;
  softcap None -> 0; fp8 caches read with per-tensor descale tensors. No LSE.
* ``flash_attn_varlen``: AITER's Triton ``mha.flash_attn_varlen_func`` over contiguous varlen
  q/k/v; its LSE ``[total_q, H]`` (0 for rows that see no key) is returned as ``[H, total_q]``
  with -inf for those rows, the convention ``merge_attn_states`` needs. 0.1.7 has no sliding
  window and no softcap (it raises for a window), so neither is offered here.

Launch configs are passed explicitly: AITER's defaults come from JSON files keyed by gfx arch
and carry AMD-only launch options.
"""

from __future__ import annotations

from typing import Optional

import torch

from impl.aiter import loader

MODEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_index(name: str, t, ndim: int, length: Optional[int] = None) -> None:
    _need(isinstance(t, torch.Tensor) and t.dtype == torch.int32 and t.dim() == ndim,
          f"{name}: expected an int32 tensor with {ndim} dimension(s), got "
          f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if length is not None:
        _need(t.shape[0] == length, f"{name}: expected {length} entries, got {t.shape[0]}")


def _descale(name: str, scale, device) -> torch.Tensor:
    if isinstance(scale, torch.Tensor):
        _need(scale.numel() >= 1, f"{name}: expected a per-tensor scale")
        return scale.to(device=device, dtype=torch.float32).reshape(-1)[:1].contiguous()
    _need(float(scale) > 0, f"{name}: must be positive, got {scale}")
    return torch.tensor([float(scale)], dtype=torch.float32, device=device)


# ---- unified attention ------------------------------------------------------------------------

def unified_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, out: torch.Tensor,
                      *, cu_seqlens_q: torch.Tensor, max_seqlen_q: int, seqused_k: torch.Tensor,
                      max_seqlen_k: int, block_table: torch.Tensor, scale: float,
                      sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                      alibi_slopes: Optional[torch.Tensor] = None, sinks: Optional[torch.Tensor] = None,
                      k_scale=1.0, v_scale=1.0) -> torch.Tensor:
    """Causal paged attention of ``q [T, Hq, D]`` over the NHD cache into ``out`` (returned).

    ``seqused_k[b]`` = keys of sequence b (context + new, already in the cache); queries are
    bottom-right aligned. fp8 caches are dequantised by ``k_scale``/``v_scale`` in the kernel.
    """
    _need(isinstance(q, torch.Tensor) and q.dim() == 3 and q.dtype in MODEL_DTYPES,
          f"q: expected float16/bfloat16/float32 [T, Hq, D], got {getattr(q, 'dtype', None)} "
          f"{tuple(getattr(q, 'shape', ()))}")
    T, Hq, D = q.shape
    for name, c in (("key_cache", key_cache), ("value_cache", value_cache)):
        _need(isinstance(c, torch.Tensor) and c.dim() == 4 and c.shape[3] == D,
              f"{name}: expected NHD [num_blocks, block_size, Hkv, {D}], got {tuple(getattr(c, 'shape', ()))}")
        _need(c.dtype == q.dtype or c.dtype in FP8_DTYPES,
              f"{name}: dtype must be q's {q.dtype} or fp8, got {c.dtype}")
    _need(key_cache.shape == value_cache.shape, "value_cache: shape differs from key_cache")
    Hkv = key_cache.shape[2]
    _need(Hq % Hkv == 0, f"key_cache: {Hkv} kv heads must divide {Hq} query heads")
    _need(out.shape == q.shape and out.dtype == q.dtype, f"out: expected {q.dtype} {tuple(q.shape)}")
    B = seqused_k.shape[0] if isinstance(seqused_k, torch.Tensor) else -1
    _check_index("seqused_k", seqused_k, 1)
    _check_index("cu_seqlens_q", cu_seqlens_q, 1, B + 1)
    _check_index("block_table", block_table, 2, B)
    _need(max_seqlen_q >= 1 and max_seqlen_k >= 1, "max_seqlen_q/max_seqlen_k: must be >= 1")
    if sliding_window is not None:
        _need(int(sliding_window) >= 1, f"sliding_window: must be >= 1 keys, got {sliding_window}")
    for name, t in (("alibi_slopes", alibi_slopes), ("sinks", sinks)):
        if t is not None:
            _need(t.shape == (Hq,) and t.dtype == torch.float32, f"{name}: expected float32 [{Hq}]")
    ua = loader.triton_module("unified_attention")
    ua.unified_attention(
        q=q, k=key_cache, v=value_cache, out=out,
        cu_seqlens_q=cu_seqlens_q, max_seqlen_q=int(max_seqlen_q),
        seqused_k=seqused_k, max_seqlen_k=int(max_seqlen_k),
        softmax_scale=float(scale), causal=True,
        window_size=(int(sliding_window) - 1, 0) if sliding_window else (-1, -1),
        block_table=block_table, softcap=float(softcap) if softcap else 0.0,
        q_descale=None, k_descale=_descale("k_scale", k_scale, q.device),
        v_descale=_descale("v_scale", v_scale, q.device),
        alibi_slopes=alibi_slopes, sinks=sinks)
    return out


# ---- varlen flash attention (AITER Triton mha) ------------------------------------------------

def mha_config(device: torch.device, head_size: int, dtype: torch.dtype) -> dict:
    """Launch config for ``_attn_fwd`` (replaces the gfx-keyed JSON lookup)."""
    if device.type != "cuda" or loader.load().mode == "interpreter":
        # the interpreter runs programs one by one: few, large tiles are fastest
        return {"BLOCK_M": 64, "BLOCK_N": 64, "PRELOAD_V": False, "num_warps": 4, "num_ctas": 1,
                "num_stages": 1}
    if dtype == torch.float32:
        return {"BLOCK_M": 32, "BLOCK_N": 32, "PRELOAD_V": False, "num_warps": 2, "num_ctas": 1,
                "num_stages": 1}
    if head_size > 128:
        return {"BLOCK_M": 64, "BLOCK_N": 32, "PRELOAD_V": False, "num_warps": 4, "num_ctas": 1,
                "num_stages": 1}
    return {"BLOCK_M": 128, "BLOCK_N": 64, "PRELOAD_V": False, "num_warps": 4, "num_ctas": 1,
            "num_stages": 2}


def empty_rows(q_lens: list, k_lens: list, causal: bool) -> list:
    """Global query-row indices that see no key (bottom-right causal, or no keys at all)."""
    rows, start = [], 0
    for ql, kl in zip(q_lens, k_lens):
        n_empty = ql if kl == 0 else (max(0, ql - kl) if causal else 0)
        rows.extend(range(start, start + n_empty))
        start += ql
    return rows


def normalize_lse(lse_t_h: torch.Tensor, empty: list) -> torch.Tensor:
    """AITER Triton mha varlen LSE ``[total_q, H]`` (0 where a row sees no key) -> ``[H, total_q]``
    float32 with -inf for those rows (and +inf mapped to -inf, as merge_attn_states does)."""
    lse = lse_t_h.transpose(0, 1).to(torch.float32).contiguous()
    lse = torch.where(torch.isposinf(lse), torch.full_like(lse, float("-inf")), lse)
    if empty:
        lse[:, torch.tensor(empty, dtype=torch.long, device=lse.device)] = float("-inf")
    return lse


def flash_attn_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float,
                      causal: bool, return_lse: bool = True):
    """Varlen attention of ``q [Tq, Hq, D]`` over contiguous ``k/v [Tk, Hkv, D]``.

    Returns ``(out [Tq, Hq, D], lse [Hq, Tq] or None)``; rows that see no key give out 0 and
    LSE -inf.
    """
    _need(isinstance(q, torch.Tensor) and q.dim() == 3 and q.dtype in MODEL_DTYPES,
          f"q: expected float16/bfloat16/float32 [Tq, Hq, D], got {tuple(getattr(q, 'shape', ()))}")
    Tq, Hq, D = q.shape
    for name, t in (("k", k), ("v", v)):
        _need(isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[2] == D and t.dtype == q.dtype,
              f"{name}: expected {q.dtype} [Tk, Hkv, {D}], got {getattr(t, 'dtype', None)} "
              f"{tuple(getattr(t, 'shape', ()))}")
    _need(k.shape == v.shape, f"v: shape {tuple(v.shape)} differs from k {tuple(k.shape)}")
    _need(Hq % k.shape[1] == 0, f"k: {k.shape[1]} kv heads must divide {Hq} query heads")
    _check_index("cu_seqlens_q", cu_seqlens_q, 1)
    _check_index("cu_seqlens_k", cu_seqlens_k, 1, cu_seqlens_q.shape[0])
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    _need(cq[0] == 0 and cq[-1] == Tq, f"cu_seqlens_q: must run from 0 to {Tq}, got {cq}")
    _need(ck[0] == 0 and ck[-1] <= k.shape[0], f"cu_seqlens_k: must run from 0 to <= {k.shape[0]}, got {ck}")
    q_lens = [cq[i + 1] - cq[i] for i in range(len(cq) - 1)]
    k_lens = [ck[i + 1] - ck[i] for i in range(len(ck) - 1)]
    _need(min(q_lens) >= 0 and min(k_lens) >= 0, "cu_seqlens_q/cu_seqlens_k: must be non-decreasing")
    _need(max_seqlen_q >= max(q_lens) and max_seqlen_k >= max(k_lens),
          f"max_seqlen_q/max_seqlen_k: {max_seqlen_q}/{max_seqlen_k} below the longest sequence "
          f"{max(q_lens)}/{max(k_lens)}")
    mha = loader.triton_module("mha")
    res = mha.flash_attn_varlen_func(
        q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=int(max_seqlen_q), max_seqlen_k=max(1, int(max_seqlen_k)),
        dropout_p=0.0, softmax_scale=float(scale), causal=bool(causal),
        return_lse=bool(return_lse), config=mha_config(q.device, D, q.dtype))
    if not return_lse:
        return res, None
    out, lse = res
    return out, normalize_lse(lse, empty_rows(q_lens, k_lens, causal))


# ---- paged decode (AITER Triton pa_decode) ------------------------------------------------------

_TL_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def paged_decode(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, out: torch.Tensor, *,
                 seq_lens: torch.Tensor, block_table: torch.Tensor, max_seq_len: int, scale: float,
                 k_scale=1.0, v_scale=1.0) -> torch.Tensor:
    """One query per sequence (``q [B, Hq, D]``) over the NHD cache, through AITER's Triton
    ``pa_decode``. The kernel wants HND ``[num_blocks, Hkv, block_size, D]``: a permuted view
    of the NHD cache (no copy). No sliding window, softcap or sinks in this kernel."""
    import triton.language as tl

    _need(isinstance(q, torch.Tensor) and q.dim() == 3 and q.dtype in _TL_DTYPES,
          f"q: expected float16/bfloat16/float32 [B, Hq, D], got {tuple(getattr(q, 'shape', ()))}")
    B, Hq, D = q.shape
    for name, c in (("key_cache", key_cache), ("value_cache", value_cache)):
        _need(isinstance(c, torch.Tensor) and c.dim() == 4 and c.shape[3] == D and c.stride(3) == 1,
              f"{name}: expected NHD [num_blocks, block_size, Hkv, {D}] with a contiguous last dim")
    _need(Hq % key_cache.shape[2] == 0, "key_cache: kv heads must divide query heads")
    _check_index("seq_lens", seq_lens, 1, B)
    _check_index("block_table", block_table, 2, B)
    _need(out.shape == q.shape and out.dtype == q.dtype, f"out: expected {q.dtype} {tuple(q.shape)}")
    pa = loader.triton_module("pa_decode")
    pa.paged_attention_decode(
        output=out, query=q, key_cache=key_cache.permute(0, 2, 1, 3), value_cache=value_cache.permute(0, 2, 1, 3),
        seq_lens=seq_lens, block_tables=block_table, attn_scale=float(scale), max_seq_len=int(max_seq_len),
        compute_type=getattr(tl, _TL_DTYPES[q.dtype]), k_scale=_descale("k_scale", k_scale, q.device),
        v_scale=_descale("v_scale", v_scale, q.device))
    return out
