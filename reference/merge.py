"""Merging two partial attention results by their log-sum-exps (vLLM's merge_attn_states).

Two results over disjoint key sets, (o_p, lse_p) and (o_s, lse_s), combine exactly:

    m   = max(lse_p, lse_s)
    w_p = exp(lse_p - m),  w_s = exp(lse_s - m)
    out = o_p * w_p / (w_p + w_s) + o_s * w_s / (w_p + w_s)
    lse = m + log(w_p + w_s)

Shapes follow vLLM: outputs [T, H, D], LSEs [H, T], natural log. An LSE of +inf (FA2's
marker for "no keys") is read as -inf. When both sides are empty (-inf) the result is output 0
and LSE -inf, never NaN. A side with zero weight contributes exactly 0 (its output is not read,
so garbage there cannot leak).
"""

from __future__ import annotations

import torch


def _empty_as_neg_inf(lse: torch.Tensor) -> torch.Tensor:
    return torch.where(lse == float("inf"), torch.full_like(lse, float("-inf")), lse)


def _weighted(out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out [T, H, D] * weight [H, T], with weight 0 giving exactly 0 whatever out holds."""
    w = weight.transpose(0, 1)[:, :, None]
    product = out * w
    return torch.where(w > 0, product, torch.zeros_like(product))


def merge_attn_states(prefix_out: torch.Tensor, prefix_lse: torch.Tensor, suffix_out: torch.Tensor,
                      suffix_lse: torch.Tensor):
    """(out [T, H, D] in prefix_out's dtype, lse [H, T] in the LSE dtype).

    The weights are computed in the wider of the output and LSE dtypes.
    """
    if prefix_out.dim() != 3 or prefix_out.shape != suffix_out.shape:
        raise ValueError(f"suffix_out: expected the shape of prefix_out [T, H, D] {tuple(prefix_out.shape)}, "
                         f"got {tuple(suffix_out.shape)}")
    t, h, _ = prefix_out.shape
    for name, lse in (("prefix_lse", prefix_lse), ("suffix_lse", suffix_lse)):
        if tuple(lse.shape) != (h, t):
            raise ValueError(f"{name}: expected [H, T] = [{h}, {t}], got {tuple(lse.shape)}")
    work = torch.promote_types(prefix_out.dtype, prefix_lse.dtype)
    p = _empty_as_neg_inf(prefix_lse.to(work))
    s = _empty_as_neg_inf(suffix_lse.to(work))
    m = torch.maximum(p, s)
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # both empty: any finite shift
    w_p, w_s = torch.exp(p - shift), torch.exp(s - shift)
    total = w_p + w_s
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    out = _weighted(prefix_out.to(work), w_p / safe_total) + _weighted(suffix_out.to(work), w_s / safe_total)
    lse = torch.log(total) + shift  # log 0 = -inf when both are empty
    return out.to(prefix_out.dtype), lse.to(prefix_lse.dtype)
