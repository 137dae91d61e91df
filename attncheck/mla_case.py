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
from dataclasses import dataclass, field
from typing import Optional

import torch

from attncheck.cases import DTYPES, TIERS, CaseRecord
from attncheck.rule import locate_token, rounding_step_rows
from impl.batch import FP8_DTYPES, MLABatch
from reference import mla as ref_mla
from reference import paged as ref_paged

KIND = "MLA"
CACHE_FIELDS = (("kv_cache", "expected.kv_cache_slots"),)
SPARE_BLOCKS = 1  # an unused, NaN-filled block; block-table padding points at it
DEEPSEEK_ROPE_FACTOR = 40.0  # DeepSeek-V3 rope_scaling factor (mscale_all_dim 1.0)


@dataclass(frozen=True)
class MLACase(CaseRecord):
    name: str
    seq_lens: tuple  # total keys per sequence (context + new)
    query_lens: tuple  # new tokens per sequence
    num_heads: int = 16  # per rank: DeepSeek-V3 has 128 (TP1), 16 (TP8), 8 (TP16)
    kv_lora_rank: int = 512
    rope_dim: int = 64
    nope_dim: int = 128
    v_dim: int = 128
    block_size: int = 16
    dtype: str = "bf16"
    kv_cache_dtype: str = "auto"
    kv_scale: float = 1.0
    rope_factor: Optional[float] = DEEPSEEK_ROPE_FACTOR  # YaRN factor entering the scale (None: plain)
    scale: Optional[float] = None  # explicit override of the layer scale
    seed: int = 0
    tier: str = "smoke"
    family: str = ""
    context_chunk_tokens: Optional[int] = None
    unordered: bool = False
    kind: str = field(default="MLA", init=False)

    def __post_init__(self):
        if len(self.seq_lens) != len(self.query_lens):
            raise ValueError(f"case {self.name}: seq_lens and query_lens differ in length")
        for s, q in zip(self.seq_lens, self.query_lens):
            if q < 1 or s < q:
                raise ValueError(f"case {self.name}: need 1 <= query_len <= seq_len, got q={q} s={s}")
        if self.dtype not in DTYPES:
            raise ValueError(f"case {self.name}: dtype must be one of {sorted(DTYPES)}")
        if self.tier not in TIERS:
            raise ValueError(f"case {self.name}: tier must be one of {TIERS}")
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in FP8_DTYPES:
            raise ValueError(f"case {self.name}: kv_cache_dtype must be 'auto' or one of {sorted(FP8_DTYPES)}")

    @property
    def qk_head_dim(self) -> int:
        return self.nope_dim + self.rope_dim

    @property
    def softmax_scale(self) -> float:
        if self.scale is not None:
            return self.scale
        return ref_mla.softmax_scale(self.qk_head_dim, self.rope_factor)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    def params(self) -> dict:
        d = super().params()
        d["head_size"] = self.kv_lora_rank + self.rope_dim  # the latent cache entry (576)
        d["causal"] = True
        d["softmax_scale"] = self.softmax_scale
        return d


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


# ---- catalogue ----------------------------------------------------------------------------------

C = MLACase
# "mini" latent dims keep the CPU-interpreter smoke tier and its goldens small while keeping
# DeepSeek's structure (qk = nope + rope = 128 = v + rope, powers of two as AITER's mha needs).
MINI = dict(kv_lora_rank=128, rope_dim=64, nope_dim=64, v_dim=64)
KV8 = 0.75  # fp8 latents times 3/4 are exact in bf16/fp16 (at most 6 significant bits)

