"""The sweep tier: configurations drawn from a seed over every axis of the catalogue, each checked
against the float64 reference computed live on the device.

A configuration is named ``sweep:S:I`` (seed S, index I) and is a function of (S, I, sizes)
alone, so any one of them can be rebuilt and re-run by its name (``--case sweep:S:I``) without
drawing the others. It is an ordinary ``MHACase`` or ``MLACase`` of tier ``sweep``: the harness
builds its inputs and its oracle with the case kind's live builder (``build_live``: float64
reference and budgets on the device, the same budget code and rule as the stored tiers).

Sizes (``SIZES``) follow the device: ``small`` for the CPU (Triton interpreter: tens of tokens,
contexts of a few hundred keys), ``large`` for a GPU (batches of up to 32 sequences, contexts up
to 32768 keys with every knob). The sizes are part of what a name means: ``sweep:S:I`` on the
GPU is not the same case as on the CPU (a failure's repro bundle carries the full case).

Kernel specialisations. Triton compiles a kernel once per combination of its constexpr
arguments (head size, GQA group, block size, dtype, knob flags; AITER's and vLLM's unified
attention also take the softmax scale and the window size as constexprs; FlexAttention
recompiles per score-mod closure), and a compile costs far more than a check. So a seed first
draws a bounded list of *shape classes* (everything a kernel specialises on: dtype, heads,
head size, block size, kv-cache dtype, causal, window size, softcap value, ALiBi, sinks,
scale), spread so that every axis value appears in some class; configuration I then takes class
``I mod K`` and draws only what kernels take at run time: the row mix, the lengths (around
block and partition boundaries, never only multiples), the fp8 scales, the context chunk size,
the values. A sweep of any length compiles about K x (a few launch variants) kernels per
backend; another seed draws other classes.

Backends: configurations are drawn for the union of backends and filtered per backend by its
capabilities at collection time (``accepted``), so ``sweep:S:I`` is the same case for every
backend, its oracle is built once and shared by all of them, and the report can say how many
configurations each backend ran out of how many of its kind.
"""

from __future__ import annotations

import functools
import math
import random
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional

PREFIX = "sweep"
NAME_RE = re.compile(r"^sweep:(\d+):(\d+)$")

# ---- sizes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How big a sweep's configurations get (per device)."""

    name: str
    mha_classes: int  # shape classes (kernel specialisations) per seed
    mla_classes: int
    max_seqs: int  # sequences per batch (all-decode batches: twice that)
    max_new: int  # new tokens of one extend / prefill row
    max_new_total: int  # new tokens of a whole batch
    short_context: int  # longest ordinary context
    long_context: int  # a "long" configuration has one row with a context up to this
    long_new: int  # and up to this many new tokens on that row
    long_rate: float  # share of long configurations
    mla_long_context: int
    mha_heads: tuple  # (num_heads, num_kv_heads) pairs
    mla_heads: tuple


BOUNDARY_UNITS = (16, 32, 64, 128, 256, 512, 1024, 2048)  # block sizes, key tiles, split-KV partitions
MHA_HEADS = ((8, 2), (8, 8), (8, 1), (32, 8), (5, 1), (6, 2), (16, 1), (40, 2))  # groups 4 1 8 4 5 3 16 20

SIZES = {
    "small": Sizes("small", mha_classes=10, mla_classes=4, max_seqs=4, max_new=24, max_new_total=64,
                   short_context=96, long_context=700, long_new=16, long_rate=0.08, mla_long_context=300,
                   mha_heads=MHA_HEADS, mla_heads=(8, 16)),
    "large": Sizes("large", mha_classes=16, mla_classes=6, max_seqs=16, max_new=256, max_new_total=2048,
                   short_context=2048, long_context=32768, long_new=2048, long_rate=0.06,
                   mla_long_context=16384, mha_heads=MHA_HEADS, mla_heads=(8, 16, 128)),
}
DEVICE_SIZES = {"cpu": "small", "cuda": "large"}


def sizes_for(device: str, requested: Optional[str] = None) -> Sizes:
    """The sizes of a sweep on ``device`` ("cpu"/"cuda"), unless ``requested`` names one."""
    name = requested or DEVICE_SIZES.get(str(device).split(":")[0], "small")
    if name not in SIZES:
        raise ValueError(f"sweep sizes: expected one of {', '.join(SIZES)}, got {name!r}")
    return SIZES[name]


