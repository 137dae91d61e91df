"""Callables for ``attncheck bench`` rows of the AITER backends (the lead assembles the command).

Given a shape and a CUDA device, each function returns a zero-argument callable that runs one
forward on pre-built inputs (inputs are built once, outside the timed call):

* ``unified_kernel_callable(shape, device)``: AITER's Triton ``unified_attention`` alone
  (cache already written);
* ``backend_callable(name, shape, device)``: one ``run(batch)`` of ROCM_AITER_UNIFIED_ATTN or
  ROCM_AITER_FA (cache write included, as in vLLM's forward); the caches are rewritten each
  call at the same slots, so repeated calls are identical.
* ``rows(shapes, device)``: ``[(row_name, callable), ...]`` for every shape and all three.

A shape is ``BenchShape`` (or any object with the same attributes, e.g. the Triton-backends
issue's shape records): ``seq_lens`` (context + new per sequence), ``query_lens``, heads, head
size, block size, dtype. ``DEFAULT_SHAPES`` are decode / prefill / mixed examples.
"""

from __future__ import annotations

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


DEFAULT_SHAPES = (
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
        block_table=table, query_start_loc=torch.tensor([0] + list(_cumsum(qlens)), dtype=torch.int32),
        seq_lens=torch.tensor(slens, dtype=torch.int32), slot_mapping=torch.tensor(slots, dtype=torch.int64),
        scale=D ** -0.5)
    return batch.validate().to(device)


def _cumsum(xs):
    s = 0
    for x in xs:
        s += x
        yield s


def unified_kernel_callable(shape, device):
    from impl.aiter import triton_kernels

    b = make_batch(shape, device)
    out = torch.empty_like(b.query)
    qlens = b.query_lens()
    kw = dict(cu_seqlens_q=b.query_start_loc, max_seqlen_q=max(qlens), seqused_k=b.seq_lens,
              max_seqlen_k=int(b.seq_lens.max()), block_table=b.block_table, scale=b.scale)
    return lambda: triton_kernels.unified_attention(b.query, b.key_cache, b.value_cache, out, **kw)


def backend_callable(name: str, shape, device):
    from impl.backends.rocm_aiter_fa import AiterFABackend
    from impl.backends.rocm_aiter_unified_attn import AiterUnifiedAttnBackend

    backends = {"ROCM_AITER_UNIFIED_ATTN": AiterUnifiedAttnBackend, "ROCM_AITER_FA": AiterFABackend}
    if name not in backends:
        raise ValueError(f"name: expected one of {sorted(backends)}, got {name!r}")
    be, b = backends[name](), make_batch(shape, device)
    return lambda: be.run(b)


def rows(shapes=DEFAULT_SHAPES, device="cuda"):
    out = []
    for s in shapes:
        out.append((f"aiter.unified_attention kernel / {s.name}", unified_kernel_callable(s, device)))
        for name in ("ROCM_AITER_UNIFIED_ATTN", "ROCM_AITER_FA"):
            out.append((f"{name} / {s.name}", backend_callable(name, s, device)))
    return out
