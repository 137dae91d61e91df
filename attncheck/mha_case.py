"""MHA cases: deterministic inputs, the float64 oracle, error budgets, and the batch.

``build_golden(case)`` returns every tensor a golden file holds (see docs/ARCHITECTURE.md):
the batch inputs, ``expected.*`` (reference outputs in float64, stored as float32; the cache
slots after the write) and ``budget.*`` (the error of the same math done in the input dtype,
the FlashAttention "pt" path, per row). ``batch_from_tensors`` rebuilds the batch from them.
Nothing here is random at test time: inputs come from the case's seed at generation time
only, and tests read them back from the golden file.
"""

from __future__ import annotations

import math

import torch

from attncheck.rule import locate_token, rounding_step_rows
from impl.batch import FP8_DTYPES, AttentionBatch
from reference import lowp as ref_lowp
from reference import mha as ref_mha
from reference import paged as ref_paged

CACHE_FIELDS = (("key_cache", "expected.key_cache_slots"), ("value_cache", "expected.value_cache_slots"))
SPARE_BLOCKS = 1  # an unused, NaN-filled block; block-table padding points at it


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The ALiBi paper's geometric slopes (closest power of two, then interleaved extras)."""
    n = 2 ** math.floor(math.log2(num_heads))
    base = [2 ** (-8.0 * (i + 1) / n) for i in range(n)]
    extra = [2 ** (-4.0 * (2 * i + 1) / n) for i in range(num_heads - n)]
    return torch.tensor(base + extra, dtype=torch.float32)


def _cache_dtype(case) -> torch.dtype:
    return FP8_DTYPES[case.kv_cache_dtype] if case.kv_cache_dtype != "auto" else case.torch_dtype


def _kv_values(g, shape, case, scale: float):
    """Random K or V values: returned as (model-dtype tensor, cache-dtype tensor).

    For fp8 caches the values are fp8 numbers times the scale, so quantising them is lossless.
    """
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    if case.kv_cache_dtype == "auto":
        xm = x.to(case.torch_dtype)
        return xm, xm
    q8 = ref_paged.quantize_fp8(x, scale, FP8_DTYPES[case.kv_cache_dtype])
    xm = (q8.to(torch.float32) * scale).to(case.torch_dtype)
    back = ref_paged.quantize_fp8(xm, scale, FP8_DTYPES[case.kv_cache_dtype])
    if not torch.equal(back.view(torch.uint8), q8.view(torch.uint8)):
        raise AssertionError(f"case {case.name}: fp8 values do not round-trip exactly; pick another scale")
    return xm, q8


