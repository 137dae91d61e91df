"""MHA cases: deterministic inputs, the float64 oracle, error budgets, and the batch.

``build_golden(case)`` returns every tensor a golden file holds (see docs/ARCHITECTURE.md):
the batch inputs, ``expected.*`` (reference outputs in float64, stored as float32; the cache
slots after the write) and ``budget.*`` (attncheck.budgets: the error of the same math done in
the input dtype, the FlashAttention "pt" path, per row, and the terms of golden/README.md).
``batch_from_tensors`` rebuilds the batch from them. Nothing here is random at test time:
inputs come from the case's seed at generation time only, and tests read them back from the
golden file. Everything stored is computed by reference.emulated's EXACT engine and
reference.fp's written-out rounding, so it is the same on every machine.

fp8 caches: the new tokens' K/V are ordinary model-dtype values, so the cache write really
rounds (to nearest even) and saturates; each fp8 case also plants exact rounding ties and two
saturating values per KV head in its last new token (``Draws.fp8_specials``). Context tokens
are stored fp8 values.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional

import torch

from attncheck import budgets
from attncheck.draws import CounterDraws, Draws
from attncheck.rule import locate_token
from impl.batch import FP8_DTYPES, AttentionBatch
from reference import emulated as em
from reference import fp
from reference import paged as ref_paged

CACHE_FIELDS = (("key_cache", "expected.key_cache_slots"), ("value_cache", "expected.value_cache_slots"))
LIVE_BLOCK_M = 256  # query rows per block in the live (large-tier) oracle: bounds GPU memory


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The ALiBi paper's geometric slopes (closest power of two, then interleaved extras), as
    float32 (2**x computed with reference.fp.exp, the same bits everywhere)."""
    n = 2 ** math.floor(math.log2(num_heads))
    exps = [-8.0 * (i + 1) / n for i in range(n)] + [-4.0 * (2 * i + 1) / n for i in range(num_heads - n)]
    slopes = fp.exp(torch.tensor(exps, dtype=torch.float64) * math.log(2.0))
    return budgets.to_float32(slopes)


def _cache_dtype(case) -> torch.dtype:
    return FP8_DTYPES[case.kv_cache_dtype] if case.kv_cache_dtype != "auto" else case.torch_dtype


