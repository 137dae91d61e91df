"""impl.triton.paged_decode (split-K partitions + reduce) against reference.mha.paged_attention.

Every cache slot that no sequence owns is NaN (and unused block-table columns point at an
all-NaN block), so a kernel that reads past seq_len produces NaN and fails; a planted variant
that loads the whole last block (masking only the scores: 0 * NaN = NaN, vLLM bug class #14)
shows the check has teeth. Partition sizes are small so sequences span many partitions, and
sliding windows make whole partitions empty. Tolerances come from the dtype's epsilon.
"""

import pytest
import torch

from impl.triton import compat, paged_decode
from reference.mha import paged_attention
from tests.kernels.paged_inputs import make_paged
from tests.mutants import mutant


pytestmark = pytest.mark.smoke


@pytest.fixture(autouse=True)
def _compat():
    compat.install()


def run_kernel(device, batch, knobs, kv, fn=None, **kw):
    fn = fn or paged_decode.paged_decode
    dev = {k: v.to(device) for k, v in batch.items()}
    kn = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in knobs.items()}
    out, lse = fn(**dev, **kn, kv_cache_dtype=kv, **kw)
    return out.cpu(), lse.cpu()


def expected(batch, knobs, **kw):
    args = dict(batch)
    args["query"] = args["query"].double()
    return paged_attention(**args, **knobs, **kw)


def tolerance(dtype, ref):
    if dtype == torch.float32:
        return 2e-5 * max(1.0, ref.abs().max().item())
    return 4 * torch.finfo(dtype).eps * max(1.0, ref.abs().max().item())


def decode_rows(query_lens):
    starts = [0] + list(torch.tensor(query_lens).cumsum(0).tolist())[:-1]
    return torch.tensor([s for s, q in zip(starts, query_lens) if q == 1], dtype=torch.long)


def compare(device, batch, knobs, kv, query_lens, kernel_kw=None, ref_kw=None, fn=None):
    kernel_kw, ref_kw = kernel_kw or {}, ref_kw or {}
    out, lse = run_kernel(device, batch, knobs, kv, fn=fn, **kernel_kw, **ref_kw)
    ref_out, ref_lse = expected(batch, knobs, **ref_kw)
    rows = decode_rows(query_lens)
    o, r = out[rows].double(), ref_out[rows]
    assert torch.isfinite(o).all(), "NaN/Inf in decode rows"
    tol = tolerance(batch["query"].dtype, r)
    err = (o - r).abs().max().item()
    assert err <= tol, f"max |out - ref| = {err:.3e} > {tol:.3e}"
    lerr = (lse[:, rows].double() - ref_lse[:, rows]).abs().max().item()
    assert lerr <= 1e-4, f"max |lse - ref| = {lerr:.3e}"
    others = torch.tensor([i for i in range(out.shape[0]) if i not in set(rows.tolist())], dtype=torch.long)
    if others.numel():  # rows of q_len > 1 belong to prefix prefill: untouched
        assert (out[others] == 0).all() and torch.isneginf(lse[:, others]).all()
    return err, tol


def check(device, seq_lens, query_lens, kernel_kw=None, ref_kw=None, fn=None, **make_kw):
    batch, knobs, kv = make_paged(seq_lens, query_lens, **make_kw)
    return compare(device, batch, knobs, kv, query_lens, kernel_kw, ref_kw, fn)


# decodes with partial last blocks, lengths spanning 1..7 partitions of 16, plus an extend row
MANY = ([1, 37, 100, 16, 30], [1, 1, 1, 1, 5])
P16 = {"partition_size": 16, "block_n": 16}


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_dtypes_many_partitions(dtype, device):
    check(device, *MANY, kernel_kw=P16, dtype=dtype, hq=8, hkv=2)


@pytest.mark.parametrize("heads", [(4, 4), (4, 1), (24, 1)])  # MHA, MQA, a group > 16 rows
def test_head_groups(heads, device):
    check(device, *MANY, kernel_kw=P16, dtype="fp16", hq=heads[0], hkv=heads[1])


@pytest.mark.parametrize("d", [32, 64, 80, 96, 128, 160, 192, 224, 256])  # ROCM_ATTN's declared sizes
def test_head_sizes(d, device):
    check(device, [45, 9], [1, 1], kernel_kw={"partition_size": 32, "block_n": 16}, d=d, hq=2, hkv=1)


@pytest.mark.parametrize("block_size", [16, 32, 48])
def test_block_sizes(block_size, device):
    check(device, [2 * block_size + 3, block_size - 1, 1], [1, 1, 1], kernel_kw=P16, block_size=block_size,
          hq=4, hkv=2)


@pytest.mark.parametrize("window", [1, 7, 16, 40])
def test_sliding_window_empty_partitions(window, device):
    # seq 100 with P = 16 and W <= 40: the first partitions hold no visible key (never written).
    check(device, *MANY, kernel_kw=P16, ref_kw={"sliding_window": window}, dtype="fp32", hq=4, hkv=2)