MLA_CASES = [
    # ---- smoke (CPU interpreter): DeepSeek-V3 dims at TP16 (8 heads per rank) ------------------
    C("mla-mixed-h8-bs16-bf16", (20, 30, 12), (1, 5, 12), num_heads=8, family="mixed", seed=300),
    C("mla-mixed-h8-mini-bs16-bf16-fp8e4m3fn", (40, 33, 10), (1, 6, 10), num_heads=8,
      kv_cache_dtype="fp8_e4m3fn", kv_scale=KV8, family="fp8", seed=301, **MINI),
    # ---- smoke: mini dims -------------------------------------------------------------------------
    C("mla-decode-h16-mini-bs16-bf16", (1, 17, 40, 70), (1, 1, 1, 1), num_heads=16, family="decode",
      seed=302, **MINI),
    C("mla-prefill-h8-mini-bs16-fp16", (9, 20), (9, 20), num_heads=8, dtype="fp16", family="prefill",
      seed=303, **MINI),
    C("mla-mixed-h8-mini-bs64-bf16", (70, 65, 12), (1, 5, 12), num_heads=8, block_size=64,
      family="block_size", seed=304, **MINI),
    C("mla-mixed-h8-mini-bs1-bf16", (20, 30, 9), (1, 6, 9), num_heads=8, block_size=1,
      family="block_size", seed=305, **MINI),
    # a zero-context prefill next to a three-chunk extend: the context merge sees -inf on both sides
    C("mla-extend-h8-mini-bs16-fp16-chunks3", (50, 41, 9), (6, 5, 9), num_heads=8, dtype="fp16",
      context_chunk_tokens=16, family="chunked", seed=306, **MINI),
    C("mla-specdecode-h16-mini-bs16-bf16-q4", (30, 45, 19), (4, 4, 4), num_heads=16,
      family="spec_decode", seed=307, **MINI),
    C("mla-mixed-h8-mini-bs16-fp16-fp8e4m3fnuz", (40, 33, 10), (1, 6, 10), num_heads=8, dtype="fp16",
      kv_cache_dtype="fp8_e4m3fnuz", kv_scale=KV8, family="fp8", seed=308, **MINI),
    C("mla-mixed-h8-mini-bs16-bf16-noyarn", (26, 12), (1, 12), num_heads=8, rope_factor=None,
      family="scale", seed=309, **MINI),
    C("mla-unordered-h8-mini-bs16-bf16", (20, 30, 25), (20, 1, 5), num_heads=8, unordered=True,
      family="order", seed=310, **MINI),

    # ---- full (GPU, stored): DeepSeek-V3 dims where the weights fit the 40 MB golden budget
    # (2 MB of W_UK/W_UV per 8-head case), mini dims otherwise; the large tier is all DeepSeek dims
    C("full-mla-mixed-h8-bs64-fp16", (257, 100, 32), (1, 1, 32), num_heads=8, block_size=64,
      dtype="fp16", tier="full", family="mixed", seed=400),
    C("full-mla-specdecode-h8-mini-bs16-bf16-q8", (150, 77, 200), (8, 8, 8), num_heads=8, tier="full", **MINI,
      family="spec_decode", seed=401),
    C("full-mla-extend-h8-bs16-bf16-fp8e4m3fn-chunks", (1, 500, 260), (1, 20, 12), num_heads=8,
      kv_cache_dtype="fp8_e4m3fn", kv_scale=KV8, context_chunk_tokens=128, tier="full",
      family="chunked", seed=402),
    C("full-mla-decode-h8-mini-bs1-bf16", (257, 300, 33), (1, 1, 1), num_heads=8, block_size=1, tier="full", **MINI,
      family="block_size", seed=403),

    # ---- large (GPU, generated live from the seed; never stored) --------------------------------
    C("large-mla-extend-h16-bs16-bf16-3616over20000", (23616,), (3616,), num_heads=16, tier="large",
      family="extend", seed=1100),
    C("large-mla-decode-h128-bs16-bf16-b16x4096", (4096,) * 16, (1,) * 16, num_heads=128, tier="large",
      family="decode", seed=1101),
    C("large-mla-mixed-h128-bs64-fp16", (2048, 1500, 600, 300), (1, 1, 64, 300), num_heads=128,
      block_size=64, dtype="fp16", tier="large", family="mixed", seed=1102),
    C("large-mla-decode-h16-bs16-bf16-b64x4096", (4096,) * 64, (1,) * 64, num_heads=16, tier="large",
      family="decode", seed=1103),
]
