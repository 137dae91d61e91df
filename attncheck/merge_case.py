"""Merge cases: inputs and the float64 expected result of ``merge_attn_states``.

Two partial attention results (outputs [T, H, D] in the model dtype, LSE [H, T] float32)
with infinities placed by the case's pattern; the expected merge follows vLLM's semantics
(+inf LSE means an empty part, both empty gives output 0 and LSE -inf, never NaN). The budget
is reference.emulated.merge_states in the model dtype (weights and sum in float32, output
rounded), against the float64 merge; all of it the same bytes on every machine.
"""

from __future__ import annotations

import torch

from attncheck import budgets
from attncheck.draws import Draws
from reference import emulated as em
from reference import fp

CACHE_FIELDS = ()


def _pattern_masks(case, draws: Draws):
    T, H = case.num_tokens, case.num_heads
    none = torch.zeros(H, T, dtype=torch.bool)
    every3 = torch.zeros(H, T, dtype=torch.bool)
    every3[:, ::3] = True
    p = case.lse_pattern
    if p == "finite":
        return none, none, none, none
    if p == "prefix_neg_inf":
        return every3, none, none, none
    if p == "suffix_neg_inf":
        return none, every3, none, none
    if p == "both_neg_inf":
        return every3, every3, none, none
    if p == "prefix_pos_inf":
        return none, none, every3, none
    if p == "suffix_pos_inf":
        return none, none, none, every3
    if p == "pos_and_neg_inf":  # +inf on one side, -inf on the other, at the same rows
        return every3, none, none, every3
    if p == "mixed":
        rnd, r2, r3 = (draws.uniform((H, T)) < f for f in (0.3, 0.3, 0.1))
        return rnd, r2, r3 & ~rnd & ~r2, none
    raise ValueError(f"case {case.name}: unknown lse_pattern {p!r}")


def build_inputs(case) -> dict:
    draws = Draws(case.seed)
    T, H, D = case.num_tokens, case.num_heads, case.head_size
    dt, m = case.torch_dtype, fp.format_of(case.torch_dtype)
    p_out = fp.round_to(draws.normal((T, H, D)), m).to(dt)  # exact: model-dtype values
    s_out = fp.round_to(draws.normal((T, H, D)), m).to(dt)
    p_lse = budgets.to_float32(draws.normal((H, T), std=3.0))
    s_lse = budgets.to_float32(draws.normal((H, T), std=3.0))
    p_neg, s_neg, p_pos, s_pos = _pattern_masks(case, draws)
    p_lse[p_neg] = float("-inf")
    s_lse[s_neg] = float("-inf")
    p_lse[p_pos] = float("inf")
    s_lse[s_pos] = float("inf")
    return {"prefix_output": p_out, "prefix_lse": p_lse, "suffix_output": s_out, "suffix_lse": s_lse}


def build_golden(case) -> dict:
    t = build_inputs(case)
    parts = (t["prefix_output"], t["prefix_lse"], t["suffix_output"], t["suffix_lse"])
    out, lse = em.merge_states(*parts)
    pt = em.merge_states(*parts, dtype=case.torch_dtype)
    t.update(budgets.assemble((out, lse), [(*pt, out, lse)], [], torch.zeros_like(lse), case.torch_dtype,
                              output_step=em.merge_step(*parts)))
    t.update({"expected.output": budgets.to_float32(out), "expected.lse": budgets.to_float32(lse)})
    return t


def rule_factors(case) -> dict:
    return {"k_row": 2.0, "k_mean": 1.5}
