"""reference.fp: rounding written out with exact float64 operations must agree with IEEE
round-to-nearest-even (torch's float32 -> bf16/fp16/fp8 casts are RNE on the values compared
here), and the deterministic elementary functions must be accurate to a few float64 ulp."""

import math
from fractions import Fraction

import pytest
import torch

from reference import fp

pytestmark = pytest.mark.smoke
F64 = torch.float64


def _all_values(dtype) -> torch.Tensor:
    """Every finite value of a 16- or 8-bit format, as float64."""
    bits = torch.arange(2 ** (8 * torch.finfo(dtype).bits // 8), dtype=torch.int64)
    view = {1: torch.uint8, 2: torch.int16}[torch.finfo(dtype).bits // 8]
    x = bits.to(torch.int32).to(view).view(dtype).to(F64) if view is torch.int16 else \
        bits.to(torch.uint8).view(dtype).to(F64)
    return x[torch.isfinite(x)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e4m3fnuz])
def test_round_to_matches_rne_on_every_value_and_every_midpoint(dtype):
    fmt = fp.format_of(dtype)
    v = torch.unique(_all_values(dtype))
    assert torch.equal(fp.round_to(v, fmt), v)  # representable values are fixed points
    mids = (v[:-1] + v[1:]) / 2  # exact in float64 (and in float32)
    quarter = v[:-1] + (v[1:] - v[:-1]) / 4
    for x in (mids, quarter, -mids):
        want = x.to(torch.float32).to(dtype).to(F64)  # torch: float32 -> dtype, RNE
        assert torch.equal(fp.round_to(x, fmt), want)


def test_round_to_float32_matches_the_cast_across_the_range():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=g, dtype=F64) * torch.exp2(torch.randint(-160, 130, (200_000,), generator=g).to(F64))
    assert torch.equal(fp.round_to(x, fp.FP32), x.to(torch.float32).to(F64))


def test_round_to_special_values():
    x = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 65504.0, 65519.99, 65520.0, -65520.0, 2.0 ** -25,
                      3 * 2.0 ** -26, 2.0 ** -24], dtype=F64)
    y = fp.round_to(x, fp.FP16)
    assert torch.equal(torch.signbit(y[:2]), torch.tensor([False, True]))
    assert y[2] == math.inf and y[3] == -math.inf and math.isnan(y[4])
    assert y[5] == 65504 and y[6] == 65504 and y[7] == math.inf and y[8] == -math.inf  # overflow at max + ulp/2
    assert y[9] == 0 and y[10] == 2.0 ** -24 and y[11] == 2.0 ** -24  # subnormal ties to even
    assert torch.equal(fp.round_to(x, None).view(torch.int64), x.view(torch.int64))  # None: float64, untouched


def test_quantize_fp8_saturates_and_ties_to_even():
    fmt = fp.E4M3FN
    x = torch.tensor([500.0, -1000.0, 448.0, 1.0625, 1.1875, -1.0625, -0.0], dtype=F64)
    q = fp.quantize_fp8(x * 0.5, 0.5, fmt)
    assert q.tolist()[:6] == [448.0, -448.0, 448.0, 1.0, 1.25, -1.0]
    assert fp.quantize_fp8(torch.tensor([-0.0], dtype=F64), 1.0, fp.E4M3FNUZ).item() == 0.0
    assert not torch.signbit(fp.quantize_fp8(torch.tensor([-0.0], dtype=F64), 1.0, fp.E4M3FNUZ)).item()
    assert fp.quantize_fp8(torch.tensor([300.0], dtype=F64), 1.0, fp.E4M3FNUZ).item() == 240.0


