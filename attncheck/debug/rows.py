"""Per-row error maps of one run, and the failing *pattern* that replay and minimise compare.

``row_maps`` recomputes, for every row (query token, head), what the rule judged: the output
error over its budget (``attncheck.rule.row_ratios``, infinite where the output is NaN/Inf),
the LSE error over its budget (``rule.lse_row_ratios``) and, per new token, whether each cache
write holds the expected bytes. The rule itself stays the gate; these maps only show where.

A failing pattern is (1) the set of *localized* checks that fail (output rows, non-finite
output, LSE rows, cache writes; the mean rule is left out because it is not localized and
grows or shrinks with the batch) and (2) the row *traits* shared by every failing row but not
by every row of the batch, such as "the last query row of its sequence" or "query head 0 of its
GQA group". Another run shows the same pattern when the same localized checks fail and every
one of its failing rows still has each of those traits (sequence, token and head numbers may
change: the traits are positions relative to the sequence, the KV block and the head group).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from attncheck import golden
from attncheck import rule

# trait name -> how a summary says it, completing "every failing row ..."
TRAITS = {
    "last_query": "is the last query row of its sequence (the one that sees the last key)",
    "inner_query": "is a query row before the last of its sequence",
    "decode": "is a decode row (q_len 1)",
    "extend": "is an extend row (new tokens over a context)",
    "prefill": "is a prefill row (no context)",
    "single_key_block": "ends in a KV block where it sees a single key (a single-key last block)",
    "full_block": "ends on the last key of a full KV block",
    "first_sequence": "is in the batch's first sequence",
    "last_sequence": "is in the batch's last sequence",
    "head0_in_group": "is query head 0 of its GQA group",
    "first_kv_group": "is in KV head 0's group",
    "window_cut": "has a sliding window that leaves early keys out",
}


def describe_traits(traits) -> str:
    if not traits:
        return "no row trait is shared by all failing rows"
    return "every failing row " + ", and ".join(TRAITS[t] for t in sorted(traits))


LOCALIZED = ("output", "finite", "lse")  # plus "cache:<field>" and "error:<type>"


@dataclass
class RowMaps:
    ratio: Optional[torch.Tensor]  # [T, H] output error / budget (inf: NaN/Inf output)
    lse_ratio: Optional[torch.Tensor]  # [T, H] (transposed from the [H, T] LSE layout)
    cache_bad: dict  # field -> bool [T]: the token's slot does not hold the expected bytes
    cache_stray: dict  # field -> int: slots that changed although no new token maps to them
    nonfinite: Optional[torch.Tensor]  # bool [T, H]
    mean_failed: bool = False
    error: str = ""  # exception type when the run raised

    def failing_checks(self) -> set:
        out = set()
        if self.error:
            out.add(f"error:{self.error}")
        if self.ratio is not None and bool((self.ratio > 1).any()):
            out.add("output")
        if self.nonfinite is not None and bool(self.nonfinite.any()):
            out.add("finite")
        if self.lse_ratio is not None and bool((self.lse_ratio > 1).any()):
            out.add("lse")
        for name, bad in self.cache_bad.items():
            if bool(bad.any()) or self.cache_stray.get(name):
                out.add(f"cache:{name}")
        return out

    def failing_rows(self) -> list:
        """(token, head) pairs over budget in the output or the LSE; (token, None) for a
        cache write that went wrong (cache rows have no head)."""
        rows = set()
        for m in (self.ratio, self.lse_ratio):
            if m is not None:
                rows |= {(int(t), int(h)) for t, h in (m > 1).nonzero().tolist()}
        for bad in self.cache_bad.values():
            rows |= {(int(t), None) for t in bad.nonzero().flatten().tolist()}
        return sorted(rows, key=lambda r: (r[0], -1 if r[1] is None else r[1]))


def _cache_rows(before_name, after: torch.Tensor, tensors: dict, expected_name: str):
    slots = tensors["slot_mapping"].cpu().long()
    after = after.detach().cpu()
    tail = tuple(after.shape[2:])
    flat_after = after.reshape(-1, *tail)
    got = flat_after[slots].contiguous().view(torch.uint8).reshape(len(slots), -1)
    want = tensors[expected_name].cpu().contiguous().view(torch.uint8).reshape(len(slots), -1)
    bad = (got != want).any(dim=1) if got.shape == want.shape else torch.ones(len(slots), dtype=torch.bool)
    before = tensors[before_name].cpu()
    flat_before = before.reshape(-1, *tail).contiguous().view(torch.uint8).reshape(flat_after.shape[0], -1)
    untouched = torch.ones(flat_after.shape[0], dtype=torch.bool)
    untouched[slots] = False
    now = flat_after.contiguous().view(torch.uint8).reshape(flat_after.shape[0], -1)
    stray = int((now[untouched] != flat_before[untouched]).any(dim=1).sum())
    return bad, stray


def row_maps(case, tensors: dict, actual: dict, error: str = "") -> RowMaps:
    """The maps of one run: ``tensors`` = inputs + expected + budgets, ``actual`` = what the
    backend returned ("output", "lse", and the caches after the run by field name)."""
    module = golden.case_module(case)
    factors = module.rule_factors(case)
    maps = RowMaps(ratio=None, lse_ratio=None, cache_bad={}, cache_stray={}, nonfinite=None, error=error)
    ref = tensors["expected.output"].to(torch.float64)
    out = actual.get("output")
    if out is not None and tuple(out.shape) == tuple(ref.shape):
        o = out.detach().to("cpu", torch.float64)
        nonfinite = ~torch.isfinite(o)
        o = torch.where(nonfinite, torch.zeros_like(o), o)
        err = (o - ref).abs()
        _, _, ratio = rule.row_ratios(err, tensors, factors["k_row"])
        row_nonfinite = nonfinite.any(dim=-1)
        maps.nonfinite = row_nonfinite
        maps.ratio = torch.where(row_nonfinite, torch.full_like(ratio, float("inf")), ratio)
        maps.mean_failed = float(err.mean()) > rule.mean_budget(tensors, factors["k_mean"])
    lse = actual.get("lse")
    if lse is not None and "expected.lse" in tensors and tuple(lse.shape) == tuple(tensors["expected.lse"].shape):
        lr = rule.lse_row_ratios(lse.detach().to("cpu", torch.float64), tensors, factors["k_row"])
        maps.lse_ratio = lr.T.contiguous()
    for field_name, expected_name in module.CACHE_FIELDS:
        if field_name in actual and expected_name in tensors:
            maps.cache_bad[field_name], maps.cache_stray[field_name] = _cache_rows(
                field_name, actual[field_name], tensors, expected_name)
    return maps


# ---- where a row lives --------------------------------------------------------------------------

def group_size(case) -> int:
    """Query heads per KV head (MLA: every head reads the one latent)."""
    return case.num_heads // getattr(case, "num_kv_heads", 1) if hasattr(case, "num_kv_heads") else case.num_heads


def token_facts(case, tensors: dict) -> list:
    """Per query token: sequence, position, q_len, seq_len, row kind, last visible key, window start."""
    qsl = tensors["query_start_loc"].tolist()
    slens = tensors["seq_lens"].tolist()
    bs = case.block_size
    causal = getattr(case, "causal", True)
    window = getattr(case, "sliding_window", None)
    facts = []
    for b in range(len(slens)):
        q_len = qsl[b + 1] - qsl[b]
        kind = "decode" if q_len == 1 else ("extend" if slens[b] > q_len else "prefill")
        for i in range(q_len):
            pos = slens[b] - q_len + i
            last = pos if causal else slens[b] - 1
            first = max(0, pos - window + 1) if window else 0
            facts.append({"sequence": b, "position": pos, "q_len": q_len, "seq_len": slens[b], "kind": kind,
                          "last_key": last, "first_key": first, "block_size": bs,
                          "num_seqs": len(slens)})
    return facts


def _traits_of(fact: dict, head: Optional[int], case) -> set:
    t = set()
    t.add("last_query" if fact["position"] == fact["seq_len"] - 1 else "inner_query")
    t.add(fact["kind"])
    bs = fact["block_size"]
    if fact["last_key"] % bs == 0:
        t.add("single_key_block")
    if fact["last_key"] % bs == bs - 1:
        t.add("full_block")
    if fact["sequence"] == 0:
        t.add("first_sequence")
    if fact["sequence"] == fact["num_seqs"] - 1:
        t.add("last_sequence")
    if fact["first_key"] > 0:
        t.add("window_cut")
    if head is not None:
        g = group_size(case)
        if head % g == 0:
            t.add("head0_in_group")
        if head // g == 0:
            t.add("first_kv_group")
    return t


@dataclass(frozen=True)
class Pattern:
    checks: frozenset
    traits: frozenset = field(default_factory=frozenset)  # shared by the failing rows, not by all rows
    shared: frozenset = field(default_factory=frozenset)  # shared by the failing rows (may be universal)
    num_rows: int = 0

    @property
    def failing(self) -> bool:
        return bool(self.checks)

    def describe(self) -> str:
        if not self.checks:
            return "passes"
        checks = ", ".join(sorted(self.checks))
        return f"fails {checks}; {describe_traits(self.traits)}"

    def same_as(self, original: "Pattern") -> tuple[bool, str]:
        """Does this run (``self``) fail the way ``original`` did?"""
        if not self.checks:
            return False, "it passes"
        if self.checks != original.checks:
            return False, f"other checks fail ({', '.join(sorted(self.checks))} instead of {', '.join(sorted(original.checks))})"
        lost = original.traits - self.shared
        if lost:
            return False, "failing rows lost the trait(s): " + ", ".join(sorted(lost))
        return True, "same checks fail and every failing row keeps the original traits"


def pattern(case, tensors: dict, maps: RowMaps) -> Pattern:
    checks = frozenset(maps.failing_checks())
    rows = maps.failing_rows()
    if not rows:
        return Pattern(checks)
    facts = token_facts(case, tensors)
    num_heads = maps.ratio.shape[1] if maps.ratio is not None else case.num_heads
    shared = None
    for t, h in rows:
        tr = _traits_of(facts[t], h, case)
        shared = tr if shared is None else shared & tr
    # a trait every row of the batch has says nothing about where the failure is
    universal = None
    for t, fact in enumerate(facts):
        for h in range(num_heads):
            tr = _traits_of(fact, h, case)
            universal = tr if universal is None else universal & tr
    return Pattern(checks, frozenset(shared - (universal or set())), frozenset(shared), len(rows))
