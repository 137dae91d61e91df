"""The error budgets a golden stores, from the float64 pipelines and their emulated
low-precision ("pt") variants (reference.emulated). One place for what every case kind stores;
golden/README.md ("Budgets") gives the error analysis behind each term.

    budget.pt_err_row  [T, H]  max over the variants of max_d |pt - exact|, each variant against
                               the float64 result of its own pipeline (pure rounding noise)
    budget.pt_err_mean []      max over the variants of mean |pt - exact|
    budget.round_row   [T, H]  rounding step of the reference in the output dtype (FA3's trick)
    budget.pipeline_row [T, H] max_d (|exact_X - reference| + chain_X) over the legitimate
                               pipelines X (fp8: new tokens attended unquantised instead of read
                               back from the cache; a chunked context merged in order; 0 where
                               every pipeline sees the same keys); chain_X: the worst case of X's
                               model-dtype partials in a merge chain
                               (reference.emulated.merge_chain_step), 0 without one
    budget.pipeline_mean []    max over X of mean (|exact_X - reference| + chain_X)
    budget.lse_pt_err  [H, T]  max over the variants of |lse_pt - lse_exact|
    budget.lse_pipeline [H, T] max over X of |lse_X - lse_reference|
    budget.lse_step    [H, T]  2 u (B_Q + B_S): the LSE change that rounding the query operand
                               (any pre-scaling) and the scores twice each in the model dtype
                               (unit roundoff u) can cause, to first order in the worst case
                               (reference.emulated.lse_sensitivity)
    budget.out_step    [T, H]  max_d of u32 * reference.emulated.output_step: what the float32
                               arithmetic of any correct kernel (its not correctly rounded exp
                               and tanh, its op order on the scores, its summation order) can
                               do to the output, which the pt variants carry as one realisation
                               at most (MHA, and merge with
                               reference.emulated.merge_step; 0 where a golden has none)
    budget.out_step_mean []    the mean of u32 * output_step over every element
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from reference import fp

F64 = torch.float64
LSE_ROUNDINGS = 2  # model-dtype roundings of the query operand, and of the scores (see lse_step)


def rounding_step_rows(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per row (max over the last dim): the rounding step at the reference's magnitude in
    ``dtype``, FA3's ``|(r + 0.3) - 0.3 - r|`` evaluated in that dtype (0.3 as a float32), with
    every rounding written out (reference.fp) so it is the same on every machine."""
    fmt = fp.format_of(dtype)
    c = float(fp.round_to(torch.tensor([0.3], dtype=F64), fp.FP32))
    r = fp.round_to(ref.to(F64), fmt)
    step = (fp.round_to(fp.round_to(r + c, fmt) - c, fmt) - r).abs()
    return step.amax(dim=-1)


