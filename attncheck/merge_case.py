"""Merge cases: inputs and the float64 expected result of ``merge_attn_states``.

Two partial attention results (outputs [T, H, D] in the model dtype, LSE [H, T] float32)
with infinities placed by the case's pattern; the expected merge follows vLLM's semantics
(+inf LSE means an empty part, both empty gives output 0 and LSE -inf, never NaN).
"""

from __future__ import annotations

import torch

from attncheck.rule import rounding_step_rows
from reference import merge as ref_merge

CACHE_FIELDS = ()


def _pattern_masks(case, g):
    T, H = case.num_tokens, case.num_heads
    none = torch.zeros(H, T, dtype=torch.bool)
    every3 = torch.zeros(H, T, dtype=torch.bool)
    every3[:, ::3] = True
    rnd = torch.rand(H, T, generator=g) < 0.3
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
        r2 = torch.rand(H, T, generator=g) < 0.3
        r3 = torch.rand(H, T, generator=g) < 0.1
        return rnd, r2, r3 & ~rnd & ~r2, none
    raise ValueError(f"case {case.name}: unknown lse_pattern {p!r}")


def build_inputs(case) -> dict:
    g = torch.Generator().manual_seed(case.seed)
    T, H, D = case.num_tokens, case.num_heads, case.head_size
    dt = case.torch_dtype
    p_out = torch.randn((T, H, D), generator=g).to(dt)
    s_out = torch.randn((T, H, D), generator=g).to(dt)
    p_lse = torch.randn((H, T), generator=g) * 3.0
    s_lse = torch.randn((H, T), generator=g) * 3.0
    p_neg, s_neg, p_pos, s_pos = _pattern_masks(case, g)
    p_lse[p_neg] = float("-inf")
    s_lse[s_neg] = float("-inf")
    p_lse[p_pos] = float("inf")
    s_lse[s_pos] = float("inf")
    return {"prefix_output": p_out, "prefix_lse": p_lse, "suffix_output": s_out, "suffix_lse": s_lse}


def _merge_lowp(t: dict, dtype: torch.dtype) -> torch.Tensor:
    """The "pt" path of a merge: weights in float32 (LSEs are float32), the weighted sum in
    the model dtype, as a kernel would compute it."""
    p = t["prefix_lse"].float().nan_to_num(posinf=float("-inf"))
    s = t["suffix_lse"].float().nan_to_num(posinf=float("-inf"))
    m = torch.maximum(p, s)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    wp, ws = torch.exp(p - m), torch.exp(s - m)
    tot = wp + ws
    tot = torch.where(tot > 0, tot, torch.ones_like(tot))
    sp = (wp / tot).T.unsqueeze(-1).to(dtype)
    ss = (ws / tot).T.unsqueeze(-1).to(dtype)
    return t["prefix_output"] * sp + t["suffix_output"] * ss


def build_golden(case) -> dict:
    t = build_inputs(case)
    out, lse = ref_merge.merge_attn_states(t["prefix_output"].double(), t["prefix_lse"].double(),
                                           t["suffix_output"].double(), t["suffix_lse"].double())
    pt = _merge_lowp(t, case.torch_dtype).double()
    err = (pt - out).abs()
    t.update({
        "expected.output": out.float(), "expected.lse": lse.float(),
        "budget.pt_err_row": err.amax(-1).float(),
        "budget.round_row": rounding_step_rows(out, case.torch_dtype).float(),
        "budget.lse_pt_err": torch.zeros_like(lse, dtype=torch.float32),
        "budget.pt_err_mean": err.mean().float().reshape(()),
    })
    return t


def rule_factors(case) -> dict:
    return {"k_row": 2.0, "k_mean": 1.5}
