"""impl.triton.mla_decode (absorbed MLA decode, split-KV + reduce) against the float64 reference.

The kernel is MQA of 576-wide latent queries over the paged latent cache with V = the first
kv_lora_rank channels, so the oracle is reference.mha.attention with one kv head
(k = latent, v = latent[:, :L]) on the dequantised cache; the error budget per (entry, head) row
is 2 x the pt path's error (reference.lowp) + 2 rounding steps (4 x for fp8, DESIGN.md).
Unused cache slots are NaN-poisoned: a kernel that reads them produces NaN and fails."""

import pytest
import torch

from impl.triton import mla_decode as md
from reference import lowp, mha
from reference import paged as rpaged

pytestmark = pytest.mark.smoke


def _round_step(ref, dtype):
    return ((ref.to(dtype).double() + 0.3).to(dtype).double() - 0.3 - ref).abs().amax(-1)


def _setup(seed, kv_lens, n, L, R, bs, dtype, cache_dtype=None, kv_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    cache_dtype = cache_dtype or dtype
    B = len(kv_lens)
    nblk = [max(1, -(-s // bs)) for s in kv_lens]
    pool = sum(nblk) + 2
    perm = torch.randperm(pool, generator=g)
    table = torch.full((B, max(nblk) + 1), pool + 7, dtype=torch.int32)  # unused columns: garbage ids
    cache = torch.full((pool, bs, L + R), float("nan")).to(cache_dtype)
    lat = []
    k = 0
    for b, s in enumerate(kv_lens):
        table[b, :nblk[b]] = perm[k:k + nblk[b]].to(torch.int32)
        k += nblk[b]
        x = (torch.randn(s, L + R, generator=g) * 0.7).to(dtype)
        pos = torch.arange(s)
        slots = table[b, pos // bs].long() * bs + pos % bs
        flat = cache.view(-1, L + R)
        flat[slots] = rpaged.quantize_fp8(x, kv_scale, cache_dtype) if cache_dtype != dtype else x
        lat.append(flat[slots])
    q = torch.randn(B, n, L + R, generator=g).to(dtype)
    return q, cache, table, torch.tensor(kv_lens, dtype=torch.int32), lat


def _check(device, q, cache, table, kv_lens, lat, *, scale, L, kv_scale=1.0, k_mult=2, **kw):
    out, lse = md.mla_decode(q.to(device), cache.to(device), table.to(device), kv_lens.to(device), scale=scale,
                             kv_lora_rank=L, kv_scale=kv_scale, **kw)
    out, lse = out.cpu(), lse.cpu()
    assert out.shape == (q.shape[0], q.shape[1], L) and out.dtype == q.dtype and lse.shape == (q.shape[1], q.shape[0])
    worst = 0.0
    for b, x in enumerate(lat):
        if x.shape[0] == 0:
            assert torch.all(out[b] == 0) and torch.all(lse[:, b] == float("-inf")), f"entry {b}: no keys"
            continue
        keys = rpaged.dequantize(x, kv_scale, torch.float64)
        ref, ref_lse = mha.attention(q[b:b + 1].double(), keys[:, None], keys[:, None, :L], scale=scale, causal=False)
        kl = rpaged.dequantize(x, kv_scale, q.dtype)
        pt, pt_lse = lowp.attention_lowp(q[b:b + 1], kl[:, None], kl[:, None, :L], scale=scale, causal=False)
        err = (out[b:b + 1].double() - ref).abs().amax(-1)
        budget = k_mult * (pt.double() - ref).abs().amax(-1) + 2 * _round_step(ref, q.dtype)
        worst = max(worst, float((err / budget).max()))
        assert torch.all(err <= budget), f"entry {b}: worst head ratio {(err / budget).max():.3g}"
        lerr = (lse[:, b].double() - ref_lse[:, 0]).abs()
        assert torch.all(lerr <= 2 * (pt_lse[:, 0].double() - ref_lse[:, 0]).abs() + 1e-5 * (1 + ref_lse[:, 0].abs()))
    return out, lse, worst


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_deepseek_dims_paged(dtype, device):
    # DeepSeek latent 512 + 64, 16 heads, block 16; kv lengths straddle blocks and tiles
    q, cache, table, kv_lens, lat = _setup(0, [1, 37, 16], 16, 512, 64, 16, dtype)
    _check(device, q, cache, table, kv_lens, lat, scale=192 ** -0.5, L=512, num_splits=2)


@pytest.mark.parametrize("bs", [1, 16, 64])
@pytest.mark.parametrize("splits", [1, 3])
def test_block_sizes_and_splits(bs, splits, device):
    q, cache, table, kv_lens, lat = _setup(1, [5, 70, 33], 8, 64, 16, bs, torch.bfloat16)
    _check(device, q, cache, table, kv_lens, lat, scale=0.2, L=64, num_splits=splits)


def test_more_splits_than_tiles_and_empty_entry(device):
    # 8 splits of a 20-key entry leave empty splits (LSE -inf, weight 0); entry 1 has no keys
    q, cache, table, kv_lens, lat = _setup(2, [20, 0, 3], 20, 64, 16, 16, torch.float16)
    _check(device, q, cache, table, kv_lens, lat, scale=0.3, L=64, num_splits=8)


def test_split_count_does_not_change_result_beyond_rounding(device):
    q, cache, table, kv_lens, lat = _setup(3, [90, 41], 16, 64, 16, 16, torch.bfloat16)
    o1, l1, _ = _check(device, q, cache, table, kv_lens, lat, scale=0.2, L=64, num_splits=1)
    o4, l4, _ = _check(device, q, cache, table, kv_lens, lat, scale=0.2, L=64, num_splits=4)
    assert torch.allclose(l1, l4, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e4m3fnuz])
def test_fp8_latent_cache_with_scale(fp8, device):
    if fp8 == torch.float8_e4m3fnuz and torch.device(device).type == "cuda":
        pytest.skip("CUDA Triton has no float8_e4m3fnuz (interpreter only)")
    q, cache, table, kv_lens, lat = _setup(4, [23, 64], 16, 512, 64, 16, torch.bfloat16, fp8, kv_scale=0.05)
    _check(device, q, cache, table, kv_lens, lat, scale=192 ** -0.5, L=512, kv_scale=0.05, k_mult=4, num_splits=2)
    # the scale really is applied: a wrong kv_scale gives a different answer
    out_bad, _ = md.mla_decode(q.to(device), cache.to(device), table.to(device), kv_lens.to(device), scale=192 ** -0.5,
                               kv_scale=1.0, num_splits=2)
    out_ok, _ = md.mla_decode(q.to(device), cache.to(device), table.to(device), kv_lens.to(device), scale=192 ** -0.5,
                              kv_scale=0.05, num_splits=2)
    assert (out_bad.float() - out_ok.float()).abs().max() > 0.1


def test_wrong_scale_is_detected_by_this_check(device):
    # the budget has teeth: 1/sqrt(576) instead of the layer scale fails the row rule
    q, cache, table, kv_lens, lat = _setup(5, [40], 16, 512, 64, 16, torch.bfloat16)
    out, _ = md.mla_decode(q.to(device), cache.to(device), table.to(device), kv_lens.to(device), scale=576 ** -0.5, num_splits=2)
    keys = lat[0].double()
    ref, _ = mha.attention(q[0:1].double(), keys[:, None], keys[:, None, :512], scale=192 ** -0.5, causal=False)
    pt, _ = lowp.attention_lowp(q[0:1], lat[0][:, None], lat[0][:, None, :512], scale=192 ** -0.5, causal=False)
    err = (out[0:1].cpu().double() - ref).abs().amax(-1)
    assert torch.any(err > 2 * (pt.double() - ref).abs().amax(-1) + 2 * _round_step(ref, torch.bfloat16))


def test_bad_inputs_name_the_argument():
    q, cache, table, kv_lens, _ = _setup(6, [4], 2, 64, 16, 16, torch.float16)
    with pytest.raises(ValueError, match="kv_cache"):
        md.mla_decode(q, cache[..., :70], table, kv_lens, scale=0.1, kv_lora_rank=64)
    with pytest.raises(ValueError, match="kv_lens"):
        md.mla_decode(q, cache, table, kv_lens[:0], scale=0.1, kv_lora_rank=64)
    with pytest.raises(ValueError, match="q: dtype"):
        md.mla_decode(q.float(), cache, table, kv_lens, scale=0.1, kv_lora_rank=64)
    with pytest.raises(ValueError, match="scale"):
        md.mla_decode(q, cache, table, kv_lens, scale=float("nan"), kv_lora_rank=64)


@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")
def test_bench_rows_run_and_agree_small(device):
    # the `attncheck bench` MLA rows at toy size: both decode kernels see the same cache and agree
    from attncheck.bench import mla as mla_bench

    from impl.vllm import bench_rows as vllm_rows

    rows = mla_bench.rows(device, batch=2, context=40, heads=16, num_splits=2)
    assert [r[0].split(",")[0] for r in rows] == [mla_bench.OWN_LABEL, mla_bench.AITER_LABEL,
                                                  vllm_rows.MLA_DECODE_ROW]
    assert rows[0][2] == 2 * 40 * 576 * 2
    own, aiter = (fn().float().cpu() for _, fn, _ in rows[:2])
    assert torch.isfinite(own).all() and (own - aiter).abs().max() < 2e-2
    try:  # the third row: vLLM's decode on the same cache (or the reason it cannot run here)
        vllm = rows[2][1]().float().cpu()
    except RuntimeError as e:
        assert "vLLM not loadable" in str(e)
    else:
        assert (own - vllm).abs().max() < 2e-2
