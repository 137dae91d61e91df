"""Merge two partial attention results by their log-sum-exps (vLLM's ``merge_attn_states``).

Outputs are ``[T, H, D]`` (any strides), LSEs ``[H, T]`` float32, natural log. For each
(token, head) row::

    m = max(p, s)          (+inf read as -inf: FA2's marker for "no keys")
    wp = exp(p - m) / (exp(p - m) + exp(s - m)),  ws likewise
    out = prefix * wp + suffix * ws,  lse = m + log(exp(p - m) + exp(s - m))

Both sides empty (-inf) gives output 0 and LSE -inf, never NaN: the shift is 0 then, the
denominator is replaced by 1, and a side with zero weight is not even loaded (a NaN there
cannot leak through 0 * NaN).

Tiling: one program owns ``BLOCK_R`` flattened (token, head) rows x ``BLOCK_D`` channels (D
padded to a power of two with a mask, so D = 80 works); math in fp32.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from impl.triton import compat


@triton.jit
def _merge_kernel(out_ptr, out_lse_ptr, p_ptr, p_lse_ptr, s_ptr, s_lse_ptr,
                  num_rows, num_heads,
                  so_t, so_h, so_d, sp_t, sp_h, sp_d, ss_t, ss_h, ss_d,
                  spl_h, spl_t, ssl_h, ssl_t, sol_h, sol_t,
                  D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_LSE: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    r_ok = r < num_rows
    t = (r // num_heads).to(tl.int64)
    h = (r % num_heads).to(tl.int64)
    p = tl.load(p_lse_ptr + h * spl_h + t * spl_t, mask=r_ok, other=float("-inf"))
    s = tl.load(s_lse_ptr + h * ssl_h + t * ssl_t, mask=r_ok, other=float("-inf"))
    p = tl.where(p == float("inf"), float("-inf"), p)
    s = tl.where(s == float("inf"), float("-inf"), s)
    m = tl.maximum(p, s)
    shift = tl.where(m == float("-inf"), 0.0, m)
    ep = tl.exp(p - shift)
    es = tl.exp(s - shift)
    total = ep + es
    safe = tl.where(total > 0.0, total, 1.0)
    wp = ep / safe
    ws = es / safe
    d_ok = d < D
    mp = (r_ok & (wp > 0.0))[:, None] & d_ok[None, :]
    ms = (r_ok & (ws > 0.0))[:, None] & d_ok[None, :]
    po = tl.load(p_ptr + (t * sp_t + h * sp_h)[:, None] + d[None, :] * sp_d, mask=mp, other=0.0).to(tl.float32)
    so = tl.load(s_ptr + (t * ss_t + h * ss_h)[:, None] + d[None, :] * ss_d, mask=ms, other=0.0).to(tl.float32)
    out = po * wp[:, None] + so * ws[:, None]
    m_out = r_ok[:, None] & d_ok[None, :]
    tl.store(out_ptr + (t * so_t + h * so_h)[:, None] + d[None, :] * so_d,
             out.to(out_ptr.dtype.element_ty), mask=m_out)
    if WRITE_LSE:
        lse = tl.where(total > 0.0, tl.log(safe) + shift, float("-inf"))
        tl.store(out_lse_ptr + h * sol_h + t * sol_t, lse, mask=r_ok)


def _check_out(name, x, shape=None):
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"{name}: expected a [tokens, heads, head_size] tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{name}: dtype must be float16/bfloat16/float32, got {x.dtype}")
    if shape is not None and tuple(x.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape} like output, got {tuple(x.shape)}")


def _check_lse(name, x, h, t):
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != (h, t) or x.dtype != torch.float32:
        raise ValueError(f"{name}: expected float32 [H, T] = [{h}, {t}], got "
                         f"{(x.dtype, tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__}")


def merge_attn_states(output: torch.Tensor, prefix_output: torch.Tensor, prefix_lse: torch.Tensor,
                      suffix_output: torch.Tensor, suffix_lse: torch.Tensor,
                      output_lse: Optional[torch.Tensor] = None) -> None:
    """Write the merged output (and LSE if ``output_lse`` is given) in place; returns None."""
    _check_out("output", output)
    shape = tuple(output.shape)
    _check_out("prefix_output", prefix_output, shape)
    _check_out("suffix_output", suffix_output, shape)
    T, H, D = shape
    _check_lse("prefix_lse", prefix_lse, H, T)
    _check_lse("suffix_lse", suffix_lse, H, T)
    if output_lse is not None:
        _check_lse("output_lse", output_lse, H, T)
    for name, x in (("prefix_output", prefix_output), ("suffix_output", suffix_output), ("prefix_lse", prefix_lse),
                    ("suffix_lse", suffix_lse), ("output_lse", output_lse)):
        if x is not None and x.device != output.device:
            raise ValueError(f"{name}: on {x.device}, expected the device of output ({output.device})")
    if output.device.type != "cuda":
        compat.install()
    rows = T * H
    if rows == 0:
        return
    block_d = triton.next_power_of_2(D)
    if output.device.type == "cuda":
        block_r = max(1, min(64, 4096 // block_d))
    else:  # interpreter: few programs
        block_r = max(1, min(triton.next_power_of_2(rows), max(1, 16384 // block_d)))
    lse_out = output_lse if output_lse is not None else prefix_lse  # dummy pointer when not written
    _merge_kernel[(triton.cdiv(rows, block_r),)](
        output, lse_out, prefix_output, prefix_lse, suffix_output, suffix_lse, rows, H,
        *output.stride(), *prefix_output.stride(), *suffix_output.stride(),
        *prefix_lse.stride(), *suffix_lse.stride(), *lse_out.stride(),
        D=D, BLOCK_R=block_r, BLOCK_D=block_d, WRITE_LSE=output_lse is not None)