def build_inputs(case) -> dict:
    g = torch.Generator().manual_seed(case.seed)
    dt = case.torch_dtype
    B, bs = len(case.seq_lens), case.block_size
    Hq, Hkv, D = case.num_heads, case.num_kv_heads, case.head_size
    blocks_per_seq = [-(-s // bs) for s in case.seq_lens]
    num_blocks = sum(blocks_per_seq) + SPARE_BLOCKS
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
    poison_block = int(perm[-1])
    max_blocks = max(blocks_per_seq) + 1  # always one padding column
    block_table = torch.full((B, max_blocks), poison_block, dtype=torch.int32)
    cursor = 0
    for b, n in enumerate(blocks_per_seq):
        block_table[b, :n] = perm[cursor:cursor + n]
        cursor += n

    cdt = _cache_dtype(case)
    key_cache = torch.full((num_blocks, bs, Hkv, D), float("nan"), dtype=torch.float32).to(cdt)
    value_cache = torch.full((num_blocks, bs, Hkv, D), float("nan"), dtype=torch.float32).to(cdt)

    qlens, slens = list(case.query_lens), list(case.seq_lens)
    T = sum(qlens)
    query = (torch.randn((T, Hq, D), generator=g, dtype=torch.float32) * case.query_std).to(dt)
    key, key_c = _kv_values(g, (T, Hkv, D), case, case.k_scale)
    value, value_c = _kv_values(g, (T, Hkv, D), case, case.v_scale)
    slot_mapping = torch.empty(T, dtype=torch.int64)
    t0 = 0
    for b in range(B):
        ctx = slens[b] - qlens[b]
        if ctx:
            _, kc = _kv_values(g, (ctx, Hkv, D), case, case.k_scale)
            _, vc = _kv_values(g, (ctx, Hkv, D), case, case.v_scale)
            for p in range(ctx):
                blk = int(block_table[b, p // bs])
                key_cache[blk, p % bs] = kc[p]
                value_cache[blk, p % bs] = vc[p]
        for i in range(qlens[b]):
            p = ctx + i
            slot_mapping[t0 + i] = int(block_table[b, p // bs]) * bs + p % bs
        t0 += qlens[b]
    query_start_loc = torch.tensor([0] + list(_cumsum(qlens)), dtype=torch.int32)
    tensors = {
        "query": query, "key": key, "value": value,
        "key_cache": key_cache, "value_cache": value_cache,
        "block_table": block_table, "query_start_loc": query_start_loc,
        "seq_lens": torch.tensor(slens, dtype=torch.int32), "slot_mapping": slot_mapping,
    }
    if case.alibi:
        tensors["alibi_slopes"] = alibi_slopes(Hq)
    if case.sinks:
        tensors["sinks"] = torch.randn(Hq, generator=g, dtype=torch.float32) * 2.0
    del key_c, value_c
    return tensors


def _cumsum(xs):
    s = 0
    for x in xs:
        s += x
        yield s


def _knobs(case, tensors) -> dict:
    return dict(scale=case.softmax_scale, causal=case.causal, sliding_window=case.sliding_window,
                softcap=case.softcap, alibi_slopes=tensors.get("alibi_slopes"),
                sinks=tensors.get("sinks"), k_scale=case.k_scale, v_scale=case.v_scale)


def expected_and_budgets(case, tensors: dict, compute_device="cpu", streaming=False) -> dict:
    """Reference outputs (float64) and the low-precision budgets for the given inputs."""
    dev = torch.device(compute_device)
    t = {k: v.to(dev) for k, v in tensors.items()}
    kc, vc = t["key_cache"].clone(), t["value_cache"].clone()
    ref_paged.write_kv(t["key"], t["value"], kc, vc, t["slot_mapping"],
                       k_scale=case.k_scale, v_scale=case.v_scale)
    knobs = _knobs(case, t)
    ref_out, ref_lse = ref_mha.paged_attention(
        t["query"].to(torch.float64), kc, vc, t["block_table"], t["query_start_loc"], t["seq_lens"],
        compute_dtype=torch.float64, streaming=streaming, **knobs)
    # The budget: the same math in the input dtype, in both FlashAttention op orders (K
    # pre-scaled, and scores scaled); either is a legitimate kernel, so each row gets the larger
    # error. One order alone under-states fp32 noise (a kernel that scales its scores already
    # lands near 1x of the K-pre-scaled budget).
    errs, lse_errs = [], []
    for reorder in (True, False):
        pt_out, pt_lse = ref_lowp.paged_attention_lowp(
            t["query"], kc, vc, t["block_table"], t["query_start_loc"], t["seq_lens"],
            dtype=case.torch_dtype, block_m=512 if streaming else None, reorder=reorder, **knobs)
        errs.append((pt_out.to(torch.float64) - ref_out).abs())
        e = (pt_lse.to(torch.float64) - ref_lse).abs()
        lse_errs.append(torch.where(torch.isinf(ref_lse) & (pt_lse.to(torch.float64) == ref_lse),
                                    torch.zeros_like(e), e))
        del pt_out, pt_lse
    err_rows = torch.maximum(errs[0].amax(dim=-1), errs[1].amax(dim=-1))
    err_mean = torch.maximum(errs[0].mean(), errs[1].mean())
    lse_pt_err = torch.maximum(lse_errs[0], lse_errs[1])
    slots = t["slot_mapping"]
    Hkv, D = kc.shape[2], kc.shape[3]
    out = {
        "expected.output": ref_out.to(torch.float32),
        "expected.lse": ref_lse.to(torch.float32),
        "expected.key_cache_slots": kc.reshape(-1, Hkv, D)[slots].clone(),
        "expected.value_cache_slots": vc.reshape(-1, Hkv, D)[slots].clone(),
        "budget.pt_err_row": err_rows.to(torch.float32),
        "budget.round_row": rounding_step_rows(ref_out, case.torch_dtype).to(torch.float32),
        "budget.lse_pt_err": lse_pt_err.to(torch.float32),
        "budget.pt_err_mean": err_mean.to(torch.float32).reshape(()),
    }
    return {k: v.cpu() for k, v in out.items()}


def build_golden(case) -> dict:
    tensors = build_inputs(case)
    tensors.update(expected_and_budgets(case, tensors))
    return tensors


def build_live(case, device) -> dict:
    """Large tier: inputs from the case seed (on the CPU, deterministic), oracle on ``device``
    with the streaming float64 reference."""
    tensors = build_inputs(case)
    tensors.update(expected_and_budgets(case, tensors, compute_device=device, streaming=True))
    return tensors


def batch_from_tensors(case, tensors: dict, device) -> AttentionBatch:
    dev = torch.device(device)
    g = {k: v.to(dev) for k, v in tensors.items() if not k.startswith(("expected.", "budget."))}
    return AttentionBatch(
        query=g["query"], key=g["key"], value=g["value"],
        key_cache=g["key_cache"].clone(), value_cache=g["value_cache"].clone(),
        block_table=g["block_table"], query_start_loc=g["query_start_loc"], seq_lens=g["seq_lens"],
        slot_mapping=g["slot_mapping"], scale=case.softmax_scale, causal=case.causal,
        sliding_window=case.sliding_window, softcap=case.softcap,
        alibi_slopes=g.get("alibi_slopes"), sinks=g.get("sinks"),
        kv_cache_dtype=case.kv_cache_dtype, k_scale=case.k_scale, v_scale=case.v_scale,
        context_chunk_tokens=case.context_chunk_tokens,
    )


def rule_factors(case) -> dict:
    """DESIGN.md: k = 2 (3 with softcap/ALiBi, 4 with fp8); mean 1.5 (3 for fp8)."""
    if case.kv_cache_dtype != "auto":
        return {"k_row": 4.0, "k_mean": 3.0}
    if case.softcap or case.alibi:
        return {"k_row": 3.0, "k_mean": 1.5}
    return {"k_row": 2.0, "k_mean": 1.5}


def locate_row(case, tensors: dict, token: int) -> dict:
    return locate_token(tensors, token, case.block_size, case.causal, case.sliding_window)
