"""The paged KV cache, written and read the plain way.

A cache holds ``num_blocks`` blocks of ``block_size`` token slots. Slot ``s`` is offset
``s % block_size`` of block ``s // block_size``. Token ``p`` of a sequence lives in block
``block_table_row[p // block_size]`` at offset ``p % block_size``.

Layouts: NHD ``[num_blocks, block_size, H, D]`` (vLLM's default) and HND
``[num_blocks, H, block_size, D]``. MLA caches have one "head" of width 576 and no value
cache (``value``/``value_cache`` are None); a 3-D MLA cache ``[num_blocks, block_size, 576]``
with ``key [T, 576]`` works too in NHD.

fp8 (per-tensor scale): stored = clamp(x.float() / scale, -max, max) rounded to nearest even;
read = stored.to(dtype) * scale. e4m3fn max is 448, e4m3fnuz max is 240.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from reference import fp

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
LAYOUTS = ("NHD", "HND")

IntList = Union[torch.Tensor, Sequence[int]]


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def quantize_fp8(x: torch.Tensor, scale, fp8_dtype: torch.dtype) -> torch.Tensor:
    """fl32(x / scale), saturated to the fp8 range, rounded to nearest even: the rounding is
    written out (reference.fp.quantize_fp8), so it does not depend on torch's fp8 cast."""
    if fp8_dtype not in FP8_DTYPES:
        raise ValueError(f"fp8_dtype: expected torch.float8_e4m3fn or torch.float8_e4m3fnuz, got {fp8_dtype}")
    _check_scale("scale", scale)
    return fp.quantize_fp8(x, float(scale), fp.format_of(fp8_dtype)).to(fp8_dtype)  # exact: representable


def dequantize(x: torch.Tensor, scale, dtype: torch.dtype) -> torch.Tensor:
    """fp8 -> x.to(dtype) * scale; any other dtype is only cast (its scale is the identity)."""
    if is_fp8(x.dtype):
        _check_scale("scale", scale)
        return x.to(dtype) * scale
    return x.to(dtype)


def _check_scale(name: str, scale) -> None:
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"{name}: expected a per-tensor scale (one element), got shape {tuple(scale.shape)}")
        scale = float(scale)
    if not scale > 0:
        raise ValueError(f"{name}: must be a positive number, got {scale}")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected 'NHD' or 'HND', got {layout!r}")


def cache_block_size(cache: torch.Tensor, layout: str = "NHD") -> int:
    return int(cache.shape[2] if layout == "HND" else cache.shape[1])


def nhd_to_hnd(cache: torch.Tensor) -> torch.Tensor:
    """[nb, bs, H, D] -> [nb, H, bs, D] (a contiguous copy)."""
    if cache.dim() != 4:
        raise ValueError(f"cache: expected NHD [num_blocks, block_size, H, D], got shape {tuple(cache.shape)}")
    return cache.permute(0, 2, 1, 3).contiguous()


def hnd_to_nhd(cache: torch.Tensor) -> torch.Tensor:
    """[nb, H, bs, D] -> [nb, bs, H, D] (a contiguous copy)."""
    if cache.dim() != 4:
        raise ValueError(f"cache: expected HND [num_blocks, H, block_size, D], got shape {tuple(cache.shape)}")
    return cache.permute(0, 2, 1, 3).contiguous()


# ---- writing ---------------------------------------------------------------------------------

def _store(x: torch.Tensor, cache: torch.Tensor, scale) -> torch.Tensor:
    """x converted to what the cache stores: quantised for fp8, else cast."""
    if is_fp8(cache.dtype):
        return quantize_fp8(x, scale, cache.dtype)
    return x.to(cache.dtype)


def _write_one(x: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor, layout: str, scale, name: str) -> None:
    if layout == "NHD":
        want = tuple(cache.shape[2:])
    else:
        want = (cache.shape[1],) + tuple(cache.shape[3:])
    if tuple(x.shape[1:]) != want:
        raise ValueError(f"{name}: expected [tokens, {', '.join(map(str, want))}] to fit the "
                         f"{layout} cache {tuple(cache.shape)}, got {tuple(x.shape)}")
    bs = cache_block_size(cache, layout)
    blocks, offsets = slots // bs, slots % bs
    if layout == "NHD":
        cache[blocks, offsets] = _store(x, cache, scale)
    else:
        cache[blocks, :, offsets] = _store(x, cache, scale)  # advanced dims go first: [T, H, D]


