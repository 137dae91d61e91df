"""impl.triton.prefix_prefill against reference.mha.paged_attention (float64).

Every case builds a paged NHD cache whose unused slots (and unused block-table columns) are
NaN, writes all keys (context + new) into randomly permuted blocks, and compares the kernel's
rows with q_len > 1 (output and LSE) with the float64 reference. Decode rows must be left
untouched (the decode kernel owns them). Tolerances come from the dtype's epsilon, not from a
run: the kernel rounds P and the output to the model dtype, each at most eps/2 relative.
"""

import pytest
import torch

from impl.triton import compat, prefix_prefill
from reference.mha import paged_attention
from tests.kernels.paged_inputs import make_paged



@pytest.fixture(autouse=True)
def _compat():
    compat.install()


def run_kernel(device, batch, knobs, kv, **kw):
    dev = {k: v.to(device) for k, v in batch.items()}
    kn = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in knobs.items()}
    out, lse = prefix_prefill.prefix_prefill(**dev, **kn, kv_cache_dtype=kv, **kw)
    return out.cpu(), lse.cpu()


def expected(batch, knobs, **kw):
    args = {k: v for k, v in batch.items()}
    args["query"] = args["query"].double()
    return paged_attention(**args, **knobs, **kw)


def tolerance(dtype, ref):
    if dtype == torch.float32:
        return 2e-5 * max(1.0, ref.abs().max().item())
    return 4 * torch.finfo(dtype).eps * max(1.0, ref.abs().max().item())


def prefill_rows(query_lens):
    rows, t = [], 0
    for q in query_lens:
        if q > 1:
            rows += list(range(t, t + q))
        t += q
    return torch.tensor(rows, dtype=torch.long)


def check(device, seq_lens, query_lens, kernel_kw=None, ref_kw=None, **make_kw):
    batch, knobs, kv = make_paged(seq_lens, query_lens, **make_kw)
    kernel_kw, ref_kw = kernel_kw or {}, ref_kw or {}
    out, lse = run_kernel(device, batch, knobs, kv, **kernel_kw, **ref_kw)
    ref_out, ref_lse = expected(batch, knobs, **ref_kw)
    rows = prefill_rows(query_lens)
    o, r = out[rows].double(), ref_out[rows]
    assert torch.isfinite(o).all(), "NaN/Inf in prefill rows (an unused cache slot leaked?)"
    tol = tolerance(batch["query"].dtype, r)
    err = (o - r).abs().max().item()
    assert err <= tol, f"max |out - ref| = {err:.3e} > {tol:.3e}"
    lerr = (lse[:, rows].double() - ref_lse[:, rows]).abs().max().item()
    assert lerr <= 1e-4, f"max |lse - ref| = {lerr:.3e}"
    # Decode rows belong to the decode kernel: untouched (zeros / -inf).
    dec = torch.tensor([i for i in range(out.shape[0]) if i not in set(rows.tolist())], dtype=torch.long)
    if dec.numel():
        assert (out[dec] == 0).all() and torch.isneginf(lse[:, dec]).all()
    return err, tol


pytestmark = pytest.mark.smoke

BASIC = [  # (seq_lens, query_lens): decode rows first, then extends, then prefills
    ([9, 37, 20], [1, 21, 20]),
    ([50, 17], [3, 17]),
]


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_dtypes_gqa(dtype, device):
    check(device, *BASIC[0], dtype=dtype, hq=4, hkv=2)


@pytest.mark.parametrize("d", [32, 64, 80, 96, 128, 160, 192, 224, 256])  # ROCM_ATTN's declared sizes
def test_head_sizes(d, device):
    check(device, *BASIC[1], d=d, hq=2, hkv=1)


@pytest.mark.parametrize("block_size", [16, 32, 48])
def test_block_sizes_partial_last_block(block_size, device):
    # 48 is not a power of two: tiles gather keys token by token through the block table.
    check(device, [1 + block_size * 2, 2 * block_size + 5], [2, 19], block_size=block_size, hq=2, hkv=2)


