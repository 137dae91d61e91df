"""Paged KV-cache write (``reshape_and_cache``) and gather (``gather_cache``) in Triton.

Layouts: NHD ``[num_blocks, block_size, H, D]`` or HND ``[num_blocks, H, block_size, D]``; an
MLA latent cache is ``[num_blocks, block_size, 1, 576]`` (or 3-D ``[num_blocks, block_size, 576]``)
with no value cache. Slot ``s`` is offset ``s % block_size`` of block ``s // block_size``; token
``p`` of a sequence lives at ``block_table[row, p // block_size]``, offset ``p % block_size``.

Tiling: one program owns ``BLOCK_T`` tokens x ``BLOCK_E`` elements of the flattened ``H * D``
row (head ``e // D``, channel ``e % D``); every address is built from strides, so any block
size (544 included) and non-contiguous views work. Launch-time tile sizes: large under the
interpreter (few programs, it runs them one by one), moderate on a GPU.

fp8 (e4m3fn / e4m3fnuz, per-tensor scale): stored = clamp(x.float() / scale, +-max) rounded to
nearest even, with a correctly rounded division (``div_rn``, bit-exact against torch's CPU
``x.float() / scale``); read = stored.float() * scale, rounded once to the output dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from impl.triton import compat

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# token counts and block-table widths change with every batch: no compiled variant per value pattern
@triton.jit(do_not_specialize=["num_tokens"])
def _write_kernel(x_ptr, cache_ptr, slot_ptr, scale_ptr, num_tokens, block_size,
                  stride_xt, stride_xh, stride_xd,
                  stride_cb, stride_cs, stride_ch, stride_cd,
                  D: tl.constexpr, HD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                  IS_FP8: tl.constexpr, FP8_MAX: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_e = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    t_ok = t < num_tokens
    slot = tl.load(slot_ptr + t, mask=t_ok, other=-1).to(tl.int64)
    row_ok = t_ok & (slot >= 0)  # negative slot: a padding token, skipped
    slot = tl.where(row_ok, slot, 0)
    blk = slot // block_size
    off = slot % block_size
    h = e // D
    d = e % D
    m = row_ok[:, None] & (e < HD)[None, :]
    src = x_ptr + t.to(tl.int64)[:, None] * stride_xt + (h * stride_xh + d * stride_xd)[None, :]
    x = tl.load(src, mask=m, other=0.0)
    if IS_FP8:
        scale = tl.load(scale_ptr)
        q = tl.math.div_rn(x.to(tl.float32), scale)
        q = tl.minimum(tl.maximum(q, -FP8_MAX), FP8_MAX)
        val = q.to(cache_ptr.dtype.element_ty)
    else:
        val = x.to(cache_ptr.dtype.element_ty)
    dst = cache_ptr + (blk * stride_cb + off * stride_cs)[:, None] + (h * stride_ch + d * stride_cd)[None, :]
    tl.store(dst, val, mask=m)


@triton.jit(do_not_specialize=["total", "stride_bt"])
def _gather_kernel(cache_ptr, out_ptr, tok_seq_ptr, cu_ptr, starts_ptr, bt_ptr, scale_ptr,
                   total, block_size, stride_bt,
                   stride_cb, stride_cs, stride_ch, stride_cd,
                   stride_ot, stride_oh, stride_od,
                   D: tl.constexpr, HD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                   IS_FP8: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_e = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    t_ok = t < total
    seq = tl.load(tok_seq_ptr + t, mask=t_ok, other=0)
    first = tl.load(cu_ptr + seq, mask=t_ok, other=0)
    start = tl.load(starts_ptr + seq, mask=t_ok, other=0)
    pos = start + (t - first)  # token position inside its sequence
    blk = tl.load(bt_ptr + seq.to(tl.int64) * stride_bt + pos // block_size, mask=t_ok, other=0).to(tl.int64)
    off = (pos % block_size).to(tl.int64)
    h = e // D
    d = e % D
    m = t_ok[:, None] & (e < HD)[None, :]
    src = cache_ptr + (blk * stride_cb + off * stride_cs)[:, None] + (h * stride_ch + d * stride_cd)[None, :]
    x = tl.load(src, mask=m, other=0.0)
    if IS_FP8:
        scale = tl.load(scale_ptr)
        x = x.to(tl.float32) * scale
    dst = out_ptr + t.to(tl.int64)[:, None] * stride_ot + (h * stride_oh + d * stride_od)[None, :]
    tl.store(dst, x.to(out_ptr.dtype.element_ty), mask=m)


# ---- host side -----------------------------------------------------------------------------------

def _scale_tensor(name: str, scale, device) -> torch.Tensor:
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"{name}: expected a per-tensor scale (one element), got shape {tuple(scale.shape)}")
        value = float(scale.reshape(()).item())
    else:
        value = float(scale)
    if not value > 0:
        raise ValueError(f"{name}: must be a positive number, got {value}")
    return torch.tensor([value], dtype=torch.float32, device=device)


def _cache_view(name: str, cache: torch.Tensor, layout: str):
    """(block, slot, head, dim) strides, block_size, H, D of a 4-D (or 3-D MLA) cache."""
    if not isinstance(cache, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(cache).__name__}")
    if cache.dtype not in _FLOAT_DTYPES + FP8_DTYPES:
        raise ValueError(f"{name}: dtype must be float16/bfloat16/float32 or fp8 e4m3fn/e4m3fnuz, got {cache.dtype}")
    if cache.dim() == 3 and layout == "NHD":  # MLA latent cache [nb, bs, L + R]
        sb, ss, sd = cache.stride()
        return (sb, ss, 0, sd), cache.shape[1], 1, cache.shape[2]
    if cache.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D {layout} cache, got shape {tuple(cache.shape)}")
    sb, s1, s2, sd = cache.stride()
    if layout == "NHD":
        return (sb, s1, s2, sd), cache.shape[1], cache.shape[2], cache.shape[3]
    return (sb, s2, s1, sd), cache.shape[2], cache.shape[1], cache.shape[3]


def _token_view(name: str, x: torch.Tensor, heads: int, dim: int):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 2 and heads == 1 and x.shape[1] == dim:
        return x.stride(0), 0, x.stride(1)
    if x.dim() != 3 or tuple(x.shape[1:]) != (heads, dim):
        raise ValueError(f"{name}: expected [tokens, {heads}, {dim}] to fit the cache, got {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name}: dtype must be float16/bfloat16/float32, got {x.dtype}")
    return x.stride()


def _tiles(num_tokens: int, hd: int, device) -> tuple:
    e = triton.next_power_of_2(hd)
    if device.type != "cuda":  # interpreter: few, large programs
        return max(1, min(64, triton.next_power_of_2(max(num_tokens, 1)))), e
    block_e = min(e, 1024)
    return max(1, 4096 // block_e), block_e


def _check_layout(layout: str) -> None:
    if layout not in ("NHD", "HND"):
        raise ValueError(f"layout: expected 'NHD' or 'HND', got {layout!r}")


def _interp_setup(device, *caches) -> None:
    if device.type != "cuda":
        compat.install()
        return
    for c in caches:
        if c is not None and c.dtype == torch.float8_e4m3fnuz:
            raise ValueError("key_cache/value_cache: float8_e4m3fnuz needs the Triton interpreter "
                             "(CUDA Triton has no e4m3fnuz); use float8_e4m3fn on NVIDIA GPUs")


def _write_one(name, x, cache, slot_mapping, scale_t, layout):
    (sb, ss, sh, sd), bs, heads, dim = _cache_view(name + "_cache", cache, layout)
    sxt, sxh, sxd = _token_view(name, x, heads, dim)
    if x.shape[0] != slot_mapping.shape[0]:
        raise ValueError(f"slot_mapping: expected {x.shape[0]} entries (one per token), got {slot_mapping.shape[0]}")
    n = x.shape[0]
    if n == 0:
        return
    is_fp8 = cache.dtype in FP8_DTYPES
    block_t, block_e = _tiles(n, heads * dim, x.device)
    grid = (triton.cdiv(n, block_t), triton.cdiv(heads * dim, block_e))
    _write_kernel[grid](x, cache, slot_mapping, scale_t, n, bs, sxt, sxh, sxd, sb, ss, sh, sd,
                        D=dim, HD=heads * dim, BLOCK_T=block_t, BLOCK_E=block_e, IS_FP8=is_fp8,
                        FP8_MAX=float(torch.finfo(cache.dtype).max) if is_fp8 else 0.0)


def reshape_and_cache(key: torch.Tensor, value: Optional[torch.Tensor], key_cache: torch.Tensor,
                      value_cache: Optional[torch.Tensor], slot_mapping: torch.Tensor, *, layout: str = "NHD",
                      k_scale=1.0, v_scale=1.0) -> None:
    """Write token t's key/value into slot ``slot_mapping[t]`` in place; slot < 0 is skipped.

    fp8 caches (float8_e4m3fn/e4m3fnuz) store clamp(x.float() / scale, +-max) rounded to nearest
    even. ``value``/``value_cache`` may both be None (MLA latent cache).
    """
    _check_layout(layout)
    if (value is None) != (value_cache is None):
        raise ValueError("value/value_cache: give both (MHA) or neither (MLA), got only one")
    if not isinstance(slot_mapping, torch.Tensor) or slot_mapping.dim() != 1 or \
            slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError("slot_mapping: expected a 1-D int32/int64 tensor")
    for name, c in (("key_cache", key_cache), ("value_cache", value_cache)):
        if c is not None and c.device != key.device:
            raise ValueError(f"{name}: on {c.device}, expected the device of key ({key.device})")
    _interp_setup(key.device, key_cache, value_cache)
    slots = slot_mapping.to(device=key.device).contiguous()
    _write_one("key", key, key_cache, slots, _scale_tensor("k_scale", k_scale, key.device), layout)
    if value is not None:
        if value.shape[0] != key.shape[0]:
            raise ValueError(f"value: expected {key.shape[0]} tokens like key, got {value.shape[0]}")
        _write_one("value", value, value_cache, slots, _scale_tensor("v_scale", v_scale, key.device), layout)


def _gather_one(name, cache, layout, block_table, tok_seq, cu, starts, total, scale_t, out_dtype):
    (sb, ss, sh, sd), bs, heads, dim = _cache_view(name, cache, layout)
    out = torch.empty(total, heads, dim, dtype=out_dtype, device=cache.device)
    if total == 0:
        return out
    block_t, block_e = _tiles(total, heads * dim, cache.device)
    grid = (triton.cdiv(total, block_t), triton.cdiv(heads * dim, block_e))
    so = out.stride()
    _gather_kernel[grid](cache, out, tok_seq, cu, starts, block_table, scale_t, total, bs,
                         block_table.stride(0), sb, ss, sh, sd, so[0], so[1], so[2],
                         D=dim, HD=heads * dim, BLOCK_T=block_t, BLOCK_E=block_e,
                         IS_FP8=cache.dtype in FP8_DTYPES)
    return out


def gather_cache(key_cache: torch.Tensor, value_cache: Optional[torch.Tensor], block_table: torch.Tensor,
                 cu_seq_lens: torch.Tensor, seq_starts: torch.Tensor, *, k_scale=1.0, v_scale=1.0,
                 out_dtype: torch.dtype, layout: str = "NHD"):
    """Gather tokens ``seq_starts[i] .. seq_starts[i] + len_i`` of every sequence into rows
    ``cu_seq_lens[i] .. cu_seq_lens[i+1]`` (``len_i = cu_seq_lens[i+1] - cu_seq_lens[i]``),
    dequantising fp8 by the scale. Returns (k [total, H, D], v [total, H, D] or None).
    """
    _check_layout(layout)
    if out_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out_dtype: expected float16/bfloat16/float32, got {out_dtype}")
    for name, t, nd in (("block_table", block_table, 2), ("cu_seq_lens", cu_seq_lens, 1),
                        ("seq_starts", seq_starts, 1)):
        if not isinstance(t, torch.Tensor) or t.dim() != nd or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name}: expected a {nd}-D int32/int64 tensor")
    nseq = block_table.shape[0]
    if cu_seq_lens.shape[0] != nseq + 1 or seq_starts.shape[0] != nseq:
        raise ValueError(f"cu_seq_lens/seq_starts: expected {nseq + 1}/{nseq} entries for {nseq} block-table rows, "
                         f"got {cu_seq_lens.shape[0]}/{seq_starts.shape[0]}")
    if value_cache is not None and value_cache.shape != key_cache.shape:
        raise ValueError(f"value_cache: shape {tuple(value_cache.shape)} differs from key_cache {tuple(key_cache.shape)}")
    dev = key_cache.device
    _interp_setup(dev, key_cache, value_cache)
    cu = cu_seq_lens.to(device=dev, dtype=torch.int32).contiguous()
    lens = cu[1:] - cu[:-1]
    if nseq and int(lens.min()) < 0:
        raise ValueError(f"cu_seq_lens: must be non-decreasing, got {cu.tolist()}")
    total = int(cu[-1].item())
    tok_seq = torch.repeat_interleave(torch.arange(nseq, device=dev, dtype=torch.int32), lens.long(),
                                      output_size=total).contiguous()
    starts = seq_starts.to(device=dev, dtype=torch.int32).contiguous()
    bt = block_table.to(dev).contiguous()
    k = _gather_one("key_cache", key_cache, layout, bt, tok_seq, cu, starts, total,
                    _scale_tensor("k_scale", k_scale, dev), out_dtype)
    v = None
    if value_cache is not None:
        v = _gather_one("value_cache", value_cache, layout, bt, tok_seq, cu, starts, total,
                        _scale_tensor("v_scale", v_scale, dev), out_dtype)
    return k, v