def build_inputs(case, draws: Optional[Draws] = None) -> dict:
    """The case's inputs, drawn by ``draws`` (default: the stored tiers' ``Draws(case.seed)`` on
    the CPU); K/V and the caches live on ``draws.device``, the index tensors on the CPU."""
    draws = draws or Draws(case.seed)
    dev = draws.device
    dt, m = case.torch_dtype, fp.format_of(case.torch_dtype)
    fp8 = case.kv_cache_dtype != "auto"
    B, bs = len(case.seq_lens), case.block_size
    Hq, Hkv, D = case.num_heads, case.num_kv_heads, case.head_size
    block_table, num_blocks = shuffled_block_table(draws, case.seq_lens, bs)

    cdt = _cache_dtype(case)
    # NaN poison made by torch.full's scalar conversion: a vectorised float32 -> bf16 cast of NaN
    # gives different bits per ISA level
    key_cache = torch.full((num_blocks, bs, Hkv, D), float("nan"), dtype=cdt, device=dev)
    value_cache = torch.full((num_blocks, bs, Hkv, D), float("nan"), dtype=cdt, device=dev)

    qlens, slens = list(case.query_lens), list(case.seq_lens)
    T = sum(qlens)
    query = fp.round_to(draws.normal((T, Hq, D), std=case.query_std), m)
    key = fp.round_to(draws.normal((T, Hkv, D)), m)
    value = fp.round_to(draws.normal((T, Hkv, D)), m)
    if fp8:
        key = draws.fp8_specials(key, cdt, dt, case.k_scale, last_token=T - 1, saturating=2)
        value = draws.fp8_specials(value, cdt, dt, case.v_scale, last_token=T - 1, saturating=2)
    for b in range(B):
        ctx = slens[b] - qlens[b]
        if ctx:
            stored = []
            for scale in (case.k_scale, case.v_scale):
                x = draws.normal((ctx, Hkv, D))
                stored.append(ref_paged.quantize_fp8(x, scale, cdt) if fp8 else budgets.model_values(x, cdt))
            pos = torch.arange(ctx)
            blk = block_table[b, pos // bs].long().to(dev)
            off = (pos % bs).to(dev)
            key_cache[blk, off] = stored[0]
            value_cache[blk, off] = stored[1]
    tensors = {
        "query": query.to(dt), "key": key.to(dt), "value": value.to(dt),  # exact: model values
        "key_cache": key_cache, "value_cache": value_cache,
        "block_table": block_table, "query_start_loc": query_start_loc(qlens),
        "seq_lens": torch.tensor(slens, dtype=torch.int32),
        "slot_mapping": new_token_slots(block_table, qlens, slens, bs),
    }
    if case.alibi:
        tensors["alibi_slopes"] = alibi_slopes(Hq).to(dev)
    if case.sinks:
        tensors["sinks"] = budgets.to_float32(draws.normal((Hq,), std=2.0))
    return tensors


def new_token_slots(block_table: torch.Tensor, query_lens, seq_lens, block_size: int) -> torch.Tensor:
    """int64 [T]: the cache slot of each new token (sequence b's new tokens are its last
    query_lens[b] positions), through the block table."""
    parts = []
    for b, (q, s) in enumerate(zip(query_lens, seq_lens)):
        pos = torch.arange(s - q, s)
        parts.append(block_table[b, pos // block_size].long() * block_size + pos % block_size)
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


def shuffled_block_table(draws: Draws, seq_lens, block_size: int) -> tuple:
    """(int32 [B, max blocks + 1] on the CPU, number of cache blocks): the blocks of all
    sequences and one spare in a random order; each row's unused entries, the padding column
    included, point at the last block of that order (never written: NaN)."""
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 1
    perm = draws.permutation(num_blocks).to(device="cpu", dtype=torch.int32)
    block_table = torch.full((len(blocks_per_seq), max(blocks_per_seq) + 1), int(perm[-1]), dtype=torch.int32)
    cursor = 0
    for b, n in enumerate(blocks_per_seq):
        block_table[b, :n] = perm[cursor:cursor + n]
        cursor += n
    return block_table, num_blocks


def query_start_loc(query_lens) -> torch.Tensor:
    """int32 [B + 1]: where each sequence's new tokens start (vLLM's query_start_loc)."""
    return torch.tensor([0, *itertools.accumulate(query_lens)], dtype=torch.int32)


def _knobs(case, tensors) -> dict:
    return dict(scale=case.softmax_scale, causal=case.causal, sliding_window=case.sliding_window,
                softcap=case.softcap, alibi_slopes=tensors.get("alibi_slopes"),
                sinks=tensors.get("sinks"), k_scale=case.k_scale, v_scale=case.v_scale)


def expected_and_budgets(case, tensors: dict, compute_device="cpu", engine=em.EXACT, keep_device=False) -> dict:
    """Reference outputs (float64) and the budgets for the given inputs.

    Pipelines: the reference reads every key from the cache after the write; with an fp8 cache a
    kernel may also attend the new tokens from the unquantised K/V (vLLM's prefill does), which
    is a second legitimate pipeline; with ``context_chunk_tokens`` the context chunked and merged
    (vLLM's prefill) is another, whose model-dtype partials carry the merge chain's worst case
    (reference.emulated.merge_chain_step) into the pipeline term. pt variants: each pipeline in
    both FlashAttention op orders (K pre-scaled; scores scaled), normalising before P.V or after,
    each against its own float64 result.
    ``keep_device``: leave the results on ``compute_device`` (the live tiers) instead of the CPU.
    """
    dev = torch.device(compute_device)
    t = budgets.oracle_inputs(tensors, dev)
    kc, vc = t["key_cache"].clone(), t["value_cache"].clone()
    ref_paged.write_kv(t["key"], t["value"], kc, vc, t["slot_mapping"], k_scale=case.k_scale, v_scale=case.v_scale)
    batch = (t["query"], kc, vc, t["block_table"], t["query_start_loc"], t["seq_lens"])
    common = dict(_knobs(case, t), engine=engine, block_m=None if engine is em.EXACT else LIVE_BLOCK_M)
    ref_out, ref_lse, sensitivity, out_step = em.paged_attention(*batch, **common, with_lse_sensitivity=True,
                                                                 with_output_step=True)
    raw = dict(new_key=t["key"], new_value=t["value"])
    pipelines = {"cache": ({}, (ref_out, ref_lse))}
    if case.kv_cache_dtype != "auto":
        pipelines["unquantised new tokens"] = (raw, em.paged_attention(*batch, **common, **raw))
    chunkable = case.sliding_window is None and not case.alibi and not case.sinks  # what chunked_context models
    if case.context_chunk_tokens is not None and chunkable:  # vLLM's chunked prefill: partials merged in the model dtype
        chunked = dict(context_chunk_tokens=case.context_chunk_tokens)
        pipelines["chunked context"] = (chunked, em.paged_attention(*batch, **common, **chunked,
                                                                    partials=case.torch_dtype))
    variants = []
    for extra, exact in pipelines.values():
        for prescale, normalise in itertools.product(em.PRESCALES, em.NORMALISES):
            pt = em.paged_attention(*batch, **common, **extra, dtype=case.torch_dtype, prescale=prescale,
                                    normalise=normalise)
            variants.append((*pt, *exact[:2]))
    others = [exact for name, (_, exact) in pipelines.items() if name != "cache"]
    out = budgets.assemble((ref_out, ref_lse), variants, others,
                           budgets.lse_step(sensitivity, case.torch_dtype),
                           case.torch_dtype, fixed_order=engine is em.EXACT, output_step=out_step)
    slots = t["slot_mapping"]
    Hkv, D = kc.shape[2], kc.shape[3]
    out.update({
        "expected.output": budgets.to_float32(ref_out),
        "expected.lse": budgets.to_float32(ref_lse),
        "expected.key_cache_slots": kc.reshape(-1, Hkv, D)[slots].clone(),
        "expected.value_cache_slots": vc.reshape(-1, Hkv, D)[slots].clone(),
    })
    return out if keep_device else {k: v.cpu() for k, v in out.items()}


def build_golden(case) -> dict:
    tensors = build_inputs(case)
    tensors.update(expected_and_budgets(case, tensors))
    return tensors


def build_live(case, device) -> dict:
    """Live tiers (large, sweep): inputs from the case seed drawn on ``device`` (CounterDraws: the
    same bits on any device), oracle and budgets on ``device`` with the FAST engine (torch's
    float64 kernels; never stored)."""
    tensors = build_inputs(case, CounterDraws(case.seed, device))
    tensors.update(expected_and_budgets(case, tensors, compute_device=device, engine=em.FAST, keep_device=True))
    return tensors  # values stay on ``device``: each backend's copies and the comparison are made there


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
