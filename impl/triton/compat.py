"""Compatibility layer for running the project's Triton kernels under the Triton interpreter.

The Triton 3.9 interpreter (``TRITON_INTERPRET=1``) has arithmetic defects that would make a
correct kernel look wrong on the CPU (research/aiter-kernels.md section 2):

* bf16 tensors are stored as raw uint16 bit patterns and ``tl.dot``, elementwise ops,
  ``tl.sum``/``tl.min``/``tl.max`` and casts run numpy on those bits (results ~1e9 wrong);
  fp32 -> bf16 casts also truncate instead of rounding to nearest even.
* fp32/fp16/bf16 -> fp8 casts round the mantissa up without carrying into the exponent
  (e4m3 31.66 -> 16 instead of 32; about 2.5 % of random values are wrong).

Each defect is fixed by one small, named patch of ``triton.runtime.interpreter`` (class-level,
process-wide). A patch is applied only when the interpreter is active and a probe shows the
installed Triton really has the defect, so a fixed Triton is left alone. Defects that cannot be
patched are described in ``INTERPRETER_DEFECTS`` (use the text as a skip reason).

API (kept stable; other kernel owners call it)::

    install(names=None, force=False) -> tuple[str, ...]   # idempotent; names applied so far
    uninstall(names=None)                                  # revert (tests)
    disabled(*names)                                       # context manager: temporarily revert
    applied() -> tuple[str, ...]; describe() -> str
    PATCH_NAMES, INTERPRETER_DEFECTS, is_interpreter()

Switch patches off with ``ATTNCHECK_COMPAT_DISABLE=bf16_dot,fp8_cast`` (or ``all``).
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional

import numpy as np
import torch

# Text of every known interpreter defect, patched or not; keys are stable.
INTERPRETER_DEFECTS: Dict[str, str] = {
    "bf16_dot": "Triton interpreter: tl.dot on bf16 multiplies the raw uint16 bit patterns "
                "(triton-lang/triton#11584)",
    "bf16_elementwise": "Triton interpreter: bf16 elementwise arithmetic (add/mul/exp/where-free "
                        "ops, fma, clamp) runs numpy on uint16 bit patterns (triton#10945)",
    "bf16_reduce": "Triton interpreter: tl.sum/tl.min/tl.max on bf16 reduce the uint16 bit "
                   "patterns (triton#11604)",
    "bf16_cast": "Triton interpreter: casts to/from bf16 other than bf16<->fp32 reinterpret bits, "
                 "and fp32->bf16 truncates instead of rounding to nearest even",
    "fp8_cast": "Triton interpreter: fp32/fp16/bf16 -> fp8 casts round the mantissa up without "
                "carrying into the exponent (~2.5% of values wrong, e.g. e4m3 31.66 -> 16)",
    "python_and": "Triton interpreter: Python `and`/`or` between tensors keeps Python semantics "
                  "(returns an operand) instead of a logical and; kernels must use & and |",
    "sequential_programs": "Triton interpreter: programs run one at a time in pid order, so races "
                           "are invisible and programs that wait on later ones deadlock",
    "fnuz_on_cuda": "CUDA Triton has no float8_e4m3fnuz; fnuz fp8 KV runs only under the interpreter",
}

_LOCK = threading.RLock()


def is_interpreter() -> bool:
    """True when Triton kernels in this process run through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _interp():
    import triton.runtime.interpreter as interp  # noqa: PLC0415 (lazy: importing triton is slow)
    return interp


def _tl():
    import triton.language as tl  # noqa: PLC0415
    return tl


# ---- bf16 helpers ------------------------------------------------------------------------------

def _is_bf16(dtype) -> bool:
    tl = _tl()
    return getattr(dtype, "scalar", dtype) == tl.bfloat16


