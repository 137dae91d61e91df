"""Paged inputs shared by the paged-decode and prefix-prefill kernel tests: a NaN-poisoned
paged cache with every key of every sequence written (context and new tokens)."""

import math

import torch

from reference.paged import slot_mapping_for, write_kv

DT = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FP8 = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e4m3fnuz": torch.float8_e4m3fnuz}


def make_paged(seq_lens, query_lens, *, hq=4, hkv=2, d=64, block_size=16, dtype="fp16",
               kv="auto", k_scale=1.0, v_scale=1.0, seed=0, alibi=False, sinks=False):
    """A NaN-poisoned paged batch with every key already written; returns a dict of tensors."""
    g = torch.Generator().manual_seed(seed)
    dt = DT[dtype]
    B = len(seq_lens)
    nblk = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(nblk) + 2  # spare blocks stay NaN
    perm = torch.randperm(num_blocks, generator=g).tolist()
    spare = perm[-1]
    max_blocks = max(nblk) + 1
    table = torch.full((B, max_blocks), spare, dtype=torch.int32)  # unused columns -> a NaN block
    i = 0
    for b, n in enumerate(nblk):
        table[b, :n] = torch.tensor(perm[i:i + n], dtype=torch.int32)
        i += n
    cdt = FP8.get(kv, dt)
    kc = torch.full((num_blocks, block_size, hkv, d), float("nan"), dtype=dt).to(cdt)
    vc = kc.clone()
    # All positions of every sequence (context and new tokens) go into the cache.
    slots = slot_mapping_for(table, seq_lens, seq_lens, block_size)
    total = sum(seq_lens)
    k_all = torch.randn(total, hkv, d, generator=g).to(dt)
    v_all = torch.randn(total, hkv, d, generator=g).to(dt)
    if kv != "auto":  # fp8: pick values whose scaled range uses the fp8 grid
        k_all, v_all = k_all * (4 * k_scale), v_all * (4 * v_scale)
    write_kv(k_all, v_all, kc, vc, slots, k_scale=k_scale, v_scale=v_scale)
    T = sum(query_lens)
    q = torch.randn(T, hq, d, generator=g).to(dt)
    qsl = torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0).tolist()), dtype=torch.int32)
    batch = dict(query=q, key_cache=kc, value_cache=vc, block_table=table, query_start_loc=qsl,
                 seq_lens=torch.tensor(seq_lens, dtype=torch.int32))
    knobs = dict(scale=1.0 / math.sqrt(d), k_scale=k_scale, v_scale=v_scale)
    if alibi:
        knobs["alibi_slopes"] = torch.tensor([2.0 ** (-(h + 1) / 2) for h in range(hq)], dtype=torch.float32)
    if sinks:
        knobs["sinks"] = torch.randn(hq, generator=g).float() * 2
    return batch, knobs, kv
