"""The case catalogue: declarative data, one row per case (OpInfo style).

A case says *what* to test (batch shape, heads, head size, block size, dtype, knobs, seed);
`attncheck.mha_case` turns it into deterministic inputs, the float64 reference outputs and
the error budgets. Tiers: ``smoke`` (CPU CI through the Triton interpreter: small shapes),
``full`` (GPU: stored goldens of medium size), ``large`` (GPU: generated from the recorded
seed and checked against a streaming float64 reference on the GPU, never stored).

Every case poisons unused cache slots, spare blocks and block-table padding with NaN, so a
kernel that reads past a sequence's keys is caught.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch

TIERS = ("smoke", "full", "large")
STORED_TIERS = ("smoke", "full")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class CaseRecord:
    """What every case kind shares: its torch dtype and its flat parameters (the manifest
    records them; capabilities are checked against them)."""

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def params(self) -> dict:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        d["torch_dtype"] = self.torch_dtype
        return d

    def manifest_params(self) -> dict:
        d = self.params()
        d.pop("torch_dtype")
        return d


@dataclass(frozen=True)
class MHACase(CaseRecord):
    name: str
    seq_lens: tuple  # total keys per sequence (context + new)
    query_lens: tuple  # new tokens per sequence
    num_heads: int = 8
    num_kv_heads: int = 2
    head_size: int = 64
    block_size: int = 16
    dtype: str = "bf16"
    kv_cache_dtype: str = "auto"
    k_scale: float = 1.0
    v_scale: float = 1.0
    causal: bool = True
    sliding_window: Optional[int] = None
    softcap: Optional[float] = None
    alibi: bool = False
    sinks: bool = False
    scale: Optional[float] = None
    seed: int = 0
    tier: str = "smoke"
    family: str = ""
    context_chunk_tokens: Optional[int] = None
    unordered: bool = False
    query_std: float = 1.0  # softcap cases raise it so the cap really bends the scores
    kind: str = field(default="MHA", init=False)

    def __post_init__(self):
        if len(self.seq_lens) != len(self.query_lens):
            raise ValueError(f"case {self.name}: seq_lens and query_lens differ in length")
        for s, q in zip(self.seq_lens, self.query_lens):
            if q < 1 or s < q:
                raise ValueError(f"case {self.name}: need 1 <= query_len <= seq_len, got q={q} s={s}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"case {self.name}: num_kv_heads must divide num_heads")
        if self.dtype not in DTYPES:
            raise ValueError(f"case {self.name}: dtype must be one of {sorted(DTYPES)}")
        if self.tier not in TIERS:
            raise ValueError(f"case {self.name}: tier must be one of {TIERS}")

    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else self.head_size ** -0.5

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)


@dataclass(frozen=True)
class MergeCase(CaseRecord):
    """Inputs for ``merge_attn_states``: two partial results with LSE [H, T] in a pattern."""

    name: str
    num_tokens: int
    num_heads: int
    head_size: int
    dtype: str = "fp32"
    # which LSE entries are infinite: "finite", "prefix_neg_inf", "suffix_neg_inf",
    # "both_neg_inf", "prefix_pos_inf", "suffix_pos_inf", "pos_and_neg_inf", "mixed"
    lse_pattern: str = "finite"
    seed: int = 0
    tier: str = "smoke"
    family: str = "merge"
    kind: str = field(default="MERGE", init=False)



C = MHACase  # short alias for the table below

# fp8 scales are != 1 and chosen so that fp8 values times the scale are exact in fp16/bf16
# (3/4 and 5/4 add at most 3 significant bits): new tokens then round-trip through the
# quantised cache, and every backend sees the same keys whether it attends to the new K/V
# before or after quantisation.
K8, V8 = 0.75, 1.25

MHA_CASES = [
    # ---- smoke: batch shapes -------------------------------------------------------------
    C("decode-h8x2-d64-bs16-bf16", (1, 15, 17, 113), (1, 1, 1, 1), family="decode"),
    C("prefill-h8x2-d64-bs16-bf16", (15, 16, 17, 40), (15, 16, 17, 40), family="prefill", seed=1),
    C("mixed-h8x2-d64-bs16-bf16", (17, 33, 40, 113, 9, 24), (1, 1, 5, 31, 9, 24), family="mixed", seed=2),
    C("mixed-h32x8-d128-bs16-fp16", (40, 30, 12), (1, 6, 12), num_heads=32, num_kv_heads=8,
      head_size=128, dtype="fp16", family="mixed", seed=3),
    C("mixed-h8x8-d64-bs16-fp32", (20, 30, 12), (1, 6, 12), num_heads=8, num_kv_heads=8,
      dtype="fp32", family="mixed", seed=4),
    C("mixed-h5x1-d80-bs16-bf16", (31, 70, 12), (1, 9, 12), num_heads=5, num_kv_heads=1,
      head_size=80, family="heads", seed=5),
    C("mixed-h8x1-d96-bs16-fp16", (18, 51, 33), (1, 6, 33), num_heads=8, num_kv_heads=1,
      head_size=96, dtype="fp16", family="heads", seed=6),
    C("mixed-h8x2-d256-bs16-bf16", (21, 40), (1, 7), head_size=256, family="heads", seed=7),
    C("decode-h5x1-d64-bs16-bf16-long4099", (4099, 333), (1, 1), num_heads=5, num_kv_heads=1,
      family="decode", seed=8),
    # ---- smoke: block sizes --------------------------------------------------------------
    C("mixed-h8x2-d64-bs32-bf16", (31, 33, 65, 20), (1, 1, 10, 20), block_size=32, family="block_size", seed=9),
    C("mixed-h8x2-d64-bs64-fp16", (63, 65, 130), (1, 4, 130), block_size=64, dtype="fp16",
      family="block_size", seed=10),
    C("mixed-h8x1-d64-bs544-bf16", (545, 600, 30), (1, 9, 30), num_kv_heads=1, block_size=544, family="block_size", seed=11),
    # ---- smoke: knobs --------------------------------------------------------------------
    C("mixed-h8x2-d64-bs16-bf16-window24", (113, 60, 40, 30), (1, 1, 17, 30), sliding_window=24,
      family="sliding_window", seed=12),
    C("decode-h8x2-d128-bs16-fp16-window7", (64, 9, 33), (1, 1, 1), head_size=128, dtype="fp16",
      sliding_window=7, family="sliding_window", seed=13),
    C("mixed-h8x2-d64-bs16-bf16-softcap50", (40, 70, 25), (1, 12, 25), softcap=50.0, query_std=8.0,
      family="softcap", seed=14),
    C("mixed-h8x2-d64-bs16-fp16-alibi", (45, 70, 25), (1, 12, 25), alibi=True, dtype="fp16",
      family="alibi", seed=15),
    C("mixed-h8x2-d64-bs16-bf16-sinks", (45, 70, 25), (1, 12, 25), sinks=True, family="sinks", seed=16),
    C("specdecode-h8x2-d64-bs16-bf16-sinks-q4", (40, 67, 90), (4, 4, 4), sinks=True,
      family="sinks", seed=17),
    C("mixed-h8x1-d64-bs16-fp16-noncausal", (24, 40), (24, 40), num_kv_heads=1, dtype="fp16",
      causal=False, family="non_causal", seed=18),
    # ---- smoke: fp8 KV cache --------------------------------------------------------------
    C("mixed-h8x2-d64-bs16-bf16-fp8e4m3fn", (41, 80, 30), (1, 11, 30), kv_cache_dtype="fp8_e4m3fn",
      k_scale=K8, v_scale=V8, family="fp8", seed=19),
    C("mixed-h8x2-d64-bs16-fp16-fp8e4m3fnuz", (41, 80, 30), (1, 11, 30), kv_cache_dtype="fp8_e4m3fnuz",
      dtype="fp16", k_scale=K8, v_scale=V8, family="fp8", seed=20),
    C("decode-h32x8-d128-bs16-bf16-fp8e4m3fn", (17, 100, 160), (1, 1, 1), num_heads=32, num_kv_heads=8,
      head_size=128, kv_cache_dtype="fp8_e4m3fn", k_scale=K8, v_scale=V8, family="fp8", seed=21),
    # ---- smoke: chunked context (pipelines that chunk the context honour the override) ------
    C("extend-h8x2-d64-bs16-bf16-chunks1", (60, 90), (12, 20), context_chunk_tokens=4096,
      family="chunked", seed=22),
    C("extend-h8x2-d64-bs16-bf16-chunks2", (60, 90), (12, 20), context_chunk_tokens=40,
      family="chunked", seed=23),
    # a zero-context prefill beside a many-chunk extend: the merge sees -inf on both sides
    C("mixed-h8x2-d64-bs16-fp16-chunksmany", (1, 120, 25), (1, 9, 25), dtype="fp16",
      context_chunk_tokens=13, family="chunked", seed=24),
    C("extend-h8x2-d64-bs16-bf16-fp8e4m3fn-chunks3", (70, 45), (6, 5), kv_cache_dtype="fp8_e4m3fn",
      k_scale=K8, v_scale=V8, context_chunk_tokens=24, family="chunked", seed=25),
    # ---- smoke: order ----------------------------------------------------------------------
    C("unordered-h8x2-d64-bs16-bf16", (30, 50, 40), (30, 1, 8), unordered=True, family="order", seed=26),

    # ---- full (GPU, stored): medium shapes for the compiled kernels' real tile sizes; the smoke
    # rows run on the GPU too, so not every knob is repeated here (goldens stay under 40 MB) ----
    C("full-decode-h32x8-d128-bs16-bf16", (150, 64, 17, 1), (1, 1, 1, 1), num_heads=32,
      num_kv_heads=8, head_size=128, tier="full", family="decode", seed=100),
    C("full-mixed-h32x8-d128-bs16-bf16", (120, 64, 32, 16), (1, 1, 8, 16), num_heads=32, num_kv_heads=8,
      head_size=128, tier="full", family="mixed", seed=101),
    C("full-prefill-h8x2-d128-bs16-fp16", (100, 50), (100, 50), head_size=128, dtype="fp16",
      tier="full", family="prefill", seed=102),
    C("full-decode-h8x1-d64-bs16-bf16-long4099", (4099, 65), (1, 1), num_kv_heads=1, tier="full",
      family="decode", seed=103),
    C("full-mixed-h8x2-d96-bs32-fp16", (150, 80, 40), (1, 8, 40), head_size=96, block_size=32,
      dtype="fp16", tier="full", family="heads", seed=104),
    C("full-mixed-h8x2-d256-bs64-bf16", (150, 70), (1, 20), head_size=256, block_size=64, tier="full",
      family="heads", seed=105),
    C("full-mixed-h8x1-d128-bs544-bf16", (545, 30), (1, 30), num_kv_heads=1, head_size=128, block_size=544,
      tier="full", family="block_size", seed=106),
    C("full-mixed-h8x2-d128-bs16-bf16-window128", (300, 150, 100), (1, 1, 40), head_size=128,
      sliding_window=128, tier="full", family="sliding_window", seed=107),
    C("full-mixed-h8x2-d128-bs16-bf16-softcap50", (300, 120), (1, 32), head_size=128, softcap=50.0,
      query_std=8.0, tier="full", family="softcap", seed=108),
    C("full-mixed-h32x8-d128-bs16-bf16-fp8e4m3fn", (200, 80, 24), (1, 8, 16), num_heads=32,
      num_kv_heads=8, head_size=128, kv_cache_dtype="fp8_e4m3fn", k_scale=K8, v_scale=V8, tier="full",
      family="fp8", seed=111),
    C("full-extend-h8x2-d128-bs16-bf16-chunksmany", (1, 400, 200), (1, 20, 12), head_size=128,
      context_chunk_tokens=100, tier="full", family="chunked", seed=112),
    C("full-mixed-h8x2-d128-bs16-fp32", (120, 64), (1, 32), head_size=128, dtype="fp32",
      tier="full", family="mixed", seed=113),

    # ---- large (GPU, generated live; never stored) -------------------------------------------
    C("large-extend-h32x8-d128-bs16-bf16-3616over20000", (23616,), (3616,), num_heads=32, num_kv_heads=8,
      head_size=128, tier="large", family="extend", seed=1000),
    C("large-decode-h32x8-d128-bs16-bf16-b16x8192", (8192,) * 16, (1,) * 16, num_heads=32, num_kv_heads=8,
      head_size=128, tier="large", family="decode", seed=1001),
]

M = MergeCase
MERGE_CASES = [
    M("merge-finite-fp32-h4-d64", 37, 4, 64, "fp32", "finite", seed=200),
    M("merge-prefix-neginf-bf16-h8-d128", 29, 8, 128, "bf16", "prefix_neg_inf", seed=201),
    M("merge-suffix-neginf-fp16-h8-d80", 29, 8, 80, "fp16", "suffix_neg_inf", seed=202),
    M("merge-both-neginf-fp32-h4-d64", 23, 4, 64, "fp32", "both_neg_inf", seed=203),
    M("merge-prefix-posinf-bf16-h4-d64", 23, 4, 64, "bf16", "prefix_pos_inf", seed=204),
    M("merge-suffix-posinf-fp16-h4-d96", 23, 4, 96, "fp16", "suffix_pos_inf", seed=205),
    M("merge-pos-and-neginf-fp32-h4-d64", 23, 4, 64, "fp32", "pos_and_neg_inf", seed=206),
    M("merge-mixed-bf16-h8-d256", 21, 8, 256, "bf16", "mixed", seed=207),
]


def all_cases() -> list:
    """MHA and merge rows, plus MLA rows when the MLA catalogue is present."""
    rows = list(MHA_CASES) + list(MERGE_CASES)
    try:
        from attncheck import mla_case
    except ImportError:
        mla_case = None
    if mla_case is not None and hasattr(mla_case, "MLA_CASES"):
        rows += list(mla_case.MLA_CASES)
    names = [c.name for c in rows]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"duplicate case names in the catalogue: {sorted(dup)}")
    return rows


def get_case(name: str):
    for c in all_cases():
        if c.name == name:
            return c
    close = __import__("difflib").get_close_matches(name, [c.name for c in all_cases()], n=3)
    raise KeyError(f"unknown case {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))


def select_cases(tier=None, kind=None, family=None) -> list:
    rows = all_cases()
    if tier is not None:
        if tier not in TIERS:
            raise ValueError(f"unknown tier {tier!r}: expected one of {', '.join(TIERS)}")
        rows = [c for c in rows if c.tier == tier]
    if kind is not None:
        rows = [c for c in rows if c.kind == kind]
    if family is not None:
        rows = [c for c in rows if c.family == family]
    return sorted(rows, key=lambda c: c.name)