def _bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """uint16 bf16 bit patterns -> exact float32 values."""
    return (np.asarray(bits).astype(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def _to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float (any width) -> bf16 bit patterns, round to nearest even (torch does it exactly)."""
    arr = np.ascontiguousarray(values)
    if arr.dtype == np.bool_ or arr.dtype.kind in "iu":
        arr = arr.astype(np.float64)
    t = torch.from_numpy(arr).to(torch.bfloat16).view(torch.int16)
    return t.numpy().view(np.uint16).reshape(np.shape(values))


def _widen(handle):
    """A TensorHandle's data as float32 if it is bf16, else the data unchanged."""
    if _is_bf16(handle.dtype):
        return _bf16_bits_to_f32(handle.data)
    return handle.data


# ---- patch definitions ---------------------------------------------------------------------------

@dataclass
class _Patch:
    name: str
    targets: tuple  # ((owner_getter, attr), ...)
    make: Callable[[dict], dict]  # originals -> {attr: replacement}
    probe: Callable[[], bool]  # True when the unpatched interpreter has the defect
    originals: Optional[dict] = None


def _builder_cls():
    return _interp().InterpreterBuilder


def _reduce_cls():
    return _interp().ReduceOps


def _make_bf16_dot(orig):
    tl = _tl()
    TensorHandle = _interp().TensorHandle
    od = orig["create_dot"]

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if not (_is_bf16(a.dtype) or _is_bf16(b.dtype) or _is_bf16(d.dtype)):
            return od(self, a, b, d, input_precision, max_num_imprecise_acc)
        # Products of bf16 values are exact in fp32; accumulate in fp32 like the GPU does.
        fa = TensorHandle(_widen(a), tl.float32) if _is_bf16(a.dtype) else a
        fb = TensorHandle(_widen(b), tl.float32) if _is_bf16(b.dtype) else b
        if _is_bf16(d.dtype):
            fd = TensorHandle(_widen(d), tl.float32)
            out = od(self, fa, fb, fd, input_precision, max_num_imprecise_acc)
            return TensorHandle(_to_bf16_bits(out.data), tl.bfloat16)
        return od(self, fa, fb, d, input_precision, max_num_imprecise_acc)

    return {"create_dot": create_dot}


def _make_bf16_elementwise(orig):
    tl = _tl()
    TensorHandle = _interp().TensorHandle
    ob, ou, ot, of = orig["binary_op"], orig["unary_op"], orig["ternary_op"], orig["create_fma"]
    oe, orr = orig["create_erf"], orig["create_rsqrt"]

    def _back(out, like_bf16):
        if like_bf16 and out.data.dtype != np.bool_:
            return TensorHandle(_to_bf16_bits(out.data), tl.bfloat16)
        return out

    def _f32(h):
        return TensorHandle(_widen(h), tl.float32) if _is_bf16(h.dtype) else h

    def binary_op(self, lhs, rhs, op):
        if _is_bf16(lhs.dtype) or _is_bf16(rhs.dtype):
            return _back(ob(self, _f32(lhs), _f32(rhs), op), True)
        return ob(self, lhs, rhs, op)

    def unary_op(self, arg, op):
        if _is_bf16(arg.dtype):
            return _back(ou(self, _f32(arg), op), True)
        return ou(self, arg, op)

    def ternary_op(self, lhs, rhs, other, op):
        # np.where (select) copies bit patterns, which is already right; clip is arithmetic.
        if op is not np.where and (_is_bf16(other.dtype) or _is_bf16(lhs.dtype)):
            return _back(ot(self, _f32(lhs), _f32(rhs), _f32(other), op), True)
        return ot(self, lhs, rhs, other, op)

    def create_fma(self, x, y, z):
        if _is_bf16(z.dtype) or _is_bf16(x.dtype):
            return _back(of(self, _f32(x), _f32(y), _f32(z)), True)
        return of(self, x, y, z)

    def create_erf(self, arg):
        if _is_bf16(arg.dtype):
            return _back(oe(self, _f32(arg)), True)
        return oe(self, arg)

    def create_rsqrt(self, arg):
        if _is_bf16(arg.dtype):
            return _back(orr(self, _f32(arg)), True)
        return orr(self, arg)

    return {"binary_op": binary_op, "unary_op": unary_op, "ternary_op": ternary_op,
            "create_fma": create_fma, "create_erf": create_erf, "create_rsqrt": create_rsqrt}


def _make_bf16_reduce(orig):
    tl = _tl()
    interp = _interp()
    TensorHandle = interp.TensorHandle
    osum, omm = orig["sum"], orig["min_max"]

    def _bf16_tensor(values):
        bits = _to_bf16_bits(np.asarray(values, dtype=np.float32))
        if np.ndim(values) > 0:
            return tl.core.tensor(TensorHandle(bits, tl.bfloat16), tl.block_type(tl.bfloat16, list(bits.shape)))
        return tl.core.tensor(TensorHandle(bits.reshape(1), tl.bfloat16), tl.bfloat16)

    def _f32_tensor(t):
        data = _bf16_bits_to_f32(t.handle.data)
        ty = tl.block_type(tl.float32, list(data.shape)) if t.type.is_block() else tl.float32
        return tl.core.tensor(TensorHandle(data, tl.float32), ty)

    def sum(self, input):  # noqa: A001 (mirrors the interpreter's method name)
        if _is_bf16(input.dtype):
            res = osum(self, _f32_tensor(input))
            return _bf16_tensor(res.handle.data if res.type.is_block() else res.handle.data[0])
        return osum(self, input)

    def min_max(self, input, val_reduce_op, idx_reduce_op=None):
        inp = input[0] if isinstance(input, tuple) else input
        if not _is_bf16(inp.dtype):
            return omm(self, input, val_reduce_op, idx_reduce_op)
        res = omm(self, _f32_tensor(inp), val_reduce_op, idx_reduce_op)
        if val_reduce_op is None:
            return res
        val = res[0] if idx_reduce_op is not None else res
        val = _bf16_tensor(val.handle.data if val.type.is_block() else val.handle.data[0])
        return (val, res[1]) if idx_reduce_op is not None else val

    return {"sum": sum, "min_max": min_max}


def _make_bf16_cast(orig):
    tl = _tl()
    TensorHandle = _interp().TensorHandle
    oc = orig["cast_impl"]

    def cast_impl(self, src, dst_type):
        s_bf16, d_bf16 = _is_bf16(src.dtype), _is_bf16(dst_type)
        if not (s_bf16 or d_bf16):
            return oc(self, src, dst_type)
        if s_bf16 and d_bf16:
            return TensorHandle(src.data, tl.bfloat16)
        if s_bf16:  # widen exactly, then the ordinary fp32 -> X cast
            f = TensorHandle(_bf16_bits_to_f32(src.data), tl.float32)
            return f if dst_type.scalar == tl.float32 else oc(self, f, dst_type)
        return TensorHandle(_to_bf16_bits(src.data), tl.bfloat16)

    return {"cast_impl": cast_impl}


def _fp8_torch_dtypes():
    tl = _tl()
    return {tl.float8e4nv: torch.float8_e4m3fn, tl.float8e4b8: torch.float8_e4m3fnuz,
            tl.float8e5: torch.float8_e5m2, tl.float8e5b16: torch.float8_e5m2fnuz}


def _make_fp8_cast(orig):
    tl = _tl()
    interp = _interp()
    TensorHandle = interp.TensorHandle
    ofp = orig["create_fp_to_fp"]
    fp8 = _fp8_torch_dtypes()

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        dst = dst_type.scalar
        src_ok = src.dtype.scalar in (tl.float32, tl.float16, tl.bfloat16)
        rtne = rounding_mode is None or rounding_mode == interp._ir.ROUNDING_MODE.RTNE
        if dst not in fp8 or not src_ok or not rtne:
            return ofp(self, src, dst_type, rounding_mode)
        tdt = fp8[dst]
        vals = torch.from_numpy(np.ascontiguousarray(_widen(src), dtype=np.float32))
        fmax = torch.finfo(tdt).max
        # Saturate (the GPU's satfinite conversion), keeping NaN, then torch's RNE cast.
        bits = vals.clamp(-fmax, fmax).to(tdt).view(torch.uint8).numpy()
        return TensorHandle(bits.reshape(np.shape(src.data)), dst)

    return {"create_fp_to_fp": create_fp_to_fp}


# ---- probes: run the *unpatched* method on a tiny input -------------------------------------------

def _bits_bf16(x: float) -> np.ndarray:
    return _to_bf16_bits(np.array([x], dtype=np.float32))


def _probe_bf16_dot(orig) -> bool:
    tl, TH = _tl(), _interp().TensorHandle
    a = TH(_bits_bf16(1.5).reshape(1, 1), tl.bfloat16)
    d = TH(np.zeros((1, 1), np.float32), tl.float32)
    out = orig["create_dot"](_interp().interpreter_builder, a, a, d, None, 0)
    return float(out.data.ravel()[0]) != 2.25


def _probe_bf16_elementwise(orig) -> bool:
    tl, TH = _tl(), _interp().TensorHandle
    a = TH(_bits_bf16(1.5), tl.bfloat16)
    out = orig["binary_op"](_interp().interpreter_builder, a, a, np.add)
    return out.data.dtype != np.uint16 or int(out.data[0]) != int(_bits_bf16(3.0)[0])


def _probe_bf16_reduce(orig) -> bool:
    tl, TH = _tl(), _interp().TensorHandle
    t = tl.core.tensor(TH(np.concatenate([_bits_bf16(-2.0), _bits_bf16(1.0)]), tl.bfloat16),
                       tl.block_type(tl.bfloat16, [2]))
    ro = _reduce_cls()(0, None, False)
    res = orig["min_max"](ro, t, np.nanmax)
    return int(np.ravel(res.handle.data)[0]) != int(_bits_bf16(1.0)[0])


def _probe_bf16_cast(orig) -> bool:
    tl, TH = _tl(), _interp().TensorHandle
    # 1 + 3*2^-9 lies 3/4 of the way between two bf16 neighbours: RNE rounds up, truncation down.
    src = TH(np.array([1.005859375], np.float32), tl.float32)
    out = orig["cast_impl"](_interp().interpreter_builder, src, tl.bfloat16)
    return int(np.ravel(out.data)[0]) != int(_bits_bf16(1.0078125)[0])


def _probe_fp8_cast(orig) -> bool:
    tl, TH = _tl(), _interp().TensorHandle
    interp = _interp()
    src = TH(np.array([31.66], np.float32), tl.float32)
    out = orig["create_fp_to_fp"](interp.interpreter_builder, src, tl.float8e4nv, interp._ir.ROUNDING_MODE.RTNE)
    want = torch.tensor([32.0]).to(torch.float8_e4m3fn).view(torch.uint8).item()
    return int(np.ravel(out.data)[0]) != want


def _patches() -> Dict[str, _Patch]:
    B, R = _builder_cls, _reduce_cls
    return {
        "bf16_dot": _Patch("bf16_dot", ((B, "create_dot"),), _make_bf16_dot, _probe_bf16_dot),
        "bf16_elementwise": _Patch(
            "bf16_elementwise",
            tuple((B, a) for a in ("binary_op", "unary_op", "ternary_op", "create_fma", "create_erf", "create_rsqrt")),
            _make_bf16_elementwise, _probe_bf16_elementwise),
        "bf16_reduce": _Patch("bf16_reduce", ((R, "sum"), (R, "min_max")), _make_bf16_reduce, _probe_bf16_reduce),
        "bf16_cast": _Patch("bf16_cast", ((B, "cast_impl"),), _make_bf16_cast, _probe_bf16_cast),
        "fp8_cast": _Patch("fp8_cast", ((B, "create_fp_to_fp"),), _make_fp8_cast, _probe_fp8_cast),
    }


PATCH_NAMES = ("bf16_dot", "bf16_elementwise", "bf16_reduce", "bf16_cast", "fp8_cast")
_REGISTRY: Dict[str, _Patch] = {}
_STATUS: Dict[str, str] = {}  # name -> "applied" | "not needed" | "disabled by env" | "off"


def _registry() -> Dict[str, _Patch]:
    if not _REGISTRY:
        _REGISTRY.update(_patches())
    return _REGISTRY


def _env_disabled() -> set:
    raw = os.environ.get("ATTNCHECK_COMPAT_DISABLE", "")
    names = {x.strip() for x in raw.split(",") if x.strip()}
    return set(PATCH_NAMES) if "all" in names else names


def _check_names(names) -> tuple:
    names = tuple(PATCH_NAMES if names is None else ([names] if isinstance(names, str) else names))
    bad = [n for n in names if n not in PATCH_NAMES]
    if bad:
        raise ValueError(f"names: unknown compat patch(es) {bad}; expected some of {list(PATCH_NAMES)}")
    return names


def _apply(p: _Patch) -> None:
    originals = {attr: owner().__dict__[attr] for owner, attr in p.targets}
    for attr, fn in p.make(originals).items():
        owner = next(o for o, a in p.targets if a == attr)
        setattr(owner(), attr, fn)
    p.originals = originals


def _revert(p: _Patch) -> None:
    if p.originals is None:
        return
    for owner, attr in p.targets:
        setattr(owner(), attr, p.originals[attr])
    p.originals = None


def install(names: Optional[Iterable[str]] = None, force: bool = False) -> tuple:
    """Apply the named patches (default: all) if the interpreter is active and has the defect.

    Idempotent. ``force=True`` applies even when the interpreter is not active or the probe
    sees no defect (tests only). Returns the names of all patches currently applied.
    """
    names = _check_names(names)
    if not is_interpreter() and not force:
        return applied()
    with _LOCK:
        reg = _registry()
        off = _env_disabled()
        for n in names:
            p = reg[n]
            if p.originals is not None:
                continue
            if n in off and not force:
                _STATUS[n] = "disabled by ATTNCHECK_COMPAT_DISABLE"
                continue
            current = {attr: owner().__dict__[attr] for owner, attr in p.targets}
            if not force and not p.probe(current):
                _STATUS[n] = "not needed (this Triton has no such defect)"
                continue
            _apply(p)
            _STATUS[n] = "applied"
    return applied()


def uninstall(names: Optional[Iterable[str]] = None) -> None:
    """Revert the named patches (default: all)."""
    with _LOCK:
        for n in reversed(_check_names(names)):
            p = _registry()[n]
            if p.originals is not None:
                _revert(p)
                _STATUS[n] = "off"


def applied() -> tuple:
    return tuple(n for n in PATCH_NAMES if _REGISTRY.get(n) is not None and _REGISTRY[n].originals is not None)


def defect_present(name: str) -> bool:
    """Whether the interpreter, with this patch reverted, still shows the defect (probe)."""
    p = _registry()[_check_names([name])[0]]
    base = p.originals or {attr: owner().__dict__[attr] for owner, attr in p.targets}
    return p.probe(base)


@contextlib.contextmanager
def disabled(*names: str):
    """Temporarily revert patches (to show a defect in a test); re-applies those that were on."""
    names = _check_names(names or None)
    with _LOCK:
        was_on = [n for n in names if n in applied()]
        uninstall(was_on)
        try:
            yield
        finally:
            install(was_on, force=True)


def describe() -> str:
    """One line per patch for reports."""
    try:
        import triton  # noqa: PLC0415
        ver = triton.__version__
    except Exception:  # pragma: no cover - triton missing
        ver = "not installed"
    mode = "interpreter" if is_interpreter() else "compiled"
    lines = [f"triton {ver} ({mode}); compat patches:"]
    for n in PATCH_NAMES:
        lines.append(f"  {n}: {_STATUS.get(n, 'not installed')}")
    return "\n".join(lines)