@pytest.mark.parametrize("name,ours,theirs,lo,hi,ulps", [
    ("exp", fp.exp, torch.exp, -700.0, 700.0, 2),
    ("expm1", fp.expm1, torch.expm1, -3.0, 3.0, 4),
    ("log", fp.log, torch.log, 1e-300, 1e300, 2),
    ("tanh", fp.tanh, torch.tanh, -20.0, 20.0, 4),
])
def test_elementary_functions_are_accurate(name, ours, theirs, lo, hi, ulps):
    g = torch.Generator().manual_seed(1)
    u = torch.rand(100_000, generator=g, dtype=F64)
    x = torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))) if name == "log" else lo + u * (hi - lo)
    a, b = ours(x), theirs(x)
    rel = ((a - b).abs() / b.abs().clamp(min=1e-300)).max()
    assert float(rel) <= ulps * 2.0 ** -52, f"{name}: {float(rel) / 2 ** -52:.2f} ulp"


def test_elementary_function_special_values():
    t = torch.tensor([-math.inf, math.inf, math.nan, 0.0, -800.0, 800.0], dtype=F64)
    e = fp.exp(t)
    assert e[0] == 0 and e[1] == math.inf and math.isnan(e[2]) and e[3] == 1 and e[4] == 0 and e[5] == math.inf
    lg = fp.log(torch.tensor([0.0, -1.0, math.inf, 1.0], dtype=F64))
    assert lg[0] == -math.inf and math.isnan(lg[1]) and lg[2] == math.inf and lg[3] == 0
    c = fp.cos_2pi(torch.linspace(0, 1, 1001, dtype=F64))
    assert float((c - torch.cos(2 * math.pi * torch.linspace(0, 1, 1001, dtype=F64))).abs().max()) < 1e-14


def test_contract_is_einsum_in_a_fixed_order():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 5, 70, generator=g, dtype=F64), torch.randn(70, 4, generator=g, dtype=F64)
    got = fp.contract("xyd,dz->xyz", a, b)
    assert torch.allclose(got, torch.einsum("xyd,dz->xyz", a, b), rtol=1e-13, atol=1e-13)
    # the order is fixed: the same result whatever the memory layout of the operands
    assert torch.equal(got, fp.contract("xyd,dz->xyz", a.transpose(0, 1).contiguous().transpose(0, 1), b.t().contiguous().t()))
    # accumulating in float32 rounds the running sum after every block of 16
    acc = fp.contract("xyd,dz->xyz", a, b, fp.FP32)
    assert torch.equal(acc, fp.round_to(acc, fp.FP32)) and not torch.equal(acc, got)
    x = torch.randn(4, 37, generator=g, dtype=F64)
    assert torch.allclose(fp.sum_last(x), x.sum(-1), rtol=1e-13, atol=1e-13)


def _exact_rne(x: float, fmt) -> float:
    """Round-to-nearest-even of a float64 to ``fmt`` in exact rational arithmetic (the definition)."""
    if math.isnan(x) or math.isinf(x) or x == 0:
        return x
    a = Fraction(abs(x))
    e = max(math.floor(math.log2(abs(x))), fmt.min_exp)
    while Fraction(2) ** e > a:  # log2 of a float64 can round up across a power of two
        e -= 1
    e = max(e, fmt.min_exp)
    spacing = Fraction(2) ** (e + 1 - fmt.precision)
    q, r = divmod(a, spacing)
    if r * 2 > spacing or (r * 2 == spacing and q % 2 == 1):
        q += 1
    y = float(q * spacing)
    if y > fmt.max_finite:
        y = math.inf
    return math.copysign(y, x)


@pytest.mark.parametrize("fmt", [fp.BF16, fp.FP16, fp.FP32, fp.E4M3FN, fp.E4M3FNUZ], ids=lambda f: f.name)
def test_round_to_equals_exact_rational_rounding(fmt):
    """Random float64 bit patterns over and beyond the format's range, and values exactly on,
    just above and just below a midpoint of ``fmt`` (where a cast through float32 rounds twice)."""
    g = torch.Generator().manual_seed(fmt.precision)
    n = 1500
    mant = torch.randint(0, 2 ** 52, (n,), generator=g, dtype=torch.int64)
    exps = torch.randint(fmt.min_exp - 30 + 1023, 140 + 1023, (n,), generator=g, dtype=torch.int64)
    signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.int64) << 63
    drop = 53 - fmt.precision
    on_grid = (mant >> drop) << drop
    half = 1 << (drop - 1)
    values = [signs | (exps << 52) | m for m in (mant, on_grid | half, on_grid | (half + 1), on_grid | (half - 1))]
    x = torch.cat(values + [torch.randint(-2 ** 63, 2 ** 63 - 1, (n,), generator=g, dtype=torch.int64)]).view(F64)
    x = x[~torch.isnan(x)]
    got = fp.round_to(x, fmt)
    want = torch.tensor([_exact_rne(v, fmt) for v in x.tolist()], dtype=F64)
    assert torch.equal(got.view(torch.int64), want.view(torch.int64))