# ---- axes ----------------------------------------------------------------------------------------
# Each class-level axis lists its values; repeated values weight the draw (every value still
# appears in some class of every seed when there are at least as many classes as values).

MHA_AXES = {  # every value appears in some class of a seed (when there are enough classes)
    "dtype": ("bf16", "fp16", "fp32"),
    "heads": None,  # Sizes.mha_heads
    "head_size": (64, 80, 96, 128, 256),
    "block_size": (16, 32, 64, 128, 544),
}
# knobs: (share of classes that have it, the values it takes there); at least one class has it
MHA_KNOBS = {
    "kv_cache_dtype": (0.3, ("fp8_e4m3fn", "fp8_e4m3fnuz")),
    "non_causal": (0.15, (True,)),
    "sliding_window": (0.3, (1, 7, 17, 24, 128, 513)),
    "softcap": (0.25, (10.0, 30.0, 50.0)),
    "alibi": (0.25, (True,)),
    "sinks": (0.25, (True,)),
    "scale": (0.25, (0.0625, 0.3)),
}
KNOB_OFF = {"kv_cache_dtype": "auto", "non_causal": False, "sliding_window": None, "softcap": None, "alibi": False,
            "sinks": False, "scale": None}
MLA_DIMS = {
    "deepseek": dict(kv_lora_rank=512, rope_dim=64, nope_dim=128, v_dim=128),
    "mini": dict(kv_lora_rank=128, rope_dim=64, nope_dim=64, v_dim=64),
}
MLA_AXES = {
    "dtype": ("bf16", "fp16"),
    "num_heads": None,  # Sizes.mla_heads
    "dims": tuple(MLA_DIMS),
    "block_size": (1, 16, 64),
}
MLA_KNOBS = {
    "kv_cache_dtype": (0.35, ("fp8_e4m3fn", "fp8_e4m3fnuz")),
    "rope_factor": (0.7, (40.0,)),  # off: no YaRN factor in the scale
    "scale": (0.25, (0.125,)),
}
MLA_KNOB_OFF = {"kv_cache_dtype": "auto", "rope_factor": None, "scale": None}
SOFTCAP_QUERY_STD = 8.0  # softcap classes raise the query scale so the cap really bends the scores
# fp8 scales with at most 3 significant bits: fp8 values times the scale stay exact in bf16/fp16
FP8_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
CHUNK_TOKENS = (None, None, None, 13, 40, 100, 256, 1000, 4096)
# At most this many context chunks per sequence (a drawn chunk size grows to fit): vLLM's prefill
# workspaces give a few chunks per sequence, and a model-dtype merge chain's worst case grows with
# its length (reference.emulated.merge_chain_step), so hundreds of chunks of 13 tokens over a long
# context would leave a budget wider than the output they check.
MAX_CONTEXT_CHUNKS = 32
SPEC_DECODE_Q = (2, 3, 4, 5, 8)
ROW_MIXES = ("decode", "spec_decode", "extend", "prefill", "mixed")
ROW_MIX_WEIGHTS = (0.25, 0.1, 0.15, 0.15, 0.35)
UNORDERED_RATE = 0.04  # batches out of vLLM's order: a backend must compute them or reject them
MLA_EVERY = 4  # every 4th configuration (I mod 4 == 3) is MLA


@dataclass(frozen=True)
class MHAClass:
    """What MHA kernels specialise on; configurations of one class share compiled kernels."""

    dtype: str
    num_heads: int
    num_kv_heads: int
    head_size: int
    block_size: int
    kv_cache_dtype: str
    causal: bool
    sliding_window: Optional[int]
    softcap: Optional[float]
    alibi: bool
    sinks: bool
    scale: Optional[float]

    def problems(self) -> list:
        out = []
        if self.kv_cache_dtype != "auto" and self.dtype == "fp32":
            out.append("fp8 caches hold bf16/fp16 models")
        if not self.causal and self.sliding_window is not None:
            out.append("a window is a causal notion here")
        return out

    def neutralised(self) -> "MHAClass":
        return replace(self, kv_cache_dtype="auto" if self.dtype == "fp32" else self.kv_cache_dtype,
                       sliding_window=self.sliding_window if self.causal else None)