def test_softcap_alibi_sinks(device):
    check(device, *MANY, kernel_kw=P16, ref_kw={"softcap": 3.0}, alibi=True, sinks=True, dtype="fp32", hq=4, hkv=2)
    check(device, *MANY, kernel_kw=P16, ref_kw={"softcap": 10.0, "sliding_window": 20}, sinks=True, dtype="bf16",
          hq=4, hkv=1)


FNUZ_NEEDS_INTERPRETER = pytest.mark.skipif(
    torch.cuda.is_available(), reason="compiled Triton on CUDA has no float8_e4m3fnuz type (AMD gfx942 only)")


@pytest.mark.parametrize("kv", ["fp8_e4m3fn", pytest.param("fp8_e4m3fnuz", marks=FNUZ_NEEDS_INTERPRETER)])
def test_fp8_kv(kv, device):
    check(device, *MANY, kernel_kw=P16, kv=kv, k_scale=0.37, v_scale=1.7, dtype="bf16", hq=4, hkv=2)


def test_default_partition_and_tile(device):
    check(device, [300, 5], [1, 1], hq=4, hkv=2)  # P = 256: two partitions for the first sequence


def test_poisoned_slots_do_not_change_the_output(device):
    """Same cache with unused slots 0 instead of NaN: bit-identical, finite output."""
    batch, knobs, kv = make_paged(*MANY, hq=4, hkv=2)
    clean = dict(batch, key_cache=torch.nan_to_num(batch["key_cache"].float()).to(batch["key_cache"].dtype),
                 value_cache=torch.nan_to_num(batch["value_cache"].float()).to(batch["value_cache"].dtype))
    a, la = run_kernel(device, batch, knobs, kv, **P16)
    b, lb = run_kernel(device, clean, knobs, kv, **P16)
    assert torch.isfinite(a).all() and torch.equal(a, b) and torch.equal(la, lb)


def test_planted_read_of_unused_slots_is_caught(tmp_path, device):
    """Load the whole last cache block, masking only the scores (0 * NaN = NaN): must fail."""
    whole = "(kpos < tl.cdiv(seq_len, block_size) * block_size)"
    bad = mutant(paged_decode, [  # the tile loads use the whole-block mask; the scores keep k_ok
        ("bt_row, kpos, k_ok, block_size,", f"bt_row, kpos, {whole}, block_size,", 1),
    ], tmp_path)
    with pytest.raises(AssertionError, match="NaN"):
        check(device, *MANY, kernel_kw=P16, fn=bad.paged_decode, hq=4, hkv=2)


def test_planted_partial_block_skip_is_caught(tmp_path, device):
    bad = mutant(paged_decode, [("key_end = seq_len", "key_end = (seq_len // block_size) * block_size", 1)],
                 tmp_path)
    with pytest.raises(AssertionError):
        check(device, *MANY, kernel_kw=P16, fn=bad.paged_decode, hq=4, hkv=2)


def test_planted_reduce_without_guard_is_caught(tmp_path, device):
    """The reduce reads partitions the sliding window emptied (stage 1 skipped them)."""
    src = mutant(paged_decode, [("valid = (parts >= first) & (parts < last)", "valid = parts < last", 2),
                                ("start = (first // RED_BLOCK) * RED_BLOCK", "start = 0", 1)], tmp_path)
    with pytest.raises(AssertionError, match="NaN"):
        check(device, *MANY, kernel_kw=P16, ref_kw={"sliding_window": 7}, fn=src.paged_decode, hq=4, hkv=2)


def test_bad_arguments_are_named():
    batch, knobs, kv = make_paged([9], [1], hq=2, hkv=1)
    with pytest.raises(ValueError, match="partition_size"):
        paged_decode.paged_decode(**batch, **knobs, partition_size=48)
    with pytest.raises(ValueError, match="sinks"):
        paged_decode.paged_decode(**batch, **dict(knobs, sinks=torch.zeros(3)))
    with pytest.raises(ValueError, match="block_table"):
        paged_decode.paged_decode(**dict(batch, block_table=batch["block_table"][:, None]), **knobs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (compiled Triton)")
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("d", [64, 80, 128, 256])
def test_gpu_long_decodes(dtype, d, device):
    lens = [1, 17, 2049, 8000, 513]
    check(device, lens, [1] * 5, dtype=dtype, d=d, hq=16, hkv=2, ref_kw={"sliding_window": 1000}, alibi=True,
          sinks=True)
    check(device, lens, [1] * 5, dtype=dtype, d=d, hq=8, hkv=8, ref_kw={"softcap": 30.0},
          kernel_kw={"partition_size": 512})
    check(device, lens, [1] * 5, dtype=dtype, d=d, hq=8, hkv=1, kv="fp8_e4m3fn", k_scale=0.37, v_scale=1.7)
