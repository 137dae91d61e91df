"""Benchmark shapes and the random vLLM-ordered batches built from them.

A shape is ``BenchShape`` (or any object with the same attributes): ``seq_lens`` (context +
new per sequence), ``query_lens``, heads, head size, block size, dtype. Throughput is TFLOP/s
for prefill and extend (4 * Hq * D * visible (query, key) pairs) and GB/s of KV read for decode.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from impl.batch import AttentionBatch


@dataclass(frozen=True)
class BenchShape:
    name: str
    seq_lens: tuple
    query_lens: tuple
    num_heads: int = 32
    num_kv_heads: int = 8
    head_size: int = 128
    block_size: int = 16
    dtype: torch.dtype = torch.bfloat16


# bf16, 32 query / 8 KV heads, head dim 128, block 16 (BenchShape's defaults)
MHA_SHAPES = (
    BenchShape("prefill 8192 causal", (8192,), (8192,)),
    BenchShape("extend 3616 over 20000", (23616,), (3616,)),
    BenchShape("decode 64 x 4096", (4096,) * 64, (1,) * 64),
    BenchShape("decode 256 x 1024", (1024,) * 256, (1,) * 256),
)
# the AITER GPU check's rows (tests/aiter/gpu_check.py)
AITER_SHAPES = (
    BenchShape("decode-b32-ctx2048", seq_lens=(2048,) * 32, query_lens=(1,) * 32),
    BenchShape("prefill-b4-q1024", seq_lens=(1024,) * 4, query_lens=(1024,) * 4),
    BenchShape("mixed-8dec-2ext-2pre", seq_lens=(1500,) * 8 + (3000, 3000, 512, 512),
               query_lens=(1,) * 8 + (256, 256, 512, 512)),
)


def make_batch(shape, device, seed: int = 0) -> AttentionBatch:
    """A random vLLM-ordered batch for ``shape`` on ``device`` (contiguous blocks per sequence)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    qlens, slens = list(shape.query_lens), list(shape.seq_lens)
    if len(qlens) != len(slens) or any(q > s for q, s in zip(qlens, slens)):
        raise ValueError("shape: query_lens and seq_lens must pair up with q_len <= seq_len")
    bs, T, B = shape.block_size, sum(qlens), len(qlens)
    nblk = [-(-s // bs) for s in slens]
    table = torch.zeros(B, max(nblk), dtype=torch.int32)
    slots, cursor = [], 0
    for b in range(B):
        table[b, :nblk[b]] = torch.arange(cursor, cursor + nblk[b], dtype=torch.int32)
        ctx = slens[b] - qlens[b]
        slots += [int(table[b, p // bs]) * bs + p % bs for p in range(ctx, slens[b])]
        cursor += nblk[b]
    Hq, Hkv, D, dt = shape.num_heads, shape.num_kv_heads, shape.head_size, shape.dtype

    def rnd(*s):
        return torch.randn(*s, generator=g).to(dt)

    batch = AttentionBatch(
        query=rnd(T, Hq, D), key=rnd(T, Hkv, D), value=rnd(T, Hkv, D),
        key_cache=rnd(cursor, bs, Hkv, D), value_cache=rnd(cursor, bs, Hkv, D),
        block_table=table, query_start_loc=torch.tensor([0, *itertools.accumulate(qlens)], dtype=torch.int32),
        seq_lens=torch.tensor(slens, dtype=torch.int32), slot_mapping=torch.tensor(slots, dtype=torch.int64),
        scale=D ** -0.5)
    return batch.validate().to(device)


def phase(shape) -> str:
    """decode (every q_len 1), prefill (no context) or extend."""
    if all(q == 1 for q in shape.query_lens):
        return "decode"
    return "prefill" if all(q == s for q, s in zip(shape.query_lens, shape.seq_lens)) else "extend"


def visible_pairs(shape) -> int:
    n = 0
    for s, q in zip(shape.seq_lens, shape.query_lens):
        ctx = s - q
        n += q * ctx + q * (q + 1) // 2  # causal: query i sees ctx + i + 1 keys
    return n


def work(shape) -> tuple:
    """(amount, unit): FLOPs for prefill/extend, bytes of K+V read for decode."""
    if phase(shape) == "decode":
        elem = torch.tensor([], dtype=shape.dtype).element_size()
        return 2 * sum(shape.seq_lens) * shape.num_kv_heads * shape.head_size * elem, "GB/s"
    return 4 * shape.num_heads * shape.head_size * visible_pairs(shape), "TFLOP/s"


def rate(amount: float, unit: str, ms: float) -> float:
    return amount / (ms * 1e-3) / (1e12 if unit == "TFLOP/s" else 1e9)