@pytest.mark.parametrize("window", [1, 5, 16, 33])
def test_sliding_window(window, device):
    check(device, [40, 22], [18, 22], ref_kw={"sliding_window": window}, hq=2, hkv=1, dtype="fp32")


def test_softcap_alibi_sinks(device):
    check(device, *BASIC[0], ref_kw={"softcap": 2.0}, alibi=True, sinks=True, dtype="fp32", hq=4, hkv=1)
    check(device, *BASIC[1], ref_kw={"softcap": 5.0}, dtype="bf16")


FNUZ_NEEDS_INTERPRETER = pytest.mark.skipif(
    torch.cuda.is_available(), reason="compiled Triton on CUDA has no float8_e4m3fnuz type (AMD gfx942 only)")


@pytest.mark.parametrize("kv", ["fp8_e4m3fn", pytest.param("fp8_e4m3fnuz", marks=FNUZ_NEEDS_INTERPRETER)])
def test_fp8_kv(kv, device):
    check(device, *BASIC[0], kv=kv, k_scale=0.37, v_scale=1.7, dtype="fp16")


def test_non_causal(device):
    check(device, *BASIC[1], ref_kw={"causal": False}, dtype="fp32")


def test_tile_sizes_and_skip_decode_off(device):
    batch, knobs, kv = make_paged([9, 37], [1, 36], hq=2, hkv=1)
    out, _ = run_kernel(device, batch, knobs, kv, skip_decode=False, block_m=32, block_n=16)
    ref, _ = expected(batch, knobs)
    assert (out.double() - ref).abs().max() <= tolerance(torch.float16, ref)


def test_nan_poison_has_teeth(device):
    """A key range that reaches past seq_len reads the NaN slots: the check must notice."""
    batch, knobs, kv = make_paged([20], [20], hq=2, hkv=1)
    longer = dict(batch, seq_lens=batch["seq_lens"] + 3)  # reads 3 unused (NaN) slots
    out, _ = run_kernel(device, longer, knobs, kv)
    assert not torch.isfinite(out).all()


def test_window_of_one_sees_only_itself(device):
    """W = 1: each query sees only its own key, so the output is that key's value."""
    batch, knobs, kv = make_paged([8], [8], hq=2, hkv=1, dtype="fp32")
    out, lse = run_kernel(device, batch, knobs, kv, sliding_window=1)
    ref_out, ref_lse = expected(batch, knobs, sliding_window=1)
    assert (out.double() - ref_out).abs().max() <= 1e-5
    assert torch.allclose(lse.double(), ref_lse, atol=1e-5)


def test_bad_arguments_are_named():
    batch, knobs, kv = make_paged([9], [9], hq=2, hkv=1)
    with pytest.raises(ValueError, match="key_cache"):
        prefix_prefill.prefix_prefill(**dict(batch, key_cache=batch["key_cache"][..., :32]), **knobs)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        prefix_prefill.prefix_prefill(**batch, **knobs, kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="block_n"):
        prefix_prefill.prefix_prefill(**batch, **knobs, block_n=24)
    with pytest.raises(ValueError, match="query_start_loc"):
        prefix_prefill.prefix_prefill(**dict(batch, query_start_loc=batch["query_start_loc"][:1]), **knobs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (compiled Triton)")
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("d", [64, 80, 128, 256])
def test_gpu_medium(dtype, d, device):
    check(device, [1, 700, 300, 129], [1, 64, 300, 129], dtype=dtype, d=d, hq=8, hkv=2,
          ref_kw={"sliding_window": 200}, alibi=True, sinks=True)
    check(device, [1500, 513], [97, 513], dtype=dtype, d=d, hq=8, hkv=8, ref_kw={"softcap": 30.0})
    check(device, [1, 900, 77], [1, 200, 77], dtype=dtype, d=d, hq=8, hkv=1, kv="fp8_e4m3fn", k_scale=0.37, v_scale=1.7)
