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
* budgets: a backend may run any row down either MLA path (ROCM_AITER_MLA decodes spec-decode
  rows through the absorbed kernel, TRITON_MLA prefills them up-projected), so each row's budget
  is the **larger** of the two low-precision "pt" paths' errors against the float64 reference:
  the absorbed path (all keys from the cache) and the up-projected path (new tokens from the raw
  ``kv_c``/``k_pe`` as vLLM's prefill does, context from the dequantised cache, chunked like the
  case). ``budget.pt_err_mean`` is the larger of the two mean errors.

Scale: the layer scale ``(P + R) ** -0.5 * mscale(rope_factor) ** 2`` (DeepSeek-V3: YaRN factor
40), never derived from the 576-wide cache entry. Weights are scaled by ``1/sqrt(L)`` (as vLLM's
MLA test does) so the up-projected keys and values are O(1).

fp8 latent caches: the new tokens' latents are fp8 numbers times ``kv_scale`` (exact in bf16/fp16),
so quantising them is lossless and a pipeline that attends to the raw new tokens (prefill) sees the
same keys as one reading the cache (decode).
"""

from __future__ import annotations

import math

import torch

from attncheck.rule import locate_token, rounding_step_rows
from impl.batch import FP8_DTYPES, MLABatch
from reference import mla as ref_mla
from reference import paged as ref_paged

CACHE_FIELDS = (("kv_cache", "expected.kv_cache_slots"),)
SPARE_BLOCKS = 1  # an unused, NaN-filled block; block-table padding points at it


# ---- inputs -----------------------------------------------------------------------------------

def _cache_dtype(case) -> torch.dtype:
    return FP8_DTYPES[case.kv_cache_dtype] if case.kv_cache_dtype != "auto" else case.torch_dtype


def _latents(g, n: int, case):
    """Random latents [n, L + R]: (model-dtype tensor, cache-dtype tensor); lossless for fp8."""
    x = torch.randn((n, case.kv_lora_rank + case.rope_dim), generator=g, dtype=torch.float32)
    if case.kv_cache_dtype == "auto":
        xm = x.to(case.torch_dtype)
        return xm, xm
    f8 = FP8_DTYPES[case.kv_cache_dtype]
    q8 = ref_paged.quantize_fp8(x, case.kv_scale, f8)
    xm = (q8.to(torch.float32) * case.kv_scale).to(case.torch_dtype)
    if not torch.equal(ref_paged.quantize_fp8(xm, case.kv_scale, f8).view(torch.uint8), q8.view(torch.uint8)):
        raise AssertionError(f"case {case.name}: fp8 latents do not round-trip exactly; pick another kv_scale")
    return xm, q8


def _cumsum(xs):
    out, s = [], 0
    for x in xs:
        s += x
        out.append(s)
    return out


def build_inputs(case) -> dict:
    g = torch.Generator().manual_seed(case.seed)
    dt = case.torch_dtype
    B, bs = len(case.seq_lens), case.block_size
    N, L, R, P, V = case.num_heads, case.kv_lora_rank, case.rope_dim, case.nope_dim, case.v_dim
    blocks_per_seq = [-(-s // bs) for s in case.seq_lens]
    num_blocks = sum(blocks_per_seq) + SPARE_BLOCKS
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
    poison_block = int(perm[-1])
    block_table = torch.full((B, max(blocks_per_seq) + 1), poison_block, dtype=torch.int32)
    cursor = 0
    for b, n in enumerate(blocks_per_seq):
        block_table[b, :n] = perm[cursor:cursor + n]
        cursor += n
    kv_cache = torch.full((num_blocks, bs, L + R), float("nan"), dtype=torch.float32).to(_cache_dtype(case))

    qlens, slens = list(case.query_lens), list(case.seq_lens)
    T = sum(qlens)
    q_nope = torch.randn((T, N, P), generator=g).to(dt)
    q_pe = torch.randn((T, N, R), generator=g).to(dt)
    new_lat, _ = _latents(g, T, case)
    w_uk = (torch.randn((L, N, P), generator=g) / math.sqrt(L)).to(dt)
    w_uv = (torch.randn((L, N, V), generator=g) / math.sqrt(L)).to(dt)
    slot_mapping = torch.empty(T, dtype=torch.int64)
    flat = kv_cache.view(-1, L + R)
    t0 = 0
    for b in range(B):
        ctx = slens[b] - qlens[b]
        if ctx:
            _, lc = _latents(g, ctx, case)
            pos = torch.arange(ctx)
            flat[block_table[b, pos // bs].long() * bs + pos % bs] = lc
        for i in range(qlens[b]):
            p = ctx + i
            slot_mapping[t0 + i] = int(block_table[b, p // bs]) * bs + p % bs
        t0 += qlens[b]
    return {
        "q_nope": q_nope, "q_pe": q_pe,
        "kv_c": new_lat[:, :L].contiguous(), "k_pe": new_lat[:, L:].contiguous(),
        "kv_cache": kv_cache, "w_uk": w_uk, "w_uv": w_uv,
        "block_table": block_table,
        "query_start_loc": torch.tensor([0] + _cumsum(qlens), dtype=torch.int32),
        "seq_lens": torch.tensor(slens, dtype=torch.int32), "slot_mapping": slot_mapping,
    }


# ---- oracle and budgets -------------------------------------------------------------------------

def _masked_err(pt: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (pt.to(torch.float64) - ref).abs()


def _lse_err(pt_lse: torch.Tensor, ref_lse: torch.Tensor) -> torch.Tensor:
    pt = pt_lse.to(torch.float64)
    err = (pt - ref_lse).abs()
    return torch.where(torch.isinf(ref_lse) & (pt == ref_lse), torch.zeros_like(err), err)


def expected_and_budgets(case, tensors: dict, compute_device="cpu", streaming=False) -> dict:
    """Reference outputs (float64) and the low-precision budgets (max over both MLA paths).

    ``streaming`` is accepted for the harness's signature: reference.mla always walks query
    blocks, so its memory stays bounded for long contexts.
    """
    del streaming
    dev = torch.device(compute_device)
    t = {k: v.to(dev) for k, v in tensors.items()}
    cache = t["kv_cache"].clone()
    ref_mla.write_latent(t["kv_c"], t["k_pe"], cache, t["slot_mapping"], case.kv_scale)
    common = (t["block_table"], t["query_start_loc"], t["seq_lens"])
    scale = case.softmax_scale
    ref_out, ref_lse = ref_mla.paged_mla(t["q_nope"], t["q_pe"], cache, t["w_uk"], t["w_uv"], *common,
                                         scale=scale, kv_scale=case.kv_scale, path="auto",
                                         compute_dtype=torch.float64)
    dt = case.torch_dtype
    pt_abs, lse_abs = ref_mla.paged_mla(t["q_nope"], t["q_pe"], cache, t["w_uk"], t["w_uv"], *common,
                                        scale=scale, kv_scale=case.kv_scale, path="absorbed",
                                        compute_dtype=dt, lowp=True)
    pt_up, lse_up = ref_mla.paged_mla(t["q_nope"], t["q_pe"], cache, t["w_uk"], t["w_uv"], *common,
                                      scale=scale, kv_scale=case.kv_scale, path="upprojected",
                                      compute_dtype=dt, lowp=True, new_kv_c=t["kv_c"], new_k_pe=t["k_pe"],
                                      context_chunk_tokens=case.context_chunk_tokens)
    e_abs, e_up = _masked_err(pt_abs, ref_out), _masked_err(pt_up, ref_out)
    L, R = case.kv_lora_rank, case.rope_dim
    out = {
        "expected.output": ref_out.to(torch.float32),
        "expected.lse": ref_lse.to(torch.float32),
        "expected.kv_cache_slots": cache.reshape(-1, L + R)[t["slot_mapping"]].clone(),
        "budget.pt_err_row": torch.maximum(e_abs.amax(-1), e_up.amax(-1)).to(torch.float32),
        "budget.round_row": rounding_step_rows(ref_out, dt).to(torch.float32),
        "budget.lse_pt_err": torch.maximum(_lse_err(lse_abs, ref_lse), _lse_err(lse_up, ref_lse)).to(torch.float32),
        "budget.pt_err_mean": torch.maximum(e_abs.mean(), e_up.mean()).to(torch.float32).reshape(()),
    }
    return {k: v.cpu() for k, v in out.items()}


def build_golden(case) -> dict:
    tensors = build_inputs(case)
    tensors.update(expected_and_budgets(case, tensors))
    return tensors


def build_live(case, device) -> dict:
    """Large tier: inputs from the case seed on the CPU (deterministic), oracle on ``device``."""
    tensors = build_inputs(case)
    tensors.update(expected_and_budgets(case, tensors, compute_device=device))
    return tensors


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