def write_kv(key: torch.Tensor, value: Optional[torch.Tensor], key_cache: torch.Tensor,
             value_cache: Optional[torch.Tensor], slot_mapping: torch.Tensor, *, layout: str = "NHD",
             k_scale=1.0, v_scale=1.0) -> None:
    """Write token t's key/value into slot slot_mapping[t], in place (quantising for fp8).

    A negative slot is a padding token and is skipped (as vLLM's reshape_and_cache does).
    """
    _check_layout(layout)
    if (value is None) != (value_cache is None):
        raise ValueError("value/value_cache: give both (MHA) or neither (MLA), got only one")
    if key.shape[0] != slot_mapping.shape[0]:
        raise ValueError(f"slot_mapping: expected {key.shape[0]} entries (one per key token), "
                         f"got {slot_mapping.shape[0]}")
    if value is not None and value.shape[0] != key.shape[0]:
        raise ValueError(f"value: expected {key.shape[0]} tokens like key, got {value.shape[0]}")
    if layout == "HND" and key_cache.dim() != 4:
        raise ValueError(f"key_cache: HND layout needs [num_blocks, H, block_size, D], got {tuple(key_cache.shape)}")
    slots = slot_mapping.to(device=key_cache.device, dtype=torch.int64)
    keep = slots >= 0
    slots = slots[keep]
    capacity = key_cache.shape[0] * cache_block_size(key_cache, layout)
    if slots.numel() and int(slots.max()) >= capacity:
        raise ValueError(f"slot_mapping: slots must lie below {capacity} (num_blocks * block_size), "
                         f"got {int(slots.max())}")
    if slots.unique().numel() != slots.numel():
        raise ValueError("slot_mapping: two tokens write the same slot")
    _write_one(key[keep.to(key.device)], key_cache, slots, layout, k_scale, "key")
    if value is not None:
        _write_one(value[keep.to(value.device)], value_cache, slots, layout, v_scale, "value")


# ---- reading ---------------------------------------------------------------------------------

def token_slots(block_table_row: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slot of each token position of one sequence."""
    blocks = block_table_row.to(torch.int64)[positions // block_size]
    return blocks * block_size + positions % block_size


def _read_one(cache: torch.Tensor, slots: torch.Tensor, layout: str) -> torch.Tensor:
    bs = cache_block_size(cache, layout)
    blocks, offsets = slots // bs, slots % bs
    if layout == "NHD":
        return cache[blocks, offsets]
    return cache[blocks, :, offsets]


def gather_kv(key_cache: torch.Tensor, value_cache: Optional[torch.Tensor], block_table_row: torch.Tensor,
              start: int, end: int, *, layout: str = "NHD", k_scale=1.0, v_scale=1.0,
              dtype: torch.dtype = torch.float64):
    """Tokens [start, end) of one sequence, dequantised to ``dtype``: (k [n, H, D], v or None)."""
    _check_layout(layout)
    if not 0 <= start <= end:
        raise ValueError(f"start/end: need 0 <= start <= end, got start={start}, end={end}")
    bs = cache_block_size(key_cache, layout)
    if end > block_table_row.shape[0] * bs:
        raise ValueError(f"block_table_row: {block_table_row.shape[0]} blocks of {bs} hold fewer than "
                         f"end={end} tokens")
    positions = torch.arange(start, end, device=key_cache.device)
    slots = token_slots(block_table_row.to(key_cache.device), positions, bs)
    k = dequantize(_read_one(key_cache, slots, layout), k_scale, dtype)
    v = None if value_cache is None else dequantize(_read_one(value_cache, slots, layout), v_scale, dtype)
    return k, v


def _as_list(x: IntList) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else [int(i) for i in x]


def slot_mapping_for(block_table: torch.Tensor, seq_lens: IntList, query_lens: IntList,
                     block_size: int) -> torch.Tensor:
    """int64 [T]: the cache slot of every new token (positions seq_len - q_len .. seq_len - 1)."""
    seq_lens, query_lens = _as_list(seq_lens), _as_list(query_lens)
    if len(seq_lens) != len(query_lens) or len(seq_lens) != block_table.shape[0]:
        raise ValueError(f"seq_lens/query_lens/block_table: need one entry per sequence, got "
                         f"{len(seq_lens)}/{len(query_lens)}/{block_table.shape[0]}")
    slots = []
    for b, (s, q) in enumerate(zip(seq_lens, query_lens)):
        if not 0 <= q <= s:
            raise ValueError(f"query_lens: sequence {b} has {q} new tokens but seq_len {s}")
        if -(-s // block_size) > block_table.shape[1]:
            raise ValueError(f"block_table: sequence {b} needs {-(-s // block_size)} blocks of {block_size}, "
                             f"table has {block_table.shape[1]} columns")
        positions = torch.arange(s - q, s, device=block_table.device)
        slots.append(token_slots(block_table[b], positions, block_size))
    if not slots:
        return torch.zeros(0, dtype=torch.int64, device=block_table.device)
    return torch.cat(slots)
