"""Each interpreter patch of impl.triton.compat: the defect shows without it, the kernel is right with it.

A tiny kernel per defect (Triton 3.9 interpreter, research/aiter-kernels.md section 2). The
"defect" half asserts that the unpatched interpreter is wrong, so the patch is shown to be
needed; it skips (with the reason) on a Triton whose probe shows no such defect.
"""

import numpy as np
import pytest
import torch

import triton
import triton.language as tl

from impl.triton import compat

pytestmark = [
    pytest.mark.smoke,
    pytest.mark.skipif(not compat.is_interpreter(), reason="compat patches only act under TRITON_INTERPRET=1"),
]


@pytest.fixture(autouse=True)
def _installed():
    compat.install()
    yield


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
    r = tl.arange(0, N)
    a = tl.load(a_ptr + r[:, None] * N + r[None, :])
    b = tl.load(b_ptr + r[:, None] * N + r[None, :])
    tl.store(c_ptr + r[:, None] * N + r[None, :], tl.dot(a, b))


@triton.jit
def _elementwise_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
    r = tl.arange(0, N)
    a = tl.load(a_ptr + r)
    b = tl.load(b_ptr + r)
    tl.store(c_ptr + r, a * b - a)


@triton.jit
def _reduce_kernel(a_ptr, s_ptr, m_ptr, N: tl.constexpr):
    r = tl.arange(0, N)
    a = tl.load(a_ptr + r[:, None] * N + r[None, :])
    tl.store(s_ptr + r, tl.sum(a, axis=1))
    tl.store(m_ptr + r, tl.max(a, axis=1))


@triton.jit
def _cast_kernel(x_ptr, y_ptr, N: tl.constexpr):
    r = tl.arange(0, N)
    x = tl.load(x_ptr + r)
    tl.store(y_ptr + r, x.to(y_ptr.dtype.element_ty))


def _rand(shape, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def _defect_shows(name):
    if not compat.defect_present(name):
        pytest.skip(f"this Triton ({triton.__version__}) has no {name} defect: {compat.INTERPRETER_DEFECTS[name]}")


def _run_dot():
    a, b = _rand((16, 16), torch.bfloat16, 1), _rand((16, 16), torch.bfloat16, 2)
    c = torch.empty(16, 16, dtype=torch.float32)
    _dot_kernel[(1,)](a, b, c, N=16)
    return c, a.float() @ b.float()


def test_bf16_dot_patched():
    c, want = _run_dot()
    torch.testing.assert_close(c, want, rtol=1e-6, atol=1e-5)


def test_bf16_dot_defect_without_patch():
    _defect_shows("bf16_dot")
    with compat.disabled("bf16_dot"):
        c, want = _run_dot()
    assert not torch.allclose(c, want, rtol=1e-2, atol=1e-2)


def _run_elementwise():
    a, b = _rand(64, torch.bfloat16, 3), _rand(64, torch.bfloat16, 4)
    c = torch.empty(64, dtype=torch.bfloat16)
    _elementwise_kernel[(1,)](a, b, c, N=64)
    return c, (a * b) - a  # torch rounds to bf16 after every op, as the GPU does


def test_bf16_elementwise_patched():
    c, want = _run_elementwise()
    assert torch.equal(c.view(torch.int16), want.view(torch.int16))


def test_bf16_elementwise_defect_without_patch():
    _defect_shows("bf16_elementwise")
    with compat.disabled("bf16_elementwise"):
        c, want = _run_elementwise()
    assert not torch.allclose(c.float(), want.float(), rtol=1e-2, atol=1e-2)


def _run_reduce():
    a = _rand((16, 16), torch.bfloat16, 5) - 3.0  # mostly negative: bit-pattern max is wrong
    s = torch.empty(16, dtype=torch.bfloat16)
    m = torch.empty(16, dtype=torch.bfloat16)
    _reduce_kernel[(1,)](a, s, m, N=16)
    return s, m, a.float().sum(1), a.max(1).values


def test_bf16_reduce_patched():
    s, m, want_s, want_m = _run_reduce()
    assert torch.equal(m, want_m)
    # fp32 accumulation rounded once to bf16: within one bf16 ulp of the exact sum.
    torch.testing.assert_close(s.float(), want_s, rtol=2 ** -7, atol=0)


def test_bf16_reduce_defect_without_patch():
    _defect_shows("bf16_reduce")
    with compat.disabled("bf16_reduce", "bf16_elementwise"):
        s, m, want_s, want_m = _run_reduce()
    assert not torch.equal(m, want_m) or not torch.allclose(s.float(), want_s, rtol=1e-2)


def _run_cast():
    x = _rand(256, torch.float32, 6, scale=3.0)
    y = torch.empty(256, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, y, N=256)
    return y, x.to(torch.bfloat16)


def test_bf16_cast_patched_is_round_to_nearest_even():
    y, want = _run_cast()
    assert torch.equal(y.view(torch.int16), want.view(torch.int16))


def test_bf16_cast_defect_without_patch():
    _defect_shows("bf16_cast")
    with compat.disabled("bf16_cast"):
        y, want = _run_cast()
    assert not torch.equal(y.view(torch.int16), want.view(torch.int16))


def _fp8_expected(x, dt):
    fmax = torch.finfo(dt).max
    return x.float().clamp(-fmax, fmax).to(dt)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e4m3fnuz])