@dataclass(frozen=True)
class MLAClass:
    dtype: str
    num_heads: int
    dims: str
    block_size: int
    kv_cache_dtype: str
    rope_factor: Optional[float]
    scale: Optional[float]

    def problems(self) -> list:
        return []

    def neutralised(self) -> "MLAClass":
        return self


def _spread(rng: random.Random, values: tuple, k: int) -> list:
    """``k`` draws from ``values``: every value once (while k allows), the rest at random, in a
    shuffled order."""
    distinct = list(dict.fromkeys(values))
    rng.shuffle(distinct)
    picks = distinct[:k] + [rng.choice(values) for _ in range(k - len(distinct))]
    rng.shuffle(picks)
    return picks


def _spread_knob(rng: random.Random, share: float, values: tuple, off, k: int, least: int = 1) -> list:
    """A knob for ``k`` classes: on in round(share * k) of them (at least ``least``), its values
    spread over those, ``off`` elsewhere."""
    n_on = min(k, max(least, round(share * k)))
    column = _spread(rng, values, n_on) + [off] * (k - n_on)
    rng.shuffle(column)
    return column


def _repair(rng: random.Random, classes: list, axes: tuple) -> list:
    """Swap axis values between classes until every class is valid; swapping keeps the set of
    values that appear (coverage) intact."""
    classes = list(classes)
    for _ in range(50):
        bad = [i for i, c in enumerate(classes) if c.problems()]
        if not bad:
            return classes
        i = bad[0]
        for axis in axes:
            order = list(range(len(classes)))
            rng.shuffle(order)
            for j in order:
                if j == i:
                    continue
                a, b = classes[i], classes[j]
                a2 = replace(a, **_axis_values(b, axis))
                b2 = replace(b, **_axis_values(a, axis))
                if len(a2.problems()) < len(a.problems()) and not b2.problems():
                    classes[i], classes[j] = a2, b2
                    break
            else:
                continue
            break
        else:  # no swap helps: drop the conflicting knob (rare; the coverage test watches for it)
            classes[i] = classes[i].neutralised()
    raise AssertionError("sweep: class repair did not converge")


def _axis_values(cls, axis: str) -> dict:
    if axis == "heads":
        return {"num_heads": cls.num_heads, "num_kv_heads": cls.num_kv_heads}
    return {axis: getattr(cls, axis)}


def _least(knob: str, values: tuple) -> int:
    """Both fp8 flavours in every seed; one class for any other knob."""
    return len(values) if knob == "kv_cache_dtype" else 1


@functools.lru_cache(maxsize=64)
def mha_classes(seed: int, sizes: Sizes, count: Optional[int] = None) -> tuple:
    k = count or sizes.mha_classes
    rng = random.Random(f"attncheck-sweep-mha-classes:{seed}:{sizes.name}:{k}")
    axes = dict(MHA_AXES, heads=sizes.mha_heads)
    cols = {axis: _spread(rng, values, k) for axis, values in axes.items()}
    cols.update({knob: _spread_knob(rng, share, values, KNOB_OFF[knob], k, _least(knob, values))
                 for knob, (share, values) in MHA_KNOBS.items()})
    classes = [MHAClass(dtype=cols["dtype"][i], num_heads=cols["heads"][i][0], num_kv_heads=cols["heads"][i][1],
                        head_size=cols["head_size"][i], block_size=cols["block_size"][i],
                        kv_cache_dtype=cols["kv_cache_dtype"][i], causal=not cols["non_causal"][i],
                        sliding_window=cols["sliding_window"][i], softcap=cols["softcap"][i],
                        alibi=cols["alibi"][i], sinks=cols["sinks"][i], scale=cols["scale"][i]) for i in range(k)]
    return tuple(_repair(rng, classes, ("kv_cache_dtype", "dtype", "causal", "sliding_window")))


