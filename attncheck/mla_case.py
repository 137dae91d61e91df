"""MLA cases: deterministic inputs, the float64 oracle, error budgets, and the batch.

Same contract as ``attncheck.mha_case`` (see docs/ARCHITECTURE.md "Golden tensors"), for the
DeepSeek-style MLA batch ``impl.batch.MLABatch``:

* inputs: ``q_nope [T,N,P]``, ``q_pe [T,N,R]``, ``kv_c [T,L]``, ``k_pe [T,R]``, the latent cache
  ``kv_cache [nb,bs,L+R]`` holding every sequence's context (unused slots, spare blocks and the
  block-table padding column NaN-poisoned), ``w_uk [L,N,P]``, ``w_uv [L,N,V]``, block table,
  ``query_start_loc``, ``seq_lens``, ``slot_mapping``;
* ``expected.output`` = float64 MLA (reference.mla, per sequence the cheaper of the two paths,
  which agree to float64 rounding, tests/reference/test_mla.py) over the cache after the write,
  stored as float32; ``expected.lse``; ``expected.kv_cache_slots`` = the written latent entries;
* budgets (attncheck.budgets): a backend may run any row down either MLA pipeline (ROCM_AITER_MLA
  decodes spec-decode rows through the absorbed kernel, TRITON_MLA prefills them up-projected):
  the absorbed path with every key from the cache, and the up-projected path with the new tokens
  from the raw ``kv_c``/``k_pe`` as vLLM's prefill does, the context from the dequantised cache,
  chunked like the case. The pt variants are both pipelines in both op orders, each against its
  own float64 result with the projections (ql, o_lat; the up-projected K and V) written in the
  model dtype, as every implementation writes them; each such pipeline's difference from the
  reference is the pipeline term (with an fp8 cache it also holds the quantisation of the new
  tokens; with a chunked context, the worst case of its model-dtype partials in the merge chain,
  reference.emulated.merge_chain_step).
  Everything stored comes from reference.emulated's EXACT engine (the same bytes on any machine).

Scale: the layer scale ``(P + R) ** -0.5 * mscale(rope_factor) ** 2`` (DeepSeek-V3: YaRN factor
40), never derived from the 576-wide cache entry. Weights are scaled by ``1/sqrt(L)`` (as vLLM's
MLA test does) so the up-projected keys and values are O(1).

fp8 latent caches: the new tokens' latents are ordinary model-dtype values (the write really
rounds and saturates; ``Draws.fp8_specials`` plants rounding ties and two saturating values in
the last new token), so a pipeline that attends to the raw new tokens (prefill) and one reading
them back from the cache (decode) differ by the quantisation: the pipeline term covers it.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional

import torch

from attncheck import budgets
from attncheck.draws import CounterDraws, Draws
from attncheck.mha_case import new_token_slots, query_start_loc, shuffled_block_table
from attncheck.rule import locate_token
from impl.batch import FP8_DTYPES, MLABatch
from reference import emulated as em
from reference import fp
from reference import mla as ref_mla
from reference import paged as ref_paged

CACHE_FIELDS = (("kv_cache", "expected.kv_cache_slots"),)
LIVE_BLOCK_M = 256  # query rows per block in the live (large-tier) oracle: bounds GPU memory


def _cache_dtype(case) -> torch.dtype:
    return FP8_DTYPES[case.kv_cache_dtype] if case.kv_cache_dtype != "auto" else case.torch_dtype


def build_inputs(case, draws: Optional[Draws] = None) -> dict:
    """The case's inputs, drawn by ``draws`` (default: the stored tiers' ``Draws(case.seed)`` on
    the CPU); values and the cache live on ``draws.device``, the index tensors on the CPU."""
    draws = draws or Draws(case.seed)
    dev = draws.device
    dt, m = case.torch_dtype, fp.format_of(case.torch_dtype)
    cdt = _cache_dtype(case)
    fp8 = case.kv_cache_dtype != "auto"
    B, bs = len(case.seq_lens), case.block_size
    N, L, R, P, V = case.num_heads, case.kv_lora_rank, case.rope_dim, case.nope_dim, case.v_dim
    block_table, num_blocks = shuffled_block_table(draws, case.seq_lens, bs)
    # scalar NaN: same bits on every ISA
    kv_cache = torch.full((num_blocks, bs, L + R), float("nan"), dtype=cdt, device=dev)

    qlens, slens = list(case.query_lens), list(case.seq_lens)
    T = sum(qlens)
    q_nope = fp.round_to(draws.normal((T, N, P)), m)
    q_pe = fp.round_to(draws.normal((T, N, R)), m)
    new_lat = fp.round_to(draws.normal((T, L + R)), m)
    if fp8:
        new_lat = draws.fp8_specials(new_lat, cdt, dt, case.kv_scale, last_token=T - 1, saturating=2)
    w_uk = fp.round_to(draws.normal((L, N, P), std=1.0 / math.sqrt(L)), m)
    w_uv = fp.round_to(draws.normal((L, N, V), std=1.0 / math.sqrt(L)), m)
    for b in range(B):
        ctx = slens[b] - qlens[b]
        if ctx:
            x = draws.normal((ctx, L + R))
            pos = torch.arange(ctx)
            kv_cache[block_table[b, pos // bs].long().to(dev), (pos % bs).to(dev)] = (
                ref_paged.quantize_fp8(x, case.kv_scale, cdt) if fp8 else budgets.model_values(x, cdt))
    return {
        "q_nope": q_nope.to(dt), "q_pe": q_pe.to(dt),  # exact: model-dtype values
        "kv_c": new_lat[:, :L].contiguous().to(dt), "k_pe": new_lat[:, L:].contiguous().to(dt),
        "kv_cache": kv_cache, "w_uk": w_uk.to(dt), "w_uv": w_uv.to(dt),
        "block_table": block_table,
        "query_start_loc": query_start_loc(qlens),
        "seq_lens": torch.tensor(slens, dtype=torch.int32),
        "slot_mapping": new_token_slots(block_table, qlens, slens, bs),
    }


# ---- oracle and budgets -------------------------------------------------------------------------

def expected_and_budgets(case, tensors: dict, compute_device="cpu", engine=em.EXACT, keep_device=False) -> dict:
    """Reference outputs (float64, absorbed path over the cache after the write) and the budgets:
    pt variants = {absorbed from the cache, up-projected with the raw new tokens and the context
    chunked like the case} x {K pre-scaled, scores scaled} x {normalised before P.V, after}, each
    against the float64 result of its own pipeline with the projections written in the model dtype
    (ql and o_lat; the up-projected K and V): every implementation attends over those, so their
    rounding is the pipeline's, not noise one pt realisation may or may not show.
    ``keep_device``: leave the results on ``compute_device`` (the live tiers) instead of the CPU.
    """
    dev = torch.device(compute_device)
    t = budgets.oracle_inputs(tensors, dev)
    cache = t["kv_cache"].clone()
    ref_mla.write_latent(t["kv_c"], t["k_pe"], cache, t["slot_mapping"], case.kv_scale)
    batch = (t["q_nope"], t["q_pe"], cache, t["w_uk"], t["w_uv"], t["block_table"], t["query_start_loc"],
             t["seq_lens"])
    common = dict(scale=case.softmax_scale, kv_scale=case.kv_scale, engine=engine)
    live = dict(block_m=None if engine is em.EXACT else LIVE_BLOCK_M)
    ref_out, ref_lse, sensitivity = em.paged_mla(*batch, **common, **live, path="absorbed",
                                                 with_lse_sensitivity=True)
    absorbed = dict(path="absorbed", **live)
    prefill = dict(path="upprojected", new_kv_c=t["kv_c"], new_k_pe=t["k_pe"],
                   context_chunk_tokens=case.context_chunk_tokens)
    if case.context_chunk_tokens is None:
        prefill.update(live)
    model_projections = dict(projections=case.torch_dtype)
    chain = dict(partials=case.torch_dtype) if case.context_chunk_tokens is not None else {}
    exact = [em.paged_mla(*batch, **common, **absorbed, **model_projections),
             em.paged_mla(*batch, **common, **prefill, **model_projections, **chain)]
    variants = []
    for extra, exact_of_path in zip((absorbed, prefill), exact):
        for prescale, normalise in itertools.product(em.PRESCALES, em.NORMALISES):
            pt = em.paged_mla(*batch, **common, **extra, dtype=case.torch_dtype, prescale=prescale,
                              normalise=normalise)
            variants.append((*pt, *exact_of_path[:2]))
    out = budgets.assemble((ref_out, ref_lse), variants, exact,
                           budgets.lse_step(sensitivity, case.torch_dtype),
                           case.torch_dtype, fixed_order=engine is em.EXACT)
    L, R = case.kv_lora_rank, case.rope_dim
    out.update({
        "expected.output": budgets.to_float32(ref_out),
        "expected.lse": budgets.to_float32(ref_lse),
        "expected.kv_cache_slots": cache.reshape(-1, L + R)[t["slot_mapping"]].clone(),
    })
    return out if keep_device else {k: v.cpu() for k, v in out.items()}


def build_golden(case) -> dict:
    tensors = build_inputs(case)
    tensors.update(expected_and_budgets(case, tensors))
    return tensors


def build_live(case, device) -> dict:
    """Live tiers (large, sweep): inputs from the case seed drawn on ``device`` (CounterDraws: the
    same bits on any device), oracle and budgets on ``device`` with the FAST engine (never stored)."""
    tensors = build_inputs(case, CounterDraws(case.seed, device))
    tensors.update(expected_and_budgets(case, tensors, compute_device=device, engine=em.FAST, keep_device=True))
    return tensors  # values stay on ``device``: each backend's copies and the comparison are made there


def batch_from_tensors(case, tensors: dict, device) -> MLABatch:
    dev = torch.device(device)
    g = {k: v.to(dev) for k, v in tensors.items() if not k.startswith(("expected.", "budget."))}
    return MLABatch(
        q_nope=g["q_nope"], q_pe=g["q_pe"], kv_c=g["kv_c"], k_pe=g["k_pe"],
        kv_cache=g["kv_cache"].clone(), w_uk=g["w_uk"], w_uv=g["w_uv"],
        block_table=g["block_table"], query_start_loc=g["query_start_loc"], seq_lens=g["seq_lens"],
        slot_mapping=g["slot_mapping"], scale=case.softmax_scale, kv_cache_dtype=case.kv_cache_dtype,
        kv_scale=case.kv_scale, context_chunk_tokens=case.context_chunk_tokens,
    )


def rule_factors(case) -> dict:
    """DESIGN.md: k = 2 (4 with fp8); mean 1.5 (3 with fp8)."""
    if case.kv_cache_dtype != "auto":
        return {"k_row": 4.0, "k_mean": 3.0}
    return {"k_row": 2.0, "k_mean": 1.5}


def locate_row(case, tensors: dict, token: int) -> dict:
    """Sequence, position and the latent-cache blocks a query row sees (MLA is causal)."""
    return locate_token(tensors, token, case.block_size)