@pytest.mark.parametrize("src", [torch.float32, torch.float16, torch.bfloat16])
def test_fp8_cast_patched_saturates_and_rounds_to_nearest_even(fp8, src):
    # includes values beyond the fp8 max (saturation) and exact ties of the fp8 grid
    x = torch.cat([_rand(1016, torch.float32, 7, scale=60.0),
                   torch.tensor([31.66, -7.79, 1.95, 1000.0, -1000.0, 1.0625, 1.1875, 0.0])]).to(src)
    y = torch.empty(x.numel(), dtype=fp8)
    _cast_kernel[(1,)](x, y, N=x.numel())
    assert torch.equal(y.view(torch.uint8), _fp8_expected(x, fp8).view(torch.uint8))


def test_fp8_cast_defect_without_patch():
    _defect_shows("fp8_cast")
    x = _rand(1024, torch.float32, 8, scale=60.0)
    y = torch.empty(1024, dtype=torch.float8_e4m3fn)
    with compat.disabled("fp8_cast"):
        _cast_kernel[(1,)](x, y, N=1024)
    wrong = (y.view(torch.uint8) != _fp8_expected(x, torch.float8_e4m3fn).view(torch.uint8)).float().mean()
    assert wrong > 0.005


@triton.jit
def _and_kernel(a_ptr, b_ptr, o_ptr, N: tl.constexpr):
    r = tl.arange(0, N)
    a = tl.load(a_ptr + r) > 0
    b = tl.load(b_ptr + r) > 0
    tl.store(o_ptr + r, (a and b).to(tl.int32))


def test_python_and_defect_is_as_documented():
    """Not patchable: documents why kernels must use `&` (INTERPRETER_DEFECTS['python_and'])."""
    a = torch.tensor([1.0, 1.0, -1.0, -1.0] * 4)
    b = torch.tensor([1.0, -1.0, 1.0, -1.0] * 4)
    o = torch.empty(16, dtype=torch.int32)
    _and_kernel[(1,)](a, b, o, N=16)
    logical = ((a > 0) & (b > 0)).int()
    if torch.equal(o, logical):
        pytest.skip("this Triton interpreter gives `and` logical semantics")
    assert torch.equal(o, (b > 0).int())  # Python semantics: a truthy first operand returns b


def test_install_is_idempotent_and_describe_names_every_patch():
    first = compat.install()
    assert compat.install() == first
    text = compat.describe()
    for name in compat.PATCH_NAMES:
        assert name in text
    assert set(compat.INTERPRETER_DEFECTS) >= set(compat.PATCH_NAMES)


def test_unknown_patch_name_is_an_error():
    with pytest.raises(ValueError, match="names"):
        compat.install(["bf16_dott"])
