"""The case catalogue: declarative data, one row per case (OpInfo style).

A case says *what* to test (batch shape, heads, head size, block size, dtype, knobs, seed);
its kind's ``generator`` module (``attncheck.mha_case``, ``attncheck.mla_case``,
``attncheck.merge_case``) turns it into deterministic inputs, the float64 reference outputs
and the error budgets. Tiers: ``smoke`` (CPU CI through the Triton interpreter: small
shapes), ``full`` (GPU: stored goldens of medium size), ``large`` (GPU: generated from the
recorded seed and checked against a streaming float64 reference on the GPU, never stored),
``sweep`` (configurations drawn from a seed by ``attncheck.sweep``, named ``sweep:S:I``, not
rows of this table; checked live like the large tier).

A case's name is derived from its fields (``derived_name``), so a name cannot claim a head
count, head size, block size, dtype or knob that the case does not have; catalogue rows give
no name at all. Ad-hoc cases built by tests may carry any name.

Every case poisons unused cache slots, spare blocks and block-table padding with NaN, so a
kernel that reads past a sequence's keys is caught.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from enum import Enum
from types import ModuleType
from typing import ClassVar, Optional

import torch

from attncheck import merge_case, mha_case, mla_case
from attncheck.draws import seed_from_name
from attncheck.options import TIERS  # one list, importable without torch (the pytest plugin)
from impl.backend import CaseParams
from impl.batch import FP8_DTYPES, classify_rows
from reference import mla as ref_mla

STORED_TIERS = ("smoke", "full")
LIVE_TIERS = ("large", "sweep")  # inputs from the seed, oracle built on the device at run time (never stored)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class Family(str, Enum):
    """What a case is about (the catalogue's grouping; ``--family`` selects by it)."""

    DECODE = "decode"
    PREFILL = "prefill"
    EXTEND = "extend"
    MIXED = "mixed"
    SPEC_DECODE = "spec_decode"
    HEADS = "heads"
    BLOCK_SIZE = "block_size"
    SLIDING_WINDOW = "sliding_window"
    SOFTCAP = "softcap"
    ALIBI = "alibi"
    SINKS = "sinks"
    NON_CAUSAL = "non_causal"
    SCALE = "scale"
    FP8 = "fp8"
    CHUNKED = "chunked"
    ORDER = "order"
    MERGE = "merge"
    ADHOC = "adhoc"  # cases built by tests outside the catalogue

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def parse(cls, value) -> "Family":
        """A Family from its value; an unknown one is a ValueError listing the valid ones."""
        try:
            return cls(value)
        except ValueError:
            close = difflib.get_close_matches(str(value), [f.value for f in cls], n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"unknown family {value!r}{hint}: expected one of "
                             f"{', '.join(f.value for f in cls)}") from None


# ---- names ----------------------------------------------------------------------------------

def batch_shape(query_lens, seq_lens, unordered: bool = False) -> str:
    """The word a name starts with, from the rows (``impl.batch.classify_rows``): every row a
    decode, a prefill or an extend; ``specdecode`` when every row is an extend with the same
    2..16 query tokens (draft tokens under verification); ``mixed`` otherwise."""
    if unordered:
        return "unordered"
    kinds = set(classify_rows(list(query_lens), list(seq_lens)))
    if kinds == {"decode"}:
        return "decode"
    if kinds == {"prefill"}:
        return "prefill"
    if kinds == {"extend"}:
        q = set(query_lens)
        return "specdecode" if len(q) == 1 and 2 <= min(q) <= 16 and len(query_lens) > 1 else "extend"
    return "mixed"


def _context_chunks(case) -> Optional[str]:
    """``chunksN``: the most context chunks any sequence is split into (None without the knob)."""
    if case.context_chunk_tokens is None:
        return None
    ctx = max(s - q for s, q in zip(case.seq_lens, case.query_lens))
    return f"chunks{max(1, -(-ctx // case.context_chunk_tokens))}"


def _fp8_token(kv_cache_dtype: str) -> Optional[str]:
    return None if kv_cache_dtype == "auto" else kv_cache_dtype.replace("_", "")


def _join(*parts) -> str:
    return "-".join(str(p) for p in parts if p)


class CaseRecord:
    """What every case kind shares: a derived name, its torch dtype, its flat parameters (the
    manifest records them; capabilities are checked against them) and its generator."""

    kind: ClassVar[str]
    generator: ClassVar[ModuleType]  # build_golden / build_live / batch_from_tensors / rule_factors

    def __post_init__(self):
        self._check(self.dtype in DTYPES, f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        self._check(self.tier in TIERS, f"tier must be one of {TIERS}, got {self.tier!r}")
        object.__setattr__(self, "family", Family.parse(self.family))
        self._validate()
        if self.name is None:
            object.__setattr__(self, "name", self.derived_name())
        if self.seed is None:
            object.__setattr__(self, "seed", seed_from_name(self.name))

    def _check(self, ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"case {self.name or type(self).__name__ + ' (unnamed)'}: {what}")

    def _validate(self) -> None:
        """Kind-specific checks (run before the name is derived)."""

    def _check_rows(self) -> None:
        self._check(bool(self.seq_lens) and len(self.seq_lens) == len(self.query_lens),
                    f"seq_lens and query_lens must be non-empty and of equal length, got {self.seq_lens} "
                    f"and {self.query_lens}")
        for s, q in zip(self.seq_lens, self.query_lens):
            self._check(1 <= q <= s, f"need 1 <= query_len <= seq_len, got q={q} s={s}")
        self._check(self.kv_cache_dtype == "auto" or self.kv_cache_dtype in FP8_DTYPES,
                    f"kv_cache_dtype must be 'auto' or one of {sorted(FP8_DTYPES)}, got {self.kv_cache_dtype!r}")

    def derived_name(self) -> str:
        raise NotImplementedError

    @property
    def tier_prefix(self) -> str:
        return "" if self.tier == "smoke" else self.tier

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def params(self) -> dict:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        d["kind"] = self.kind
        d["torch_dtype"] = self.torch_dtype
        return d

    def manifest_params(self) -> dict:
        d = self.params()
        d.pop("torch_dtype")
        return d


@dataclass(frozen=True)
class MHACase(CaseRecord):
    name: Optional[str] = None  # None: derived from the fields
    seq_lens: tuple = ()  # total keys per sequence (context + new)
    query_lens: tuple = ()  # new tokens per sequence
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
    scale: Optional[float] = None  # None: 1/sqrt(head_size)
    seed: Optional[int] = None  # None: derived from the name (attncheck.draws.seed_from_name)
    tier: str = "smoke"
    family: Family = Family.ADHOC
    context_chunk_tokens: Optional[int] = None
    unordered: bool = False
    query_std: float = 1.0  # softcap cases raise it so raw scores reach past the cap
    label: str = ""  # free words appended to the name (e.g. "long4099")

    kind: ClassVar[str] = "MHA"
    generator: ClassVar[ModuleType] = mha_case

    def _validate(self) -> None:
        self._check_rows()
        self._check(self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads == 0,
                    f"num_kv_heads {self.num_kv_heads} must divide num_heads {self.num_heads}")

    def derived_name(self) -> str:
        shape = batch_shape(self.query_lens, self.seq_lens, self.unordered)
        return _join(
            self.tier_prefix, shape, f"h{self.num_heads}x{self.num_kv_heads}", f"d{self.head_size}",
            f"bs{self.block_size}", self.dtype,
            self.scale is not None and f"scale{self.scale:g}",
            self.sliding_window and f"window{self.sliding_window}",
            self.softcap and f"softcap{self.softcap:g}",
            self.alibi and "alibi", self.sinks and "sinks", not self.causal and "noncausal",
            _fp8_token(self.kv_cache_dtype), _context_chunks(self),
            shape == "specdecode" and f"q{self.query_lens[0]}", self.label)

    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else self.head_size ** -0.5

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    def typed_params(self) -> CaseParams:
        return CaseParams(kind=self.kind, family=str(self.family), tier=self.tier, dtype=self.dtype,
                          kv_cache_dtype=self.kv_cache_dtype, query_lens=tuple(self.query_lens),
                          seq_lens=tuple(self.seq_lens), num_heads=self.num_heads,
                          num_kv_heads=self.num_kv_heads, head_size=self.head_size,
                          block_size=self.block_size, causal=self.causal, sliding_window=self.sliding_window,
                          softcap=self.softcap, alibi=self.alibi, sinks=self.sinks)


DEEPSEEK_ROPE_FACTOR = 40.0  # DeepSeek-V3 rope_scaling factor (mscale_all_dim 1.0)
DEEPSEEK_V3_MLA_DIMS = dict(kv_lora_rank=512, rope_dim=64, nope_dim=128, v_dim=128)
# Small latent dims keep the CPU-interpreter smoke tier and its goldens small while keeping
# DeepSeek's structure (qk = nope + rope = 128 = v + rope, powers of two as AITER's mha needs).
MLA_MINI_DIMS = dict(kv_lora_rank=128, rope_dim=64, nope_dim=64, v_dim=64)


@dataclass(frozen=True)
class MLACase(CaseRecord):
    """DeepSeek-style MLA (``impl.batch.MLABatch``); the generator is ``attncheck.mla_case``."""

    name: Optional[str] = None  # None: derived from the fields
    seq_lens: tuple = ()  # total keys per sequence (context + new)
    query_lens: tuple = ()  # new tokens per sequence
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
    seed: Optional[int] = None  # None: derived from the name (attncheck.draws.seed_from_name)
    tier: str = "smoke"
    family: Family = Family.ADHOC
    context_chunk_tokens: Optional[int] = None
    unordered: bool = False
    label: str = ""  # free words appended to the name (e.g. "b16x4096")

    kind: ClassVar[str] = "MLA"
    generator: ClassVar[ModuleType] = mla_case

    def _validate(self) -> None:
        self._check_rows()

    def _dims_token(self) -> Optional[str]:
        dims = dict(kv_lora_rank=self.kv_lora_rank, rope_dim=self.rope_dim, nope_dim=self.nope_dim,
                    v_dim=self.v_dim)
        if dims == DEEPSEEK_V3_MLA_DIMS:
            return None
        if dims == MLA_MINI_DIMS:
            return "mini"
        return f"l{self.kv_lora_rank}r{self.rope_dim}p{self.nope_dim}v{self.v_dim}"

    def derived_name(self) -> str:
        shape = batch_shape(self.query_lens, self.seq_lens, self.unordered)
        yarn = None
        if self.rope_factor is None:
            yarn = "noyarn"
        elif self.rope_factor != DEEPSEEK_ROPE_FACTOR:
            yarn = f"yarn{self.rope_factor:g}"
        return _join(
            self.tier_prefix, "mla", shape, f"h{self.num_heads}", self._dims_token(), f"bs{self.block_size}",
            self.dtype, _fp8_token(self.kv_cache_dtype), yarn, self.scale is not None and f"scale{self.scale:g}",
            _context_chunks(self), shape == "specdecode" and f"q{self.query_lens[0]}", self.label)

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

    def typed_params(self) -> CaseParams:
        return CaseParams(kind=self.kind, family=str(self.family), tier=self.tier, dtype=self.dtype,
                          kv_cache_dtype=self.kv_cache_dtype, query_lens=tuple(self.query_lens),
                          seq_lens=tuple(self.seq_lens), num_heads=self.num_heads, num_kv_heads=1,
                          head_size=self.kv_lora_rank + self.rope_dim, block_size=self.block_size)


MERGE_LSE_PATTERNS = ("finite", "prefix_neg_inf", "suffix_neg_inf", "both_neg_inf", "prefix_pos_inf",
                      "suffix_pos_inf", "pos_and_neg_inf", "mixed")


@dataclass(frozen=True)
class MergeCase(CaseRecord):
    """Inputs for ``merge_attn_states``: two partial results with LSE [H, T] in a pattern."""

    name: Optional[str] = None  # None: derived from the fields
    num_tokens: int = 1
    num_heads: int = 1
    head_size: int = 64
    dtype: str = "fp32"
    # which LSE entries are infinite (MERGE_LSE_PATTERNS): "finite", "prefix_neg_inf", ...,
    # "pos_and_neg_inf" (+inf on one side, -inf on the other), "mixed" (random)
    lse_pattern: str = "finite"
    seed: Optional[int] = None  # None: derived from the name (attncheck.draws.seed_from_name)
    tier: str = "smoke"
    family: Family = Family.MERGE

    kind: ClassVar[str] = "MERGE"
    generator: ClassVar[ModuleType] = merge_case

    def _validate(self) -> None:
        self._check(self.lse_pattern in MERGE_LSE_PATTERNS,
                    f"lse_pattern must be one of {MERGE_LSE_PATTERNS}, got {self.lse_pattern!r}")

    def derived_name(self) -> str:
        pattern = self.lse_pattern.replace("_neg_inf", "-neginf").replace("_pos_inf", "-posinf").replace("_", "-")
        return _join(self.tier_prefix, "merge", pattern, self.dtype, f"h{self.num_heads}", f"d{self.head_size}")


CASE_KINDS = (MHACase, MLACase, MergeCase)
KINDS = tuple(k.kind for k in CASE_KINDS)


# ---- the catalogue -----------------------------------------------------------------------------

# fp8 per-tensor scales like a calibrated checkpoint's (amax / 448 for |x| up to ~5-9): a few
# N(0, 1) values and the planted ones (attncheck.mha_case) saturate, and a kernel that ignores
# a scale is off by 50-85x. 3 and 5 times a power of two: fp8 values times the scale (and the
# planted rounding ties) are exact in bf16/fp16.
FP8_KV_SCALES = dict(k_scale=0.75 / 64, v_scale=1.25 / 64)
MLA_FP8_KV_SCALE = 0.75 / 64
GQA_32X8_D128 = dict(num_heads=32, num_kv_heads=8, head_size=128)  # Llama-3-8B's attention shape

MHA_CASES = [
    # ---- smoke: batch shapes -------------------------------------------------------------
    MHACase(seq_lens=(1, 15, 17, 113), query_lens=(1, 1, 1, 1), family=Family.DECODE),
    MHACase(seq_lens=(15, 16, 17, 40), query_lens=(15, 16, 17, 40), family=Family.PREFILL),
    MHACase(seq_lens=(17, 33, 40, 113, 9, 24), query_lens=(1, 1, 5, 31, 9, 24), family=Family.MIXED),
    MHACase(seq_lens=(40, 30, 12), query_lens=(1, 6, 12), **GQA_32X8_D128, dtype="fp16",
            family=Family.MIXED),
    MHACase(seq_lens=(20, 30, 12), query_lens=(1, 6, 12), num_heads=8, num_kv_heads=8, dtype="fp32",
            family=Family.MIXED),
    MHACase(seq_lens=(31, 70, 12), query_lens=(1, 9, 12), num_heads=5, num_kv_heads=1, head_size=80,
            family=Family.HEADS),
    MHACase(seq_lens=(18, 51, 33), query_lens=(1, 6, 33), num_heads=8, num_kv_heads=1, head_size=96,
            dtype="fp16", family=Family.HEADS),
    MHACase(seq_lens=(21, 40), query_lens=(1, 7), head_size=256, family=Family.HEADS),
    MHACase(seq_lens=(4099, 333), query_lens=(1, 1), num_heads=5, num_kv_heads=1, family=Family.DECODE, label="long4099"),
    # ---- smoke: block sizes --------------------------------------------------------------
    MHACase(seq_lens=(31, 33, 65, 20), query_lens=(1, 1, 10, 20), block_size=32, family=Family.BLOCK_SIZE),
    MHACase(seq_lens=(63, 65, 130), query_lens=(1, 4, 130), block_size=64, dtype="fp16",
            family=Family.BLOCK_SIZE),
    MHACase(seq_lens=(545, 600, 30), query_lens=(1, 9, 30), num_kv_heads=1, block_size=544,
            family=Family.BLOCK_SIZE),
    # ---- smoke: knobs --------------------------------------------------------------------
    MHACase(seq_lens=(113, 60, 40, 30), query_lens=(1, 1, 17, 30), sliding_window=24,
            family=Family.SLIDING_WINDOW),
    MHACase(seq_lens=(64, 9, 33), query_lens=(1, 1, 1), head_size=128, dtype="fp16", sliding_window=7,
            family=Family.SLIDING_WINDOW),
    # softcap: raw scores ~N(0, query_std^2) reach 2-3x the cap (Gemma's 50); decode, extend and
    # prefill rows, so a kernel that skips the cap on any row kind is far off. A cap of 2 makes
    # masked keys that got capped to -2 instead of -inf (masking before the cap) carry real weight.
    MHACase(seq_lens=(40, 70, 25), query_lens=(1, 12, 25), softcap=50.0, query_std=40.0,
            family=Family.SOFTCAP),
    MHACase(seq_lens=(30, 45, 20), query_lens=(1, 9, 20), softcap=2.0, query_std=6.0, dtype="fp16",
            family=Family.SOFTCAP),
    # a scale other than 1/sqrt(head_size) (Gemma's query_pre_attn_scalar, MLA's YaRN mscale)
    MHACase(seq_lens=(40, 70, 25), query_lens=(1, 12, 25), scale=0.3, family=Family.SCALE),
    MHACase(seq_lens=(45, 70, 25), query_lens=(1, 12, 25), alibi=True, dtype="fp16", family=Family.ALIBI),
    MHACase(seq_lens=(45, 70, 25), query_lens=(1, 12, 25), sinks=True, family=Family.SINKS),
    MHACase(seq_lens=(40, 67, 90), query_lens=(4, 4, 4), sinks=True, family=Family.SINKS),
    MHACase(seq_lens=(24, 40), query_lens=(24, 40), num_kv_heads=1, dtype="fp16", causal=False,
            family=Family.NON_CAUSAL),
    # ---- smoke: fp8 KV cache --------------------------------------------------------------
    MHACase(seq_lens=(41, 80, 30), query_lens=(1, 11, 30), kv_cache_dtype="fp8_e4m3fn", **FP8_KV_SCALES,
            family=Family.FP8),
    MHACase(seq_lens=(41, 80, 30), query_lens=(1, 11, 30), kv_cache_dtype="fp8_e4m3fnuz", dtype="fp16",
            **FP8_KV_SCALES, family=Family.FP8),
    MHACase(seq_lens=(17, 100, 160), query_lens=(1, 1, 1), **GQA_32X8_D128, kv_cache_dtype="fp8_e4m3fn",
            **FP8_KV_SCALES, family=Family.FP8),
    # ---- smoke: chunked context (pipelines that chunk the context honour the override) ------
    MHACase(seq_lens=(60, 90), query_lens=(12, 20), context_chunk_tokens=4096, family=Family.CHUNKED),
    MHACase(seq_lens=(60, 90), query_lens=(12, 20), context_chunk_tokens=40, family=Family.CHUNKED),
    # a zero-context prefill beside a many-chunk extend: the merge sees -inf on both sides
    MHACase(seq_lens=(1, 120, 25), query_lens=(1, 9, 25), dtype="fp16", context_chunk_tokens=13,
            family=Family.CHUNKED),
    MHACase(seq_lens=(70, 45), query_lens=(6, 5), kv_cache_dtype="fp8_e4m3fn", **FP8_KV_SCALES,
            context_chunk_tokens=24, family=Family.CHUNKED),
    # ---- smoke: order ----------------------------------------------------------------------
    MHACase(seq_lens=(30, 50, 40), query_lens=(30, 1, 8), unordered=True, family=Family.ORDER),

    # ---- full (GPU, stored): medium shapes for the compiled kernels' real tile sizes; the smoke
    # rows run on the GPU too, so not every knob is repeated here (goldens stay under 40 MB) ----
    MHACase(seq_lens=(150, 64, 17, 1), query_lens=(1, 1, 1, 1), **GQA_32X8_D128, tier="full",
            family=Family.DECODE),
    MHACase(seq_lens=(120, 64, 32, 16), query_lens=(1, 1, 8, 16), **GQA_32X8_D128, tier="full",
            family=Family.MIXED),
    MHACase(seq_lens=(100, 50), query_lens=(100, 50), head_size=128, dtype="fp16", tier="full",
            family=Family.PREFILL),
    MHACase(seq_lens=(4099, 65), query_lens=(1, 1), num_kv_heads=1, tier="full", family=Family.DECODE, label="long4099"),
    MHACase(seq_lens=(150, 80, 40), query_lens=(1, 8, 40), head_size=96, block_size=32, dtype="fp16",
            tier="full", family=Family.HEADS),
    MHACase(seq_lens=(150, 70), query_lens=(1, 20), head_size=256, block_size=64, tier="full",
            family=Family.HEADS),
    MHACase(seq_lens=(545, 30), query_lens=(1, 30), num_kv_heads=1, head_size=128, block_size=544,
            tier="full", family=Family.BLOCK_SIZE),
    MHACase(seq_lens=(300, 150, 100), query_lens=(1, 1, 40), head_size=128, sliding_window=128, tier="full",
            family=Family.SLIDING_WINDOW),
    MHACase(seq_lens=(300, 120), query_lens=(1, 32), head_size=128, softcap=50.0, query_std=40.0, tier="full",
            family=Family.SOFTCAP),
    MHACase(seq_lens=(200, 80, 24), query_lens=(1, 8, 16), **GQA_32X8_D128, kv_cache_dtype="fp8_e4m3fn",
            **FP8_KV_SCALES, tier="full", family=Family.FP8),
    MHACase(seq_lens=(1, 400, 200), query_lens=(1, 20, 12), head_size=128, context_chunk_tokens=100,
            tier="full", family=Family.CHUNKED),
    MHACase(seq_lens=(120, 64), query_lens=(1, 32), head_size=128, dtype="fp32", tier="full",
            family=Family.MIXED),

    # ---- large (GPU, generated live; never stored) -------------------------------------------
    MHACase(seq_lens=(23616,), query_lens=(3616,), **GQA_32X8_D128, tier="large", family=Family.EXTEND, label="3616over20000"),
    MHACase(seq_lens=(8192,) * 16, query_lens=(1,) * 16, **GQA_32X8_D128, tier="large", family=Family.DECODE, label="b16x8192"),
]

MLA_CASES = [
    # ---- smoke (CPU interpreter): DeepSeek-V3 dims at TP16 (8 heads per rank) ------------------
    MLACase(seq_lens=(20, 30, 12), query_lens=(1, 5, 12), num_heads=8, family=Family.MIXED),
    MLACase(seq_lens=(40, 33, 10), query_lens=(1, 6, 10), num_heads=8, **MLA_MINI_DIMS,
            kv_cache_dtype="fp8_e4m3fn", kv_scale=MLA_FP8_KV_SCALE, family=Family.FP8),
    # ---- smoke: mini dims -------------------------------------------------------------------------
    MLACase(seq_lens=(1, 17, 40, 70), query_lens=(1, 1, 1, 1), num_heads=16, **MLA_MINI_DIMS,
            family=Family.DECODE),
    MLACase(seq_lens=(9, 20), query_lens=(9, 20), num_heads=8, **MLA_MINI_DIMS, dtype="fp16",
            family=Family.PREFILL),
    MLACase(seq_lens=(70, 65, 12), query_lens=(1, 5, 12), num_heads=8, **MLA_MINI_DIMS, block_size=64,
            family=Family.BLOCK_SIZE),
    MLACase(seq_lens=(20, 30, 9), query_lens=(1, 6, 9), num_heads=8, **MLA_MINI_DIMS, block_size=1,
            family=Family.BLOCK_SIZE),
    # a zero-context prefill next to a three-chunk extend: the context merge sees -inf on both sides
    MLACase(seq_lens=(50, 41, 9), query_lens=(6, 5, 9), num_heads=8, **MLA_MINI_DIMS, dtype="fp16",
            context_chunk_tokens=16, family=Family.CHUNKED),
    MLACase(seq_lens=(30, 45, 19), query_lens=(4, 4, 4), num_heads=16, **MLA_MINI_DIMS,
            family=Family.SPEC_DECODE),
    MLACase(seq_lens=(40, 33, 10), query_lens=(1, 6, 10), num_heads=8, **MLA_MINI_DIMS, dtype="fp16",
            kv_cache_dtype="fp8_e4m3fnuz", kv_scale=MLA_FP8_KV_SCALE, family=Family.FP8),
    MLACase(seq_lens=(26, 12), query_lens=(1, 12), num_heads=8, **MLA_MINI_DIMS, rope_factor=None,
            family=Family.SCALE),
    MLACase(seq_lens=(20, 30, 25), query_lens=(20, 1, 5), num_heads=8, **MLA_MINI_DIMS, unordered=True,
            family=Family.ORDER),

    # ---- full (GPU, stored): DeepSeek-V3 dims where the weights fit the 40 MB golden budget
    # (2 MB of W_UK/W_UV per 8-head case), mini dims otherwise; the large tier is all DeepSeek dims
    MLACase(seq_lens=(257, 100, 32), query_lens=(1, 1, 32), num_heads=8, block_size=64, dtype="fp16",
            tier="full", family=Family.MIXED),
    MLACase(seq_lens=(150, 77, 200), query_lens=(8, 8, 8), num_heads=8, **MLA_MINI_DIMS, tier="full",
            family=Family.SPEC_DECODE),
    MLACase(seq_lens=(1, 500, 260), query_lens=(1, 20, 12), num_heads=8, kv_cache_dtype="fp8_e4m3fn",
            kv_scale=MLA_FP8_KV_SCALE, context_chunk_tokens=128, tier="full", family=Family.CHUNKED),
    MLACase(seq_lens=(257, 300, 33), query_lens=(1, 1, 1), num_heads=8, **MLA_MINI_DIMS, block_size=1,
            tier="full", family=Family.BLOCK_SIZE),

    # ---- large (GPU, generated live from the seed; never stored) --------------------------------
    MLACase(seq_lens=(23616,), query_lens=(3616,), num_heads=16, tier="large", family=Family.EXTEND, label="3616over20000"),
    MLACase(seq_lens=(4096,) * 16, query_lens=(1,) * 16, num_heads=128, tier="large", family=Family.DECODE, label="b16x4096"),
    MLACase(seq_lens=(2048, 1500, 600, 300), query_lens=(1, 1, 64, 300), num_heads=128, block_size=64,
            dtype="fp16", tier="large", family=Family.MIXED),
    MLACase(seq_lens=(4096,) * 64, query_lens=(1,) * 64, num_heads=16, tier="large", family=Family.DECODE, label="b64x4096"),
]

MERGE_CASES = [
    MergeCase(num_tokens=37, num_heads=4, head_size=64, dtype="fp32", lse_pattern="finite"),
    MergeCase(num_tokens=29, num_heads=8, head_size=128, dtype="bf16", lse_pattern="prefix_neg_inf"),
    MergeCase(num_tokens=29, num_heads=8, head_size=80, dtype="fp16", lse_pattern="suffix_neg_inf"),
    MergeCase(num_tokens=23, num_heads=4, head_size=64, dtype="fp32", lse_pattern="both_neg_inf"),
    MergeCase(num_tokens=23, num_heads=4, head_size=64, dtype="bf16", lse_pattern="prefix_pos_inf"),
    MergeCase(num_tokens=23, num_heads=4, head_size=96, dtype="fp16", lse_pattern="suffix_pos_inf"),
    MergeCase(num_tokens=23, num_heads=4, head_size=64, dtype="fp32", lse_pattern="pos_and_neg_inf"),
    MergeCase(num_tokens=21, num_heads=8, head_size=256, dtype="bf16", lse_pattern="mixed"),
]


def check_catalogue(rows) -> None:
    """Names are unique and each is the one its fields derive (no row names itself)."""
    names = [c.name for c in rows]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate case names in the catalogue: {dup}")
    for c in rows:
        if c.name != c.derived_name():
            raise ValueError(f"catalogue case {c.name!r}: its fields derive the name {c.derived_name()!r}")


def all_cases() -> list:
    """MHA, MLA and merge rows."""
    rows = list(MHA_CASES) + list(MLA_CASES) + list(MERGE_CASES)
    check_catalogue(rows)
    return rows


def get_case(name: str):
    rows = all_cases()
    for c in rows:
        if c.name == name:
            return c
    close = difflib.get_close_matches(name, [c.name for c in rows], n=3)
    raise KeyError(f"unknown case {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))


def select_cases(tier=None, kind=None, family=None) -> list:
    rows = all_cases()
    if tier is not None:
        if tier not in TIERS:
            raise ValueError(f"unknown tier {tier!r}: expected one of {', '.join(TIERS)}")
        rows = [c for c in rows if c.tier == tier]
    if kind is not None:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}: expected one of {', '.join(KINDS)}")
        rows = [c for c in rows if c.kind == kind]
    if family is not None:
        fam = Family.parse(family)
        rows = [c for c in rows if c.family == fam]
    return sorted(rows, key=lambda c: c.name)
