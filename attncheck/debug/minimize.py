"""Shrink a failing case while it keeps failing the same way.

The bundle's batch is taken apart into sequences (each: its new tokens' tensors, the cache
bytes the reference writes for them, and its context as stored in the cache) and per-head
tensors. Shrink steps, tried greedily in this order until none applies:

1. sequences: keep one sequence (the worst-failing first), else drop one at a time;
2. heads: keep one KV head with its whole query-head group (the GQA ratio stays), else drop
   one group at a time (MLA: query heads);
3. per sequence: drop context from the front (whole KV blocks first, so positions keep their
   offset in the block), turn leading query tokens into context, drop trailing query tokens;
4. head size (MHA): the first D' channels, for the sizes the backend's capabilities accept;
5. block size: smaller block sizes the backend accepts (the cache is re-paged).

Every candidate is re-paged deterministically (scattered block ids from the case seed, unused
slots, a spare block and the block-table padding NaN-poisoned, as the goldens are), its
reference and budgets are recomputed in float64 by the case kind's golden builder
(``attncheck.debug.oracle``), and it is run through ``harness.run_backend``. A candidate is
accepted when ``rows.Pattern.same_as`` says it fails the same way (same localized checks, every
failing row keeps the original's row traits). The search is deterministic; it stops early at
``max_steps`` backend runs or ``max_seconds`` and says so.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from attncheck.backends import get_backend
from attncheck.debug import bundle as bundle_mod
from attncheck.debug import oracle, replay, rows


class MinimizeError(ValueError):
    pass


# Per kind: the per-token tensors and which head axis they carry ("q" query heads, "kv" KV
# heads, None), the caches with the expected bytes of their new-token slots, and the
# per-query-head tensors with their head axis. Head size shrinking applies to MHA only.
LAYOUT = {
    "MHA": {
        "tokens": {"query": "q", "key": "kv", "value": "kv"},
        "caches": {"key_cache": "expected.key_cache_slots", "value_cache": "expected.value_cache_slots"},
        "cache_head_axis": 2,
        "per_head": {"alibi_slopes": 0, "sinks": 0},
    },
    "MLA": {
        "tokens": {"q_nope": "q", "q_pe": "q", "kv_c": None, "k_pe": None},
        "caches": {"kv_cache": "expected.kv_cache_slots"},
        "cache_head_axis": None,
        "per_head": {"w_uk": 1, "w_uv": 1},
    },
}


@dataclass
class Seq:
    new: dict  # name -> [q_len, ...] per-token inputs
    written: dict  # cache field -> [q_len, ...] bytes the reference writes for the new tokens
    context: dict  # cache field -> [ctx, ...] what the cache holds before the run

    @property
    def q_len(self) -> int:
        return int(next(iter(self.new.values())).shape[0])

    @property
    def ctx(self) -> int:
        return int(next(iter(self.context.values())).shape[0])


@dataclass
class State:
    case: object
    seqs: list
    per_head: dict = field(default_factory=dict)

    def describe(self) -> str:
        c = self.case
        keys = sum(c.seq_lens)
        n = len(c.seq_lens)
        qs = ", ".join(str(q) for q in c.query_lens)
        seq_word = "sequence" if n == 1 else "sequences"
        if c.kind == "MHA":
            heads = (f"{c.num_kv_heads} KV head{'s' if c.num_kv_heads > 1 else ''} "
                     f"x {c.num_heads // c.num_kv_heads} query heads, head size {c.head_size}")
        else:
            heads = f"{c.num_heads} head{'s' if c.num_heads > 1 else ''}"
        return (f"{n} {seq_word}, {keys} key{'s' if keys > 1 else ''} (seq_lens {', '.join(str(s) for s in c.seq_lens)}), "
                f"q_len {qs}, {heads}, block {c.block_size}")


# ---- taking a batch apart and putting it back together -----------------------------------------

def _slots(block_table_row: torch.Tensor, positions: range, bs: int) -> torch.Tensor:
    pos = torch.tensor(list(positions), dtype=torch.long)
    return block_table_row[pos // bs].long() * bs + pos % bs


def decompose(case, tensors: dict) -> State:
    lay = LAYOUT[case.kind]
    qsl = tensors["query_start_loc"].tolist()
    slens = tensors["seq_lens"].tolist()
    bs = case.block_size
    seqs = []
    for b in range(len(slens)):
        lo, hi = qsl[b], qsl[b + 1]
        ctx = slens[b] - (hi - lo)
        slots = _slots(tensors["block_table"][b], range(ctx), bs)
        context = {}
        for name in lay["caches"]:
            cache = tensors[name]
            context[name] = cache.reshape(-1, *cache.shape[2:])[slots].clone()
        seqs.append(Seq(new={n: tensors[n][lo:hi].clone() for n in lay["tokens"]},
                        written={n: tensors[e][lo:hi].clone() for n, e in lay["caches"].items()},
                        context=context))
    per_head = {n: tensors[n] for n in lay["per_head"] if n in tensors}
    return State(case, seqs, per_head)


def _poisoned(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=torch.float32).to(dtype)


def compose(state: State) -> dict:
    """The batch inputs of a state, paged like the goldens (case seed -> scattered blocks)."""
    case, seqs = state.case, state.seqs
    lay = LAYOUT[case.kind]
    bs = case.block_size
    g = torch.Generator().manual_seed(case.seed)
    blocks_per_seq = [-(-(s.ctx + s.q_len) // bs) for s in seqs]
    num_blocks = sum(blocks_per_seq) + 1  # one spare, NaN-poisoned block
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
    block_table = torch.full((len(seqs), max(blocks_per_seq) + 1), int(perm[-1]), dtype=torch.int32)
    cursor = 0
    for b, n in enumerate(blocks_per_seq):
        block_table[b, :n] = perm[cursor:cursor + n]
        cursor += n
    caches = {}
    for name in lay["caches"]:
        tail = tuple(seqs[0].context[name].shape[1:])
        caches[name] = _poisoned((num_blocks, bs, *tail), seqs[0].context[name].dtype)
    slot_mapping = []
    for b, s in enumerate(seqs):
        ctx_slots = _slots(block_table[b], range(s.ctx), bs)
        for name in lay["caches"]:
            caches[name].view(-1, *caches[name].shape[2:])[ctx_slots] = s.context[name]
        slot_mapping.append(_slots(block_table[b], range(s.ctx, s.ctx + s.q_len), bs))
    qlens = [s.q_len for s in seqs]
    out = {n: torch.cat([s.new[n] for s in seqs]) for n in lay["tokens"]}
    out.update(caches)
    out.update(state.per_head)
    out.update({
        "block_table": block_table,
        "query_start_loc": torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32),
        "seq_lens": torch.tensor([s.ctx + s.q_len for s in seqs], dtype=torch.int32),
        "slot_mapping": torch.cat(slot_mapping).to(torch.int64),
    })
    return out


def _with_case(state: State, seqs=None, per_head=None, **changes) -> State:
    seqs = state.seqs if seqs is None else seqs
    case = dataclasses.replace(state.case, seq_lens=tuple(s.ctx + s.q_len for s in seqs),
                               query_lens=tuple(s.q_len for s in seqs), **changes)
    return State(case, seqs, state.per_head if per_head is None else per_head)


# ---- shrink steps -------------------------------------------------------------------------------

def _sequence_steps(state: State, worst_seq: list):
    n = len(state.seqs)
    if n == 1:
        return
    for b in worst_seq + [b for b in range(n) if b not in worst_seq]:
        yield f"keep only sequence {b}", _with_case(state, seqs=[state.seqs[b]])
    for b in reversed(range(n)):
        yield f"drop sequence {b}", _with_case(state, seqs=[s for i, s in enumerate(state.seqs) if i != b])


def _select_heads(state: State, q_heads: list, kv_heads: Optional[list]) -> State:
    lay = LAYOUT[state.case.kind]
    qi = torch.tensor(q_heads)
    ki = torch.tensor(kv_heads) if kv_heads is not None else None
    seqs = []
    for s in state.seqs:
        new = {}
        for name, t in s.new.items():
            axis = lay["tokens"][name]
            new[name] = t.index_select(1, qi) if axis == "q" else (t.index_select(1, ki) if axis == "kv" else t)
        ax = lay["cache_head_axis"]
        if ax is not None:  # cache rows are [..., Hkv, D]: the head axis is 1 per row
            written = {n: t.index_select(1, ki) for n, t in s.written.items()}
            context = {n: t.index_select(1, ki) for n, t in s.context.items()}
        else:
            written, context = s.written, s.context
        seqs.append(Seq(new, written, context))
    per_head = {n: t.index_select(lay["per_head"][n], qi) for n, t in state.per_head.items()}
    changes = {"num_heads": len(q_heads)}
    if kv_heads is not None:
        changes["num_kv_heads"] = len(kv_heads)
    return _with_case(state, seqs=seqs, per_head=per_head, **changes)


def _head_steps(state: State, worst_head: list):
    c = state.case
    if c.kind == "MHA":
        g = c.num_heads // c.num_kv_heads
        if c.num_kv_heads == 1:
            return
        order = []
        for h in worst_head:
            if h // g not in order:
                order.append(h // g)
        order += [k for k in range(c.num_kv_heads) if k not in order]

        def group(kvs):
            return [k * g + j for k in kvs for j in range(g)], kvs
        for k in order:
            yield f"keep only KV head {k} and its {g} query heads", _select_heads(state, *group([k]))
        for k in reversed(range(c.num_kv_heads)):
            yield f"drop KV head {k} and its query heads", _select_heads(
                state, *group([x for x in range(c.num_kv_heads) if x != k]))
    else:
        if c.num_heads == 1:
            return
        for h in worst_head + [h for h in range(c.num_heads) if h not in worst_head]:
            yield f"keep only head {h}", _select_heads(state, [h], None)
        for h in reversed(range(c.num_heads)):
            yield f"drop head {h}", _select_heads(state, [x for x in range(c.num_heads) if x != h], None)


def _cuts(n: int, bs: int) -> list:
    """How many to remove, biggest first: all, whole blocks, halves, one."""
    cand = [n, (n // bs) * bs, n // 2, ((n // 2) // bs) * bs, bs, 1]
    out = []
    for c in cand:
        if 0 < c <= n and c not in out:
            out.append(c)
    return out


def _length_steps(state: State):
    bs = state.case.block_size
    for b, s in enumerate(state.seqs):
        def replace(new_seq):
            seqs = list(state.seqs)
            seqs[b] = new_seq
            return _with_case(state, seqs=seqs)
        for n in _cuts(s.ctx, bs):
            yield (f"sequence {b}: drop the first {n} context keys",
                   replace(Seq(s.new, s.written, {k: v[n:] for k, v in s.context.items()})))
        for n in _cuts(s.q_len - 1, bs):
            yield (f"sequence {b}: turn its first {n} query tokens into context",
                   replace(Seq({k: v[n:] for k, v in s.new.items()}, {k: v[n:] for k, v in s.written.items()},
                               {k: torch.cat([s.context[k], s.written[k][:n]]) for k in s.context})))
        for n in _cuts(s.q_len - 1, bs):
            yield (f"sequence {b}: drop its last {n} query tokens",
                   replace(Seq({k: v[:-n] for k, v in s.new.items()}, {k: v[:-n] for k, v in s.written.items()},
                               s.context)))


def _head_size_steps(state: State):
    c = state.case
    if c.kind != "MHA":
        return
    sizes = sorted({d for d in (16, 32, 64, 128, c.head_size // 2) if 8 <= d < c.head_size})
    for d in sizes:
        seqs = [Seq({k: v[..., :d].contiguous() for k, v in s.new.items()},
                    {k: v[..., :d].contiguous() for k, v in s.written.items()},
                    {k: v[..., :d].contiguous() for k, v in s.context.items()}) for s in state.seqs]
        yield f"head size {d} (the first {d} channels)", _with_case(state, seqs=seqs, head_size=d)


def _block_size_steps(state: State):
    bs = state.case.block_size
    sizes = []
    p = 1
    while p < bs:
        sizes.append(p)
        p *= 2
    for d in sorted(sizes, reverse=True):
        yield f"block size {d}", _with_case(state, block_size=d)


# ---- the search -------------------------------------------------------------------------------

@dataclass
class Result:
    state: State
    tensors: dict
    verdict: object
    pattern: rows.Pattern
    original: rows.Pattern
    runs: int
    accepted: list
    stopped_early: str = ""

    def summary(self) -> str:
        head = (f"fails with {self.state.describe()}: {', '.join(sorted(self.pattern.checks))} fail; "
                f"{rows.describe_traits(self.original.traits)}")
        return head + (f" [stopped early: {self.stopped_early}]" if self.stopped_early else "")


class _Search:
    def __init__(self, backend, device, original: rows.Pattern, max_steps: int, max_seconds: float, log):
        self.backend, self.device, self.original = backend, device, original
        self.max_steps, self.deadline = max_steps, time.monotonic() + max_seconds
        self.max_seconds = max_seconds
        self.runs = 0
        self.log = log
        self.stopped = ""

    def out_of_budget(self) -> bool:
        if self.runs >= self.max_steps:
            self.stopped = f"{self.max_steps} backend runs (--max-steps)"
        elif time.monotonic() > self.deadline:
            self.stopped = f"{self.max_seconds:g} s (--max-seconds)"
        return bool(self.stopped)

    def evaluate(self, state: State):
        """(tensors, verdict, pattern) of a candidate, or None when the backend cannot take it."""
        from attncheck import harness
        if self.backend.capabilities.unsupported(state.case.params()):
            return None
        tensors = oracle.expected_and_budgets(state.case, compose(state))
        self.runs += 1
        v = harness.run_backend(self.backend, state.case, device=self.device, tensors=tensors, keep_artifacts=True)
        if v.status == "skip":
            return None
        pat = rows.pattern(state.case, tensors, replay.maps_of(state.case, tensors, v))
        return tensors, v, pat


def _worst(case, tensors, maps: rows.RowMaps) -> tuple[list, list]:
    """Sequences and heads of the failing rows, worst first."""
    facts = rows.token_facts(case, tensors)
    seqs, heads = [], []
    ratio = maps.ratio if maps.ratio is not None else maps.lse_ratio
    if ratio is None:
        return seqs, heads
    flat = torch.nan_to_num(ratio, posinf=1e300).flatten()
    H = ratio.shape[1]
    for i in torch.argsort(flat, descending=True, stable=True).tolist():
        if float(flat[i]) <= 1:
            break
        t, h = divmod(i, H)
        if facts[t]["sequence"] not in seqs:
            seqs.append(facts[t]["sequence"])
        if h not in heads:
            heads.append(h)
    return seqs, heads


def minimize(b: bundle_mod.Bundle, backend, device="cpu", max_steps: int = 400, max_seconds: float = 300.0,
             log=None) -> Result:
    log = log or (lambda msg: None)
    backend = get_backend(backend) if isinstance(backend, str) else backend
    case = b.case
    if getattr(case, "unordered", False):
        raise MinimizeError(f"case {case.name} tests the batch order; its failure is the order itself, "
                            "nothing to minimise")
    first = replay.replay(b, backend, device)
    if first.status == "skip":
        raise MinimizeError(f"{backend.name} cannot run case {case.name}: {first.reason}")
    original = rows.pattern(case, b.tensors, replay.maps_of(case, b.tensors, first))
    if not original.failing:
        raise MinimizeError(f"the bundle passes on {backend.name}: nothing to minimise")
    log(f"original: {original.describe()}")
    search = _Search(backend, device, original, max_steps, max_seconds, log)
    state = decompose(dataclasses.replace(case, name=minimized_name(case.name)), b.tensors)
    got = search.evaluate(state)
    ok, why = (False, "the backend cannot run it") if got is None else got[2].same_as(original)
    if not ok:
        raise MinimizeError(f"re-paging the batch (same data, fresh block placement) changes the failure: {why}; "
                            "the failure depends on where blocks sit in the cache, which the minimiser keeps "
                            "only as the case seed's placement")
    tensors, verdict, pat = got
    accepted = []
    progress = True
    while progress and not search.out_of_budget():
        progress = False
        maps = replay.maps_of(state.case, tensors, verdict)
        worst_seq, worst_head = _worst(state.case, tensors, maps)
        for steps in (_sequence_steps(state, worst_seq), _head_steps(state, worst_head), _length_steps(state),
                      _head_size_steps(state), _block_size_steps(state)):
            for what, cand in steps:
                if search.out_of_budget():
                    break
                got = search.evaluate(cand)
                if got is None:
                    continue
                ok, why = got[2].same_as(original)
                log(f"  {'accept' if ok else 'reject'} {what}: {why}")
                if ok:
                    state, (tensors, verdict, pat) = cand, got
                    accepted.append(what)
                    progress = True
                    break
            if progress or search.stopped:
                break
    return Result(state, tensors, verdict, pat, original, search.runs, accepted, search.stopped)


def minimized_name(name: str) -> str:
    return name if name.endswith("-min") else f"{name}-min"


def write_result(result: Result, path, source: bundle_mod.Bundle, backend, device) -> None:
    case = result.state.case
    tensors_out, meta = bundle_mod.from_verdict(result.verdict, backend, case, device, tensors=result.tensors)
    meta["minimized"] = {"from_case": source.case.name, "from_backend": source.backend,
                         "summary": result.summary(), "steps": result.accepted, "runs": result.runs,
                         "stopped_early": result.stopped_early}
    bundle_mod.write(path, tensors_out, meta)