def _rounding_probe(device) -> torch.Tensor:
    """Values over every binade any format has (subnormals to overflow), every bf16 and fp16
    value with its midpoints, and the special values, float64."""
    g = torch.Generator().manual_seed(1)
    n = 1 << 18
    spread = torch.randn(n, generator=g, dtype=F64) * torch.exp2(torch.randint(-160, 131, (n,), generator=g).to(F64))
    grid = [spread]
    for dtype in (torch.bfloat16, torch.float16):
        v = torch.unique(_all_values(dtype))
        grid += [v, (v[:-1] + v[1:]) / 2, -(v[:-1] + v[1:]) / 2]
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan, 2.0 ** -1074, 65520.0,
                            float.fromhex("0x1.ffffffp127"), 448.0, 464.0, 240.0, 248.0], dtype=F64)
    return torch.cat(grid + [special]).to(device)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns, any NaN equal to any NaN (their payloads are not part of the contract)."""
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(a.view(torch.int64)[~nan], b.view(torch.int64)[~nan])


@pytest.mark.parametrize("fmt", [fp.BF16, fp.FP16, fp.FP32, fp.E4M3FN, fp.E4M3FNUZ], ids=lambda f: f.name)
def test_the_compiled_rounding_graph_is_round_to(fmt):
    """What the GPU compiles (one graph: the tensor flattened, the format's constants as 0-d
    tensors) traced on the CPU and run eagerly: the same bits as ``round_to``, shapes kept."""
    fused = fp._FusedRounding(backend="eager")
    x = _rounding_probe("cpu")
    assert _same_bits(fused(x, fmt), fp.round_to(x, fmt))
    square = x[: 512 * 400].reshape(512, 400).t()  # not contiguous
    assert fused(square, fmt).shape == square.shape and _same_bits(fused(square, fmt), fp.round_to(square, fmt))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", [fp.BF16, fp.FP16, fp.FP32, fp.E4M3FN, fp.E4M3FNUZ], ids=lambda f: f.name)
def test_fused_rounding_on_cuda_is_bit_identical(fmt):
    """The Inductor kernel ``round_to`` uses for large CUDA tensors gives the eager operations'
    bits (on the GPU and against the CPU) on every value class."""
    x = _rounding_probe("cuda")
    assert x.numel() >= fp.FUSED_MIN_ELEMENTS and fp.fused_rounding.enabled
    fused = fp.round_to(x, fmt)
    assert fp.fused_rounding.enabled, "the compiled rounding failed and fell back to eager"
    assert _same_bits(fused, fp._round(x, *fp._round_constants(fmt)))
    assert _same_bits(fused.cpu(), fp.round_to(x.cpu(), fmt))


def test_fused_rounding_falls_back_to_the_same_bits_and_says_so(capsys, monkeypatch):
    """A compilation that fails costs speed, never the result, and is reported once; the
    environment switch turns the compiled path off."""
    broken = fp._FusedRounding(backend="no-such-backend")
    x = _rounding_probe("cpu")
    assert _same_bits(broken(x, fp.BF16), fp.round_to(x, fp.BF16))
    assert not broken.enabled and "compiled rounding failed" in capsys.readouterr().err
    monkeypatch.setenv("ATTNCHECK_EAGER_ROUNDING", "1")
    assert not fp._FusedRounding().enabled
