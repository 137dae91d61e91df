"""The batch every MHA backend runs (and its MLA sibling), vLLM-shaped.

One sequence b owns query rows ``query_start_loc[b]:query_start_loc[b+1]`` and has
``seq_lens[b]`` keys in total: ``context = seq_lens[b] - q_len`` keys already in the paged
cache, then its ``q_len`` new tokens, whose K/V arrive in ``key``/``value`` and must be
written into the cache by the backend (slot ``slot_mapping[t]``) before or while attending.

Cache layout is NHD: ``[num_blocks, block_size, num_kv_heads, head_size]``; token ``p`` of
sequence ``b`` lives in block ``block_table[b, p // block_size]`` at offset
``p % block_size``. A backend that wants another layout converts and converts back.

Conventions (DESIGN.md): causal is bottom-right aligned; ``sliding_window`` W counts keys
including the query's own (key j visible iff ``qpos - j < W``); softcap ``c*tanh(s/c)`` is
applied to the scaled score before masking; ALiBi adds ``-slope*|qpos - kpos|``; a sink is a
raw per-head logit in the softmax denominator; LSE is natural-log, layout ``[Hq, T]``; a row
with no visible key gives output 0 and LSE -inf.

fp8 KV: the cache tensors have dtype ``torch.float8_e4m3fn`` or ``torch.float8_e4m3fnuz``;
stored value = ``clamp(x.float() / scale, -max, max)`` rounded to nearest even; read value =
``stored.float() * scale``.

Batches follow vLLM's order: decodes (q_len == 1), then extends (q_len > 1 with context),
then prefills (no context). ``validate()`` checks shapes, dtypes, ranges and order and raises
``BatchError`` naming the argument; ``allow_unordered=True`` skips the order check (for the
cases that test a backend's own unordered-batch error).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch

FP8_DTYPES = {
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e4m3fnuz": torch.float8_e4m3fnuz,
}
MODEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class BatchError(ValueError):
    """A batch that does not satisfy the contract above; the message names the argument."""


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise BatchError(msg)


def _check_index_tensor(name: str, t: torch.Tensor, ndim: int) -> None:
    _need(isinstance(t, torch.Tensor), f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    _need(t.dtype in (torch.int32, torch.int64), f"{name}: expected int32 or int64, got {t.dtype}")
    _need(t.dim() == ndim, f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")


def _check_tensor(name: str, t, ndim: int, shape_doc: str) -> None:
    _need(isinstance(t, torch.Tensor), f"{name}: expected a torch.Tensor {shape_doc}, got {type(t).__name__}")
    _need(t.dim() == ndim, f"{name}: expected {shape_doc}, got shape {tuple(t.shape)}")


def _host_lists(*tensors: torch.Tensor) -> list:
    """Small index tensors as Python lists, crossing from a device in one copy: every copy of a
    GPU tensor to the host is a sync, which on a GPU shared by several processes waits for all
    of their queued work."""
    devices = {t.device for t in tensors}
    if len(devices) == 1 and next(iter(devices)).type != "cpu":
        flat = torch.cat([t.reshape(-1).long() for t in tensors]).cpu()
        return [p.reshape(t.shape).tolist() for p, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
    return [t.tolist() for t in tensors]


def _check_positive_number(name: str, x) -> None:
    """A real, finite, strictly positive number (softmax and fp8 scales, softcap)."""
    _need(isinstance(x, numbers.Real) and not isinstance(x, bool),
          f"{name}: expected a positive finite number, got {type(x).__name__} {x!r}")
    _need(math.isfinite(x) and x > 0, f"{name}: expected a positive finite number, got {x!r}")


def classify_rows(query_lens: list[int], seq_lens: list[int]) -> list[str]:
    """'decode' (q_len 1), 'extend' (q_len > 1 with context) or 'prefill' (no context)."""
    kinds = []
    for q, s in zip(query_lens, seq_lens):
        if q <= 1:
            kinds.append("decode")
        elif s > q:
            kinds.append("extend")
        else:
            kinds.append("prefill")
    return kinds


class _PagedBatch:
    """What MHA and MLA batches share: sequence bookkeeping, copies, index validation."""

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def is_fp8(self) -> bool:
        return self.kv_cache_dtype != "auto"

    def query_lens(self) -> list[int]:
        qsl = self.query_start_loc.tolist()
        return [qsl[i + 1] - qsl[i] for i in range(len(qsl) - 1)]

    def context_lens(self) -> list[int]:
        return [s - q for s, q in zip(self.seq_lens.tolist(), self.query_lens())]

    def row_kinds(self) -> list[str]:
        return classify_rows(self.query_lens(), self.seq_lens.tolist())

    def _map_tensors(self, fn):
        kw = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            kw[f.name] = fn(v) if isinstance(v, torch.Tensor) else v
        return type(self)(**kw)

    def clone(self):
        """Deep copy of every tensor (backends write the caches in place)."""
        return self._map_tensors(lambda t: t.clone())

    def to(self, device):
        return self._map_tensors(lambda t: t.to(device))

    def _validate_sequences(self, num_tokens: int, cache_name: str, allow_unordered: bool) -> None:
        """query_start_loc / seq_lens / block_table / slot_mapping against each other and the cache."""
        num_blocks, block_size = getattr(self, cache_name).shape[:2]
        _need(block_size >= 1, f"{cache_name}: block_size (dim 1) must be >= 1, got shape "
                               f"{tuple(getattr(self, cache_name).shape)}")
        for name, t, nd in (("query_start_loc", self.query_start_loc, 1), ("seq_lens", self.seq_lens, 1),
                            ("block_table", self.block_table, 2), ("slot_mapping", self.slot_mapping, 1)):
            _check_index_tensor(name, t, nd)
        B, T = self.seq_lens.shape[0], num_tokens
        _need(B >= 1, "seq_lens: the batch needs at least one sequence")
        _need(self.query_start_loc.shape[0] == B + 1,
              f"query_start_loc: expected {B + 1} entries (num_seqs + 1), got {self.query_start_loc.shape[0]}")
        _need(self.block_table.shape[0] == B,
              f"block_table: expected {B} rows (one per sequence), got {self.block_table.shape[0]}")
        _need(self.slot_mapping.shape[0] == T,
              f"slot_mapping: expected {T} entries (one per query token), got {self.slot_mapping.shape[0]}")
        qsl, slens, table, slots = _host_lists(self.query_start_loc, self.seq_lens, self.block_table,
                                               self.slot_mapping)
        _need(qsl[0] == 0 and qsl[-1] == T,
              f"query_start_loc: must start at 0 and end at num_tokens {T}, got {qsl[0]}..{qsl[-1]}")
        qlens = [qsl[i + 1] - qsl[i] for i in range(B)]
        _need(all(x >= 1 for x in qlens), f"query_start_loc: must be strictly increasing, got {qsl}")
        max_blocks = self.block_table.shape[1]
        for b in range(B):
            _need(slens[b] >= qlens[b],
                  f"seq_lens: sequence {b} has {slens[b]} keys but {qlens[b]} query tokens (need seq_len >= q_len)")
            need_blocks = -(-slens[b] // block_size)
            _need(need_blocks <= max_blocks,
                  f"block_table: sequence {b} needs {need_blocks} blocks of {block_size}, table has {max_blocks} columns")
            if need_blocks:
                used = table[b][:need_blocks]
                lo, hi = min(used), max(used)
                _need(lo >= 0 and hi < num_blocks,
                      f"block_table: sequence {b} uses block {lo if lo < 0 else hi}, "
                      f"out of range [0, {num_blocks}) for a cache of {num_blocks} blocks")
        _need(min(slots) >= 0 and max(slots) < num_blocks * block_size,
              f"slot_mapping: slots must lie in [0, {num_blocks * block_size}), got {min(slots)}..{max(slots)}")
        # Each new token goes to its own position in its own sequence's blocks; anything else
        # (a duplicate, a slot in another sequence's block) makes the cache write overwrite keys.
        seen: dict = {}
        for t, slot in enumerate(slots):
            _need(slot not in seen, f"slot_mapping: tokens {seen.get(slot)} and {t} both write slot {slot}; "
                                    "each new token needs its own slot")
            seen[slot] = t
        for b in range(B):
            context = slens[b] - qlens[b]
            for i in range(qlens[b]):
                t, pos = qsl[b] + i, context + i
                want = table[b][pos // block_size] * block_size + pos % block_size
                _need(slots[t] == want,
                      f"slot_mapping: token {t} (sequence {b}, position {pos}) must write slot {want} "
                      f"(block_table[{b}, {pos // block_size}] * {block_size} + {pos % block_size}), got {slots[t]}")
        if not allow_unordered:
            check_vllm_order(classify_rows(qlens, slens))


@dataclass
class AttentionBatch(_PagedBatch):
    query: torch.Tensor  # [T, Hq, D]
    key: torch.Tensor  # [T, Hkv, D]   new keys of the query tokens
    value: torch.Tensor  # [T, Hkv, D]
    key_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]  (model dtype or fp8)
    value_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    block_table: torch.Tensor  # int32 [B, max_blocks]
    query_start_loc: torch.Tensor  # int32 [B+1]
    seq_lens: torch.Tensor  # int32 [B]  context + new
    slot_mapping: torch.Tensor  # int64 [T]
    scale: float
    causal: bool = True
    sliding_window: Optional[int] = None
    softcap: Optional[float] = None
    alibi_slopes: Optional[torch.Tensor] = None  # float32 [Hq]
    sinks: Optional[torch.Tensor] = None  # float32 [Hq]
    kv_cache_dtype: str = "auto"  # "auto" | "fp8_e4m3fn" | "fp8_e4m3fnuz"
    k_scale: float = 1.0
    v_scale: float = 1.0
    # Test-only knob for pipelines that split the context into chunks (ROCM_AITER_FA, MLA):
    # tokens per chunk; None = the pipeline's own default.
    context_chunk_tokens: Optional[int] = None

    # ---- derived facts -------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return int(self.key_cache.shape[1])

    @property
    def num_heads(self) -> int:
        return int(self.query.shape[1])

    @property
    def num_kv_heads(self) -> int:
        return int(self.key_cache.shape[2])

    @property
    def head_size(self) -> int:
        return int(self.query.shape[2])

    @property
    def dtype(self) -> torch.dtype:
        return self.query.dtype


    # ---- validation ------------------------------------------------------------------------
    def validate(self, allow_unordered: bool = False) -> "AttentionBatch":
        q, k, v = self.query, self.key, self.value
        for name, t in (("query", q), ("key", k), ("value", v)):
            _need(isinstance(t, torch.Tensor), f"{name}: expected a torch.Tensor")
            _need(t.dim() == 3, f"{name}: expected [tokens, heads, head_size], got shape {tuple(t.shape)}")
        _need(q.dtype in MODEL_DTYPES, f"query: dtype must be float16, bfloat16 or float32, got {q.dtype}")
        _need(k.dtype == q.dtype and v.dtype == q.dtype,
              f"key/value: dtype must equal query's {q.dtype}, got {k.dtype}/{v.dtype}")
        T, Hq, D = q.shape
        _need(k.shape == v.shape, f"value: shape {tuple(v.shape)} differs from key {tuple(k.shape)}")
        _need(k.shape[0] == T and k.shape[2] == D,
              f"key: expected [{T}, Hkv, {D}] to match query {tuple(q.shape)}, got {tuple(k.shape)}")
        Hkv = k.shape[1]
        _need(Hkv >= 1 and Hq % Hkv == 0,
              f"key: num_kv_heads {Hkv} must divide num_heads {Hq} (GQA group)")
        for name, c in (("key_cache", self.key_cache), ("value_cache", self.value_cache)):
            _need(isinstance(c, torch.Tensor) and c.dim() == 4,
                  f"{name}: expected NHD [num_blocks, block_size, num_kv_heads, head_size], "
                  f"got shape {tuple(getattr(c, 'shape', ()))}")
            _need(c.shape[2] == Hkv and c.shape[3] == D,
                  f"{name}: expected [num_blocks, block_size, {Hkv}, {D}] (NHD), got {tuple(c.shape)}")
        _need(self.key_cache.shape == self.value_cache.shape,
              f"value_cache: shape {tuple(self.value_cache.shape)} differs from key_cache")
        _need(self.kv_cache_dtype == "auto" or self.kv_cache_dtype in FP8_DTYPES,
              f"kv_cache_dtype: expected 'auto', 'fp8_e4m3fn' or 'fp8_e4m3fnuz', got {self.kv_cache_dtype!r}")
        want = q.dtype if self.kv_cache_dtype == "auto" else FP8_DTYPES[self.kv_cache_dtype]
        for name, c in (("key_cache", self.key_cache), ("value_cache", self.value_cache)):
            _need(c.dtype == want, f"{name}: kv_cache_dtype {self.kv_cache_dtype!r} needs dtype {want} "
                                   f"(the {'model' if self.kv_cache_dtype == 'auto' else 'fp8'} dtype), got {c.dtype}")
        _check_positive_number("scale", self.scale)
        _check_positive_number("k_scale", self.k_scale)
        _check_positive_number("v_scale", self.v_scale)

        self._validate_sequences(T, "key_cache", allow_unordered)
        if self.sliding_window is not None:
            w = self.sliding_window
            _need(isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= 1,
                  f"sliding_window: expected a whole number of keys >= 1 (or None), got {w!r}")
        if self.softcap is not None:
            _check_positive_number("softcap", self.softcap)
        for name, t in (("alibi_slopes", self.alibi_slopes), ("sinks", self.sinks)):
            if t is not None:
                _need(t.shape == (Hq,) and t.dtype == torch.float32,
                      f"{name}: expected float32 [{Hq}], got {t.dtype} {tuple(t.shape)}")
        return self


_ORDER = {"decode": 0, "extend": 1, "prefill": 2}


def check_vllm_order(kinds: list[str]) -> None:
    """Raise BatchError unless rows are decodes, then extends, then prefills."""
    for i in range(1, len(kinds)):
        if _ORDER[kinds[i]] < _ORDER[kinds[i - 1]]:
            raise BatchError(
                f"batch order: sequence {i} is a {kinds[i]} after a {kinds[i - 1]}; vLLM orders "
                f"decode | extend | prefill (got {kinds})")


@dataclass
class MLABatch(_PagedBatch):
    """DeepSeek-style MLA batch (vllm-backends.md 4.3).

    Latent cache entry = ``[kv_c (L) | k_pe (R)]``, cache ``[num_blocks, block_size, L + R]``.
    Weights: ``w_uk [L, N, P]`` and ``w_uv [L, N, V]`` (kv_b_proj split). Output ``[T, N, V]``.
    fp8: cache dtype fp8 with one per-tensor ``kv_scale`` (same storage convention as MHA).
    """

    q_nope: torch.Tensor  # [T, N, P]
    q_pe: torch.Tensor  # [T, N, R]
    kv_c: torch.Tensor  # [T, L]   new latent of the query tokens
    k_pe: torch.Tensor  # [T, R]   new rope key of the query tokens
    kv_cache: torch.Tensor  # [num_blocks, block_size, L + R]
    w_uk: torch.Tensor  # [L, N, P]
    w_uv: torch.Tensor  # [L, N, V]
    block_table: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    slot_mapping: torch.Tensor
    scale: float
    kv_cache_dtype: str = "auto"
    kv_scale: float = 1.0
    context_chunk_tokens: Optional[int] = None

    @property
    def block_size(self) -> int:
        return int(self.kv_cache.shape[1])

    @property
    def num_heads(self) -> int:
        return int(self.q_nope.shape[1])

    @property
    def kv_lora_rank(self) -> int:
        return int(self.kv_c.shape[1])

    @property
    def rope_dim(self) -> int:
        return int(self.k_pe.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.q_nope.dtype


    def validate(self, allow_unordered: bool = False) -> "MLABatch":
        qn, qp = self.q_nope, self.q_pe
        for name, ndim, doc in (("q_nope", 3, "[tokens, heads, P]"), ("q_pe", 3, "[tokens, heads, R]"),
                                ("kv_c", 2, "[tokens, L]"), ("k_pe", 2, "[tokens, R]"),
                                ("kv_cache", 3, "[num_blocks, block_size, L + R]"), ("w_uk", 3, "[L, heads, P]"),
                                ("w_uv", 3, "[L, heads, V]")):
            _check_tensor(name, getattr(self, name), ndim, doc)
        _need(qn.dtype in MODEL_DTYPES, f"q_nope: dtype must be float16/bfloat16/float32, got {qn.dtype}")
        for name in ("q_pe", "kv_c", "k_pe", "w_uk", "w_uv"):
            dt = getattr(self, name).dtype
            _need(dt == qn.dtype, f"{name}: dtype must equal q_nope's {qn.dtype}, got {dt}")
        T, N, P = qn.shape
        _need(qp.shape[:2] == (T, N), f"q_pe: expected [{T}, {N}, R], got {tuple(qp.shape)}")
        R = qp.shape[2]
        _need(self.kv_c.dim() == 2 and self.kv_c.shape[0] == T,
              f"kv_c: expected [{T}, L], got {tuple(self.kv_c.shape)}")
        L = self.kv_c.shape[1]
        _need(self.k_pe.shape == (T, R), f"k_pe: expected [{T}, {R}], got {tuple(self.k_pe.shape)}")
        _need(self.kv_cache.dim() == 3 and self.kv_cache.shape[2] == L + R,
              f"kv_cache: expected [num_blocks, block_size, {L + R}], got {tuple(self.kv_cache.shape)}")
        _need(self.w_uk.shape == (L, N, P), f"w_uk: expected [{L}, {N}, {P}], got {tuple(self.w_uk.shape)}")
        _need(self.w_uv.dim() == 3 and self.w_uv.shape[:2] == (L, N),
              f"w_uv: expected [{L}, {N}, V], got {tuple(self.w_uv.shape)}")
        if self.kv_cache_dtype == "auto":
            _need(self.kv_cache.dtype == qn.dtype,
                  f"kv_cache: kv_cache_dtype 'auto' needs the model dtype {qn.dtype}, got {self.kv_cache.dtype}")
        else:
            _need(self.kv_cache_dtype in FP8_DTYPES,
                  f"kv_cache_dtype: expected 'auto', 'fp8_e4m3fn' or 'fp8_e4m3fnuz', got {self.kv_cache_dtype!r}")
            _need(self.kv_cache.dtype == FP8_DTYPES[self.kv_cache_dtype],
                  f"kv_cache: kv_cache_dtype {self.kv_cache_dtype} needs dtype "
                  f"{FP8_DTYPES[self.kv_cache_dtype]}, got {self.kv_cache.dtype}")
        _check_positive_number("scale", self.scale)
        _check_positive_number("kv_scale", self.kv_scale)
        self._validate_sequences(T, "kv_cache", allow_unordered)
        return self