def _lse_err(lse: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|lse - exact|, 0 where both are the same infinity (an empty row)."""
    err = (lse.to(F64) - exact.to(F64)).abs()
    return torch.where(torch.isinf(exact) & (lse.to(F64) == exact.to(F64)), torch.zeros_like(err), err)


def _mean(x: torch.Tensor) -> torch.Tensor:
    """Mean in a fixed order (reference.fp.sum_last over the flattened tensor)."""
    flat = x.reshape(1, -1)
    return (fp.sum_last(flat)[0] / max(1, flat.shape[1])) if flat.shape[1] else torch.zeros((), dtype=F64)


def assemble(reference: tuple, variants: Sequence[tuple], pipelines: Sequence[tuple], lse_step: torch.Tensor,
             dtype: torch.dtype, fixed_order: bool = True, output_step: Optional[torch.Tensor] = None) -> dict:
    """The budget.* tensors (float32).

    ``reference`` = (out [T, H, D], lse [H, T]) float64; ``variants`` = ((pt_out, pt_lse,
    exact_out, exact_lse), ...) with each pt variant next to the float64 result of its own
    pipeline; ``pipelines`` = ((exact_out, exact_lse[, chain]), ...) of every legitimate pipeline
    other than the reference's own (may be empty; ``chain`` [T, H, D] absolute: the pipeline's
    merge-chain bound); ``lse_step`` [H, T]; ``output_step`` [T, H, D] in
    units of the float32 unit roundoff (reference.emulated.output_step), or None.
    ``fixed_order=False`` (the live tiers) takes means with torch's own summation.
    """
    mean = _mean if fixed_order else (lambda x: x.to(F64).mean())
    ref_out, ref_lse = reference
    row = mean_err = lse_err = None
    for pt_out, pt_lse, ex_out, ex_lse in variants:
        err = (pt_out.to(F64) - ex_out.to(F64)).abs()
        r, m, l = err.amax(dim=-1), mean(err), _lse_err(pt_lse, ex_lse)
        row = r if row is None else torch.maximum(row, r)
        mean_err = m if mean_err is None else torch.maximum(mean_err, m)
        lse_err = l if lse_err is None else torch.maximum(lse_err, l)
    pipe_row = torch.zeros_like(row)
    pipe_mean = torch.zeros((), dtype=F64, device=row.device)
    pipe_lse = torch.zeros_like(lse_err)
    for ex_out, ex_lse, *chain in pipelines:
        diff = (ex_out.to(F64) - ref_out.to(F64)).abs() + (chain[0].to(F64) if chain else 0.0)
        pipe_row = torch.maximum(pipe_row, diff.amax(dim=-1))
        pipe_mean = torch.maximum(pipe_mean, mean(diff))
        pipe_lse = torch.maximum(pipe_lse, _lse_err(ex_lse, ref_lse))
    out = {
        "budget.pt_err_row": row,
        "budget.pt_err_mean": mean_err.reshape(()),
        "budget.round_row": rounding_step_rows(ref_out, dtype),
        "budget.pipeline_row": pipe_row,
        "budget.pipeline_mean": pipe_mean.reshape(()),
        "budget.lse_pt_err": lse_err,
        "budget.lse_pipeline": pipe_lse,
        "budget.lse_step": lse_step.to(F64),
    }
    if output_step is not None:
        u32 = fp.FP32.unit_roundoff
        out["budget.out_step"] = output_step.to(F64).amax(dim=-1) * u32
        out["budget.out_step_mean"] = (mean(output_step.to(F64)) * u32).reshape(())
    return {k: to_float32(v) for k, v in out.items()}


def lse_step(sensitivity: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``LSE_ROUNDINGS * u * (B_Q + B_S)`` (reference.emulated.lse_sensitivity): a legitimate
    kernel may round the query operand twice (MLA: ql, then any pre-scaling) and the scores twice
    (e.g. q.k, then times the scale) in the model dtype, with unit roundoff u; 0 for float64."""
    fmt = fp.format_of(dtype)
    u = 0.0 if fmt is None else fmt.unit_roundoff
    return sensitivity.to(F64) * (LSE_ROUNDINGS * u)


def to_float32(x: torch.Tensor) -> torch.Tensor:
    """float64 -> float32 with the rounding written out (reference.fp), then an exact cast."""
    return fp.round_to(x.to(F64), fp.FP32).to(torch.float32)


def model_values(x: torch.Tensor, dtype: torch.dtype, device: Optional[torch.device] = None) -> torch.Tensor:
    """float64 values rounded to ``dtype`` (written out), as a ``dtype`` tensor (exact cast)."""
    y = fp.round_to(x.to(F64), fp.format_of(dtype)).to(dtype)
    return y if device is None else y.to(device)


HOST_METADATA = ("query_start_loc", "seq_lens")  # sizes the reference reads on the host (_row_blocks)


def oracle_inputs(tensors: dict, device: torch.device) -> dict:
    """A case's tensors where the oracle computes: everything on ``device`` but the sequence
    bookkeeping, which the reference reads as Python numbers and which, on a GPU, would cost a
    host sync at every read (each one waits for all the work queued by every process sharing it)."""
    return {k: v.cpu() if k in HOST_METADATA else v.to(device) for k, v in tensors.items()}
