"""Explicit floating-point arithmetic whose results do not depend on the machine.

Golden files must be a function of the case alone: the same bytes from any CPU, any
``ATEN_CPU_CAPABILITY`` level, any BLAS and any libm. Three things break that in plain torch:
low-precision kernels and casts (vectorised bf16/fp16 code rounds differently per ISA),
reductions (the summation order of ``sum``/``matmul`` depends on the vector width and the
BLAS), and transcendental functions (``exp``/``log``/``tanh`` come from different libraries).
This module avoids all three. It uses only float64 operations that IEEE 754 defines exactly
(elementwise ``+ - * /``, ``sqrt``, ``round``, comparisons) and integer bit manipulation:

* ``round_to(x, fmt)``: float64 ``x`` rounded to nearest-even in ``fmt`` (bf16, fp16, fp32,
  fp8 e4m3fn/e4m3fnuz), with subnormals, overflow to +-inf and NaN; the result is a float64
  holding a value of ``fmt`` exactly.
* ``exp``, ``expm1``, ``log``, ``tanh``, ``cos_2pi``: range reduction and polynomials made of
  those operations (a few float64 ulp; the same bits everywhere).
* ``sum_last``, ``contract``: reductions in one fixed order (blocks of 16 terms summed in a
  binary tree, the blocks accumulated one after another), with an optional rounding of the
  running sum after every block (how a tiled kernel accumulates in fp32).

Imports nothing of this project (the reference stays an independent oracle).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch

F64 = torch.float64


@dataclass(frozen=True)
class Format:
    """A binary floating-point format: ``precision`` significand bits (with the implicit one),
    smallest normal exponent ``min_exp`` (the smallest normal is 2**min_exp), largest finite value."""

    name: str
    precision: int
    min_exp: int
    max_finite: float

    @property
    def unit_roundoff(self) -> float:
        """u = 2**-precision: round-to-nearest moves a normal x by at most u*|x|."""
        return 2.0 ** -self.precision


BF16 = Format("bfloat16", 8, -126, float.fromhex("0x1.fep127"))
FP16 = Format("float16", 11, -14, 65504.0)
FP32 = Format("float32", 24, -126, float.fromhex("0x1.fffffep127"))
E4M3FN = Format("float8_e4m3fn", 4, -6, 448.0)
E4M3FNUZ = Format("float8_e4m3fnuz", 4, -7, 240.0)

FORMATS = {torch.bfloat16: BF16, torch.float16: FP16, torch.float32: FP32,
           torch.float8_e4m3fn: E4M3FN, torch.float8_e4m3fnuz: E4M3FNUZ}


def format_of(dtype: torch.dtype) -> Optional[Format]:
    """The Format of a torch dtype; None for float64 (nothing to round)."""
    if dtype == F64:
        return None
    if dtype not in FORMATS:
        raise ValueError(f"dtype: expected one of {sorted(str(d) for d in FORMATS)} or torch.float64, got {dtype}")
    return FORMATS[dtype]


# ---- exact powers of two and exponents (integer bit manipulation) ----------------------------

def pow2(k: torch.Tensor) -> torch.Tensor:
    """2**k exactly, for integer tensors k in [-1022, 1023] (built from the IEEE bit pattern)."""
    return ((k.to(torch.int64) + 1023) << 52).view(F64)


def _exponent(x: torch.Tensor) -> torch.Tensor:
    """e with |x| in [2**(e-1), 2**e) for normal float64 x (frexp's exponent); -1022 for
    zero and float64 subnormals (all far below any target format's subnormal range)."""
    biased = (x.view(torch.int64) >> 52) & 0x7FF
    return torch.clamp(biased, min=1) - 1022


_EXPONENT_BITS = 0x7FF << 52


def _scale2(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """x * 2**k for integer k in [-2044, 2046], in two exact steps (no overflow of pow2)."""
    k1 = torch.div(k, 2, rounding_mode="floor")
    return x * pow2(k1) * pow2(k - k1)


def round_to(x: torch.Tensor, fmt: Optional[Format]) -> torch.Tensor:
    """float64 x rounded to nearest, ties to even, in ``fmt`` (None: x unchanged).

    The spacing of ``fmt`` at |x| in [2**E, 2**(E+1)) is 2**(E + 1 - precision) (E no lower than
    ``min_exp``: the subnormal range). Adding S = 1.5 * 2**(E + 53 - precision) puts |x| + S in a
    float64 binade whose spacing is exactly that, so the one float64 rounding of the sum is the
    rounding to ``fmt`` (ties to even: S is an even multiple of it) and subtracting S back is
    exact. A result above ``max_finite`` is +-inf (IEEE overflow); NaN stays NaN; the sign of x
    is kept (zero included).

    Nine elementwise operations, each a pass over memory: the live oracle rounds its [B, H, Sq,
    Sk] scores hundreds of times per configuration, and on a GPU these passes were most of its
    time. A large CUDA tensor therefore goes through the same operations compiled into one
    kernel (``fused_rounding``; the same bits, tests/reference/test_fp.py).
    """
    x = x.to(F64)
    if fmt is None:
        return x
    if x.is_cuda and x.numel() >= FUSED_MIN_ELEMENTS and fused_rounding.enabled:
        return fused_rounding(x, fmt)
    return _round(x, *_round_constants(fmt))


def _round_constants(fmt: Format) -> tuple:
    """(lowest and highest exponent bits, the bits that turn them into S, max_finite) of ``fmt``:
    2**E comes from |x|'s exponent bits (float64 subnormals and zero: 2**min_exp), E capped where
    every format has long overflowed, so S stays finite."""
    return ((fmt.min_exp + 1023) << 52, (900 + 1023) << 52, ((53 - fmt.precision) << 52) | (1 << 51),
            fmt.max_finite)


def _round(x, lowest, highest, to_s, max_finite):
    """``round_to``'s nine operations; the constants are numbers (eager) or 0-d tensors (compiled)."""
    a = x.abs()
    s = (torch.clamp(a.view(torch.int64) & _EXPONENT_BITS, min=lowest, max=highest) + to_s).view(F64)
    y = (a + s) - s
    return torch.copysign(torch.where(y > max_finite, math.inf, y), x)


FUSED_MIN_ELEMENTS = 1 << 16  # below this a tensor is rounded eagerly (a launch costs more than the passes)


class _FusedRounding:
    """``_round`` under ``torch.compile`` for CUDA tensors: one kernel instead of nine passes.

    One graph serves every format and size (the tensor is flattened, dynamic, and the format's
    constants are 0-d tensors on its device). ``enabled`` is False when ``ATTNCHECK_EAGER_ROUNDING=1``
    or after a compilation failed (reported once on stderr): rounding is then eager, slower and
    the same bits.
    """

    def __init__(self, backend: str = "inductor"):
        self.enabled = os.environ.get("ATTNCHECK_EAGER_ROUNDING", "") != "1"
        self.backend = backend  # tests trace the same graph on the CPU with backend="eager"
        self._compiled = None
        self._constants = {}

    def _kernel(self):
        if self._compiled is None:
            self._compiled = torch.compile(_round, dynamic=True, fullgraph=True, backend=self.backend)
        return self._compiled

    def __call__(self, x: torch.Tensor, fmt: Format) -> torch.Tensor:
        key = (fmt, x.device)
        if key not in self._constants:
            lowest, highest, to_s, max_finite = _round_constants(fmt)
            ints = torch.tensor([lowest, highest, to_s], dtype=torch.int64, device=x.device)
            self._constants[key] = (*ints.unbind(), torch.tensor(max_finite, dtype=F64, device=x.device))
        try:
            return self._kernel()(x.reshape(-1), *self._constants[key]).view(x.shape)
        except Exception as e:  # an Inductor failure costs speed, never the result
            print(f"attncheck: compiled rounding failed ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                  "rounding eagerly", file=sys.stderr)
            self.enabled = False
            return _round(x, *_round_constants(fmt))


fused_rounding = _FusedRounding()


def representable(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """bool: is each float64 value exactly a (finite) value of ``fmt``?"""
    x = x.to(F64)
    return (round_to(x, fmt) == x) & x.abs().le(fmt.max_finite)


def quantize_fp8(x: torch.Tensor, scale: float, fmt: Format) -> torch.Tensor:
    """The stored fp8 value (as float64): RNE(clamp(fl32(x / fl32(scale)), -max, max)).

    The scale is a float32 and ``x / scale`` is rounded to float32 (kernels divide in float32;
    rounding the float64 quotient of two float32 values to float32 equals float32 division, as
    double rounding is innocuous for division when 53 >= 2 * 24 + 2). Saturation at +-max comes
    before the rounding, so values beyond max store +-max. e4m3fnuz has no negative zero: -0
    stores +0.
    """
    scale32 = float(round_to(torch.tensor([float(scale)], dtype=F64), FP32))
    q = round_to(x.to(F64) / scale32, FP32)
    q = torch.clamp(q, -fmt.max_finite, fmt.max_finite)
    q = round_to(q, fmt)
    if fmt is E4M3FNUZ:
        q = q + 0.0  # -0 + 0 = +0
    return q


# ---- elementary functions (float64, deterministic) ---------------------------------------------

# ln 2 = _LN2_HI + _LN2_LO to 2**-86 (fdlibm's split): _LN2_HI has its last 21 bits zero, so
# k * _LN2_HI is exact for the |k| < 1100 that occur here
_LN2_HI = float.fromhex("0x1.62e42feep-1")
_LN2_LO = float.fromhex("0x1.a39ef35793c76p-33")
_INV_LN2 = 1.0 / math.log(2.0)
_EXP_TERMS = [1.0 / math.factorial(n) for n in range(14)]  # Taylor to r**13 / 13!, |r| <= ln2/2
_EXPM1_TERMS = [1.0 / math.factorial(n) for n in range(1, 19)]  # w + ... + w**18/18!, |w| < 1/2
_LOG_TERMS = [1.0 / (2 * n + 1) for n in range(12)]  # atanh series of log((1+f)/(1-f)), |f| <= 0.172
_COS_TERMS = [(-1) ** n / math.factorial(2 * n) for n in range(17)]  # cos to x**32/32!, |x| <= pi


def _horner(coeffs, t: torch.Tensor) -> torch.Tensor:
    acc = torch.full_like(t, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = acc * t + c
    return acc


def exp(x: torch.Tensor) -> torch.Tensor:
    """e**x: x = k ln2 + r (Cody-Waite, |r| <= ln2/2), Taylor for e**r, times 2**k exactly."""
    x = x.to(F64)
    xc = torch.clamp(x, -746.0, 710.0).nan_to_num(0.0)
    k = torch.round(xc * _INV_LN2)
    r = (xc - k * _LN2_HI) - k * _LN2_LO
    y = _scale2(_horner(_EXP_TERMS, r), k.to(torch.int64))
    y = torch.where(x > 709.782712893384, torch.full_like(y, math.inf), y)
    y = torch.where(x < -745.2, torch.zeros_like(y), y)
    return torch.where(torch.isnan(x), x, y)


def expm1(x: torch.Tensor) -> torch.Tensor:
    """e**x - 1 without cancellation near 0 (Taylor below |x| = 1/2)."""
    x = x.to(F64)
    small = x.abs() < 0.5
    xs = torch.where(small, x, torch.zeros_like(x))
    series = xs * _horner(_EXPM1_TERMS, xs)
    return torch.where(small, series, exp(x) - 1.0)


def log(x: torch.Tensor) -> torch.Tensor:
    """Natural log: x = m 2**e with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh((m-1)/(m+1)).
    log 0 = -inf, log of a negative number = NaN, log inf = inf."""
    x = x.to(F64)
    ok = (x > 0) & torch.isfinite(x)
    xs = torch.where(ok, x, torch.ones_like(x))
    bits = xs.view(torch.int64)
    e = ((bits >> 52) & 0x7FF) - 1023  # inputs here are normal (sums of exponentials, LSEs)
    m = ((bits & 0x000FFFFFFFFFFFFF) | (1023 << 52)).view(F64)  # in [1, 2)
    big = m > math.sqrt(2.0)
    m = torch.where(big, m * 0.5, m)
    e = (e + big.to(torch.int64)).to(F64)
    f = (m - 1.0) / (m + 1.0)
    logm = 2.0 * f * _horner(_LOG_TERMS, f * f)
    y = e * _LN2_HI + (logm + e * _LN2_LO)
    y = torch.where(x == 0, torch.full_like(y, -math.inf), y)
    y = torch.where(x == math.inf, x, y)
    return torch.where((x < 0) | torch.isnan(x), torch.full_like(y, math.nan), y)


def tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh x = -expm1(-2|x|) / (2 + expm1(-2|x|)), with the sign of x."""
    x = x.to(F64)
    t = expm1(-2.0 * x.abs())
    return torch.copysign(-t / (2.0 + t), x)


def cos_2pi(t: torch.Tensor) -> torch.Tensor:
    """cos(2 pi t) for t in [0, 1] (Box-Muller's angle): t - round(t) is exact, then Taylor."""
    t = t.to(F64)
    x = (t - torch.round(t)) * (2.0 * math.pi)
    return _horner(_COS_TERMS, x * x)


# ---- fixed-order reductions ------------------------------------------------------------------

BLOCK = 16  # terms per accumulation step: the k-step of an MMA tile


def pairwise(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim (a power of two) in a fixed binary tree, float64."""
    while x.shape[-1] > 1:
        x = x[..., 0::2] + x[..., 1::2]
    return x[..., 0]


def _pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size:
        return x
    return torch.cat([x, x.new_zeros(*x.shape[:-1], size - x.shape[-1])], dim=-1)


def accumulate(blocks, acc: Optional[Format]) -> torch.Tensor:
    """A running sum of the block sums, rounded to ``acc`` after every block (None: float64)."""
    total = None
    for part in blocks:
        total = round_to(part if total is None else total + part, acc)
    return total


def sum_last(x: torch.Tensor, acc: Optional[Format] = None, block: int = BLOCK) -> torch.Tensor:
    """Sum over the last dim in a fixed order: blocks of ``block`` (a power of two) consecutive
    terms summed exactly in float64 (a binary tree), the blocks added one after another into an
    accumulator rounded to ``acc`` after each (how a tiled kernel accumulates in fp32; block 1:
    one term at a time)."""
    x = x.to(F64)
    n = x.shape[-1]
    if n == 0:
        return x.new_zeros(x.shape[:-1])
    return accumulate((pairwise(_pad_last(x[..., i:i + block], block)) for i in range(0, n, block)), acc)


def contract(spec: str, a: torch.Tensor, b: torch.Tensor, acc: Optional[Format] = None, block: int = BLOCK,
             round_products: bool = False) -> torch.Tensor:
    """``torch.einsum(spec, a, b)`` for a spec with exactly one summed index, in ``sum_last``'s
    fixed order: the products of each block of ``block`` index values (exact: einsum keeps the
    index, nothing is added; rounded to ``acc`` first if ``round_products``, as a kernel without
    fused multiply-add does) summed in a binary tree, the blocks accumulated in order into ``acc``."""
    lhs, out = spec.replace(" ", "").split("->")
    sa, sb = lhs.split(",")
    summed = (set(sa) | set(sb)) - set(out)
    if len(summed) != 1:
        raise ValueError(f"spec: expected exactly one summed index, got {spec!r}")
    (idx,) = summed
    ia, ib = sa.index(idx), sb.index(idx)
    keep = f"{sa},{sb}->{out}{idx}"
    a, b = a.to(F64), b.to(F64)
    n = a.shape[ia]

    def blocks():
        for i in range(0, n, block):
            w = min(block, n - i)
            products = torch.einsum(keep, a.narrow(ia, i, w), b.narrow(ib, i, w))
            if round_products:
                products = round_to(products, acc)
            yield pairwise(_pad_last(products, block))

    if n == 0:
        return torch.einsum(spec, a, b)
    return accumulate(blocks(), acc)