@functools.lru_cache(maxsize=64)
def mla_classes(seed: int, sizes: Sizes, count: Optional[int] = None) -> tuple:
    k = count or sizes.mla_classes
    rng = random.Random(f"attncheck-sweep-mla-classes:{seed}:{sizes.name}:{k}")
    axes = dict(MLA_AXES, num_heads=sizes.mla_heads)
    cols = {axis: _spread(rng, values, k) for axis, values in axes.items()}
    cols.update({knob: _spread_knob(rng, share, values, MLA_KNOB_OFF[knob], k, _least(knob, values))
                 for knob, (share, values) in MLA_KNOBS.items()})
    return tuple(MLAClass(**{axis: cols[axis][i] for axis in cols}) for i in range(k))


# ---- lengths and rows --------------------------------------------------------------------------

def draw_length(rng: random.Random, lo: int, hi: int, block_size: int) -> int:
    """A length in [lo, hi]: half the time next to a block or partition boundary (a multiple
    of the unit, or one off either side), otherwise log-uniform."""
    if hi <= lo:
        return lo
    if rng.random() < 0.5:
        units = [u for u in (block_size,) + BOUNDARY_UNITS if lo <= u + 1 and u <= hi + 1]
        if units:
            u = rng.choice(units)
            m = rng.randint(max(1, -(-(lo - 1) // u)), max(1, (hi + 1) // u))
            n = m * u + rng.choice((-1, 0, 1))
            if lo <= n <= hi:
                return n
    return int(round(math.exp(rng.uniform(math.log(max(lo, 1)), math.log(hi + 1))))) if lo >= 1 else \
        rng.randint(lo, hi)


def _rows(rng: random.Random, sizes: Sizes, mix: str, block_size: int, max_spec_q: int = 8) -> list:
    """(query_len, seq_len) rows of one batch, in vLLM's order (decodes, extends, prefills)."""
    n_seqs = lambda most: rng.randint(1, most)  # noqa: E731
    ctx = lambda lo=1: draw_length(rng, lo, sizes.short_context, block_size)  # noqa: E731
    new = lambda lo=2: draw_length(rng, lo, sizes.max_new, block_size)  # noqa: E731
    rows = []
    if mix == "decode":
        rows = [(1, 1 + draw_length(rng, 0, sizes.short_context, block_size)) for _ in range(n_seqs(2 * sizes.max_seqs))]
    elif mix == "spec_decode":
        q = rng.choice([x for x in SPEC_DECODE_Q if x <= max_spec_q])
        rows = [(q, q + ctx()) for _ in range(n_seqs(sizes.max_seqs))]
    elif mix == "extend":
        rows = [(q, q + ctx()) for q in (new() for _ in range(n_seqs(sizes.max_seqs)))]
    elif mix == "prefill":
        rows = [(q, q) for q in (new(1) for _ in range(n_seqs(sizes.max_seqs)))]
    else:  # mixed: at least two of decode / extend / prefill
        kinds = rng.sample(["decode", "extend", "prefill"], rng.choice((2, 3)))
        for kind in kinds:
            for _ in range(n_seqs(max(1, sizes.max_seqs // 2))):
                if kind == "decode":
                    rows.append((1, 1 + draw_length(rng, 0, sizes.short_context, block_size)))
                elif kind == "extend":
                    q = new()
                    rows.append((q, q + ctx()))
                else:
                    q = new(1)
                    rows.append((q, q) if q > 1 else (1, 1))
    return _trim_new_tokens(rows, sizes.max_new_total)


def _trim_new_tokens(rows: list, budget: int) -> list:
    out, used = [], 0
    for q, s in rows:
        if used + q > budget and out:
            break
        out.append((q, s))
        used += q
    return out


def _order(rows: list) -> list:
    rank = {"decode": 0, "extend": 1, "prefill": 2}
    return sorted(rows, key=lambda r: rank[_row_kind(*r)])


def _row_kind(q: int, s: int) -> str:
    return "decode" if q <= 1 else ("extend" if s > q else "prefill")


def _lengthen(rng: random.Random, rows: list, sizes: Sizes, long_context: int, block_size: int) -> list:
    """A long configuration: one row (a decode, or an extend with up to ``long_new`` new tokens)
    gets a context of thousands of keys."""
    i = rng.randrange(len(rows))
    q = 1 if rng.random() < 0.5 else draw_length(rng, 2, sizes.long_new, block_size)
    c = draw_length(rng, max(sizes.short_context, 1), long_context, block_size)
    rows = list(rows)
    rows[i] = (q, q + c)
    return rows


def _unorder(rng: random.Random, rows: list) -> Optional[list]:
    """The rows in an order vLLM never produces (None when every row is of one kind)."""
    if len({_row_kind(*r) for r in rows}) < 2:
        return None
    for _ in range(20):
        shuffled = list(rows)
        rng.shuffle(shuffled)
        if _order(shuffled) != shuffled:
            return shuffled
    return None


def _ordered_or_not(rng: random.Random, rows: list, unordered: bool) -> tuple:
    """(rows, unordered): vLLM's order, or (when asked and the rows allow it) any other."""
    shuffled = _unorder(rng, rows) if unordered else None
    return (shuffled, True) if shuffled is not None else (_order(rows), False)


def _family(rows: list, unordered: bool) -> str:
    if unordered:
        return "order"
    kinds = {_row_kind(q, s) for q, s in rows}
    if kinds == {"extend"} and len(rows) > 1 and len({q for q, _ in rows}) == 1 and rows[0][0] <= 16:
        return "spec_decode"
    return kinds.pop() if len(kinds) == 1 else "mixed"


# ---- configurations ----------------------------------------------------------------------------

def name(seed: int, index: int) -> str:
    return f"{PREFIX}:{seed}:{index}"


def parse_name(text: str) -> tuple:
    """(seed, index) of ``sweep:S:I``; ValueError naming the expected form otherwise."""
    m = NAME_RE.match(str(text))
    if not m:
        raise ValueError(f"sweep case {text!r}: expected sweep:SEED:INDEX with non-negative integers")
    return int(m.group(1)), int(m.group(2))


def is_sweep_name(text) -> bool:
    return isinstance(text, str) and text.startswith(PREFIX + ":")


def check_case_names(names, tier: str) -> None:
    """Catalogue names (KeyError naming the closest ones) or ``sweep:S:I`` names (only with the
    sweep tier; ValueError otherwise)."""
    from attncheck import cases

    for name in names:
        if is_sweep_name(name):
            parse_name(name)
            if tier != "sweep":
                raise ValueError(f"case {name} is a sweep configuration: run it with the sweep tier "
                                 f"(--tier sweep), not {tier}")
        elif tier == "sweep":
            raise ValueError(f"case {name}: the sweep tier runs sweep:SEED:INDEX configurations, "
                             "not catalogue cases")
        else:
            cases.get_case(name)


def _case_class(kind: str):
    from attncheck import cases  # imports torch: only when a configuration is built

    return getattr(cases, f"{kind}Case")


def kind_of_index(index: int) -> str:
    return "MLA" if index % MLA_EVERY == MLA_EVERY - 1 else "MHA"


def class_of_index(index: int, num_classes: int) -> int:
    """Consecutive configurations of a kind take consecutive classes (all classes appear within
    the first K configurations of the kind)."""
    group, slot = divmod(index, MLA_EVERY)
    if slot == MLA_EVERY - 1:
        return group % num_classes
    return ((MLA_EVERY - 1) * group + slot) % num_classes


def config(seed: int, index: int, sizes: Sizes, shapes: Optional[int] = None):
    """Configuration ``index`` of seed ``seed``: an MHACase or MLACase of tier "sweep"."""
    if seed < 0 or index < 0:
        raise ValueError(f"sweep: seed and index must be >= 0, got {seed} and {index}")
    rng = random.Random(f"attncheck-sweep:{seed}:{index}:{sizes.name}")
    kind = kind_of_index(index)
    if kind == "MLA":
        classes = mla_classes(seed, sizes, _mla_count(shapes))
        return _mla_config(rng, seed, index, sizes, classes[class_of_index(index, len(classes))])
    classes = mha_classes(seed, sizes, shapes)
    return _mha_config(rng, seed, index, sizes, classes[class_of_index(index, len(classes))])


def _mla_count(shapes: Optional[int]) -> Optional[int]:
    return None if shapes is None else max(3, shapes // 3)


def _mha_config(rng, seed, index, sizes, cls: MHAClass):
    unordered = cls.causal and rng.random() < UNORDERED_RATE
    mix = "prefill" if not cls.causal else "mixed" if unordered else rng.choices(ROW_MIXES, ROW_MIX_WEIGHTS)[0]
    rows = _rows(rng, sizes, mix, cls.block_size)
    if cls.causal and rng.random() < sizes.long_rate:
        rows = _lengthen(rng, rows, sizes, sizes.long_context, cls.block_size)
    rows, unordered = _ordered_or_not(rng, rows, unordered)
    fp8 = cls.kv_cache_dtype != "auto"
    k_scale, v_scale = (rng.choice(FP8_SCALES), rng.choice(FP8_SCALES)) if fp8 else (1.0, 1.0)
    return _case_class("MHA")(
        name=name(seed, index), seq_lens=tuple(s for _, s in rows), query_lens=tuple(q for q, _ in rows),
        num_heads=cls.num_heads, num_kv_heads=cls.num_kv_heads, head_size=cls.head_size,
        block_size=cls.block_size, dtype=cls.dtype, kv_cache_dtype=cls.kv_cache_dtype,
        k_scale=k_scale, v_scale=v_scale, causal=cls.causal, sliding_window=cls.sliding_window,
        softcap=cls.softcap, alibi=cls.alibi, sinks=cls.sinks, scale=cls.scale,
        seed=rng.randrange(2 ** 31), tier="sweep", family=_family(rows, unordered),
        context_chunk_tokens=_chunk_tokens(rng, rows), unordered=unordered,
        query_std=SOFTCAP_QUERY_STD if cls.softcap else 1.0)


def _mla_config(rng, seed, index, sizes, cls: MLAClass):
    unordered = rng.random() < UNORDERED_RATE
    mix = "mixed" if unordered else rng.choices(ROW_MIXES, ROW_MIX_WEIGHTS)[0]
    rows = _rows(rng, sizes, mix, cls.block_size)
    if rng.random() < sizes.long_rate:
        rows = _lengthen(rng, rows, sizes, sizes.mla_long_context, cls.block_size)
    rows, unordered = _ordered_or_not(rng, rows, unordered)
    fp8 = cls.kv_cache_dtype != "auto"
    return _case_class("MLA")(
        name=name(seed, index), seq_lens=tuple(s for _, s in rows), query_lens=tuple(q for q, _ in rows),
        num_heads=cls.num_heads, **MLA_DIMS[cls.dims], block_size=cls.block_size, dtype=cls.dtype,
        kv_cache_dtype=cls.kv_cache_dtype, kv_scale=rng.choice(FP8_SCALES) if fp8 else 1.0,
        rope_factor=cls.rope_factor, scale=cls.scale, seed=rng.randrange(2 ** 31), tier="sweep",
        family=_family(rows, unordered), context_chunk_tokens=_chunk_tokens(rng, rows), unordered=unordered)


def _chunk_tokens(rng, rows) -> Optional[int]:
    """A chunk size from CHUNK_TOKENS (None: the context in one pass), raised so that no
    sequence's context (rows: (query_len, seq_len)) takes more than MAX_CONTEXT_CHUNKS chunks."""
    drawn = rng.choice(CHUNK_TOKENS)
    if drawn is None:
        return None
    longest = max((s - q for q, s in rows), default=0)
    return max(drawn, -(-longest // MAX_CONTEXT_CHUNKS))


def configs(seed: int, count: int, sizes: Sizes, shapes: Optional[int] = None) -> list:
    if count < 0:
        raise ValueError(f"sweep count: must be >= 0, got {count}")
    return [config(seed, i, sizes, shapes) for i in range(count)]


def case_from_name(text: str, sizes: Sizes, shapes: Optional[int] = None):
    seed, index = parse_name(text)
    return config(seed, index, sizes, shapes)


def accepted(backend, case) -> Optional[str]:
    """None when ``backend`` takes ``case`` (same kind, capabilities accept it), else why not."""
    if backend.kind != case.kind:
        return f"{backend.kind} backend, {case.kind} case"
    return backend.capabilities.unsupported(case.params())


def spec(case) -> dict:
    """Every field of a sweep case (what a failure prints)."""
    return {f.name: getattr(case, f.name) for f in fields(case) if f.init and f.name != "name"}


def describe(case) -> str:
    parts = []
    for key, value in spec(case).items():
        if isinstance(value, tuple) and len(value) > 12:
            value = f"{list(value[:12])[:-1]}... ({len(value)} values)"
        parts.append(f"{key}={value}")
    return f"{case.kind} " + ", ".join(parts)


def class_key(case) -> tuple:
    """The shape class a configuration belongs to (what kernels specialise on)."""
    if case.kind == "MLA":
        return ("MLA", case.dtype, case.num_heads, case.kv_lora_rank, case.rope_dim, case.nope_dim, case.v_dim,
                case.block_size, case.kv_cache_dtype, case.rope_factor, case.scale)
    return ("MHA", case.dtype, case.num_heads, case.num_kv_heads, case.head_size, case.block_size,
            case.kv_cache_dtype, case.causal, case.sliding_window, case.softcap, case.alibi, case.sinks, case.scale)


GROUP_SPAN = 400  # a worker group: one shape class's configurations among this many consecutive indices


def worker_group(case) -> str:
    """The pytest-xdist group of a sweep configuration: its shape class, and which GROUP_SPAN
    block of indices it is in (``CLASS#BLOCK``). A group's configurations and all their backends
    run on one worker, and the scheduler (``attncheck.pytest_plugin.next_group``) gives every
    class a worker before any class gets a second one and then keeps a worker on the classes it
    has compiled: each kernel specialisation is compiled by few processes, not by every worker,
    and a time-capped run still reaches every class."""
    block = parse_name(case.name)[1] // GROUP_SPAN
    return "sweep-class:" + ":".join(map(str, class_key(case))) + f"#{block}"


# ---- coverage --------------------------------------------------------------------------------

def axis_values(case, sizes: Sizes) -> dict:
    """The value each sweep axis takes in ``case`` (for the coverage report and its test)."""
    rows = list(zip(case.query_lens, case.seq_lens))
    bs = case.block_size
    contexts = [s - q for q, s in rows]
    out = {
        "kind": case.kind, "family": str(case.family), "dtype": case.dtype, "block_size": bs,
        "kv_cache_dtype": case.kv_cache_dtype,
        "chunked": case.context_chunk_tokens is not None, "custom_scale": case.scale is not None,
        "long_context": max(contexts) > sizes.short_context,
        "partial_last_block": any(s % bs for _, s in rows),
        "block_multiple": any(s % bs == 0 for _, s in rows),
        "boundary_plus_one": any(s % u == 1 for _, s in rows for u in (bs,) + BOUNDARY_UNITS if s > u),
        "boundary_minus_one": any(s % u == u - 1 for _, s in rows for u in (bs,) + BOUNDARY_UNITS if s >= u),
    }
    if case.kind == "MHA":
        out.update(heads=(case.num_heads, case.num_kv_heads), head_size=case.head_size, causal=case.causal,
                   window=case.sliding_window is not None, softcap=case.softcap is not None, alibi=case.alibi,
                   sinks=case.sinks, fp8_scales=(case.k_scale, case.v_scale) != (1.0, 1.0))
    else:
        dims = next((n for n, d in MLA_DIMS.items() if all(getattr(case, k) == v for k, v in d.items())), "other")
        out.update(num_heads=case.num_heads, dims=dims, rope_factor=case.rope_factor)
    return out


def coverage(cases: list, sizes: Sizes) -> dict:
    """{axis: sorted distinct values seen} over ``cases``."""
    seen: dict = {}
    for c in cases:
        for axis, value in axis_values(c, sizes).items():
            seen.setdefault(f"{c.kind}.{axis}", set()).add(value)
    return {axis: sorted(values, key=repr) for axis, values in sorted(seen.items())}


def class_table(seed: int, sizes: Sizes, shapes: Optional[int] = None) -> list:
    """The seed's shape classes as dicts (the report lists them)."""
    return ([dict(kind="MHA", **asdict(c)) for c in mha_classes(seed, sizes, shapes)]
            + [dict(kind="MLA", **asdict(c)) for c in mla_classes(seed, sizes, _mla_count(shapes))])
