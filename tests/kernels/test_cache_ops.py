"""impl.triton.cache_ops against reference.paged: cache writes bit-exact, gathers exact."""

import pytest
import torch

from impl.triton import cache_ops
from reference import paged

pytestmark = pytest.mark.smoke
CACHE_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.float8_e4m3fnuz]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _poisoned_cache(device, shape, dtype):
    c = torch.full(shape, float("nan"), dtype=torch.float32)
    return c.to(dtype).to(device)


def _model_dtype(cache_dtype):
    return torch.bfloat16 if cache_dtype in cache_ops.FP8_DTYPES else cache_dtype


def _skip_fnuz(device, dtype):
    if dtype == torch.float8_e4m3fnuz and torch.device(device).type == "cuda":  # CUDA Triton has no e4m3fnuz
        pytest.skip("CUDA Triton has no float8_e4m3fnuz (interpreter only)")


def _same_bits(a, b):
    if a.dtype in cache_ops.FP8_DTYPES:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    ia = a.view(torch.int16 if a.element_size() == 2 else torch.int32)
    ib = b.view(torch.int16 if b.element_size() == 2 else torch.int32)
    return torch.equal(ia, ib)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
@pytest.mark.parametrize("block_size", [16, 48])
def test_write_matches_reference_bit_exact(layout, cache_dtype, block_size, device):
    _skip_fnuz(device, cache_dtype)
    nb, H, D, T = 6, 2, 40, 11
    g = _gen(1)
    dt = _model_dtype(cache_dtype)
    key = (torch.randn(T, H, D, generator=g) * 30).to(dt).to(device)  # large values hit the fp8 clamp
    value = (torch.randn(T, H, D, generator=g) * 0.3).to(dt).to(device)
    slots = torch.randperm(nb * block_size, generator=g)[:T].to(torch.int64)
    slots[3] = -1  # padding token: skipped
    slots = slots.to(device)
    shape = (nb, block_size, H, D) if layout == "NHD" else (nb, H, block_size, D)
    kc, vc = _poisoned_cache(device, shape, cache_dtype), _poisoned_cache(device, shape, cache_dtype)
    rk, rv = kc.clone(), vc.clone()
    cache_ops.reshape_and_cache(key, value, kc, vc, slots, layout=layout, k_scale=0.37, v_scale=0.0173)
    paged.write_kv(key, value, rk, rv, slots, layout=layout, k_scale=0.37, v_scale=0.0173)
    assert _same_bits(kc, rk) and _same_bits(vc, rv)


@pytest.mark.parametrize("three_d", [False, True])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_write_mla_latent_cache(three_d, cache_dtype, device):
    nb, bs, T, W = 3, 16, 5, 576
    g = _gen(2)
    dt = _model_dtype(cache_dtype)
    shape = (nb, bs, W) if three_d else (nb, bs, 1, W)
    key = torch.randn((T, W) if three_d else (T, 1, W), generator=g).to(dt).to(device)
    slots = torch.tensor([0, 17, -1, 40, 5], dtype=torch.int64, device=device)
    c = _poisoned_cache(device, shape, cache_dtype)
    r = c.clone()
    cache_ops.reshape_and_cache(key, None, c, None, slots, k_scale=0.5)
    paged.write_kv(key, None, r, None, slots, k_scale=0.5)
    assert _same_bits(c, r)


def _table_and_cache(device, cache_dtype, layout, nseq, block_size, max_blocks, H, D, seed):
    g = _gen(seed)
    nb = nseq * max_blocks + 2
    shape = (nb, block_size, H, D) if layout == "NHD" else (nb, H, block_size, D)
    vals = torch.randn((2,) + shape, generator=g) * 4
    kc = vals[0].to(torch.float32).clamp(-200, 200).to(cache_dtype).to(device)
    vc = vals[1].to(torch.float32).clamp(-200, 200).to(cache_dtype).to(device)
    bt = torch.randperm(nb, generator=g)[: nseq * max_blocks].view(nseq, max_blocks).to(torch.int32).to(device)
    return kc, vc, bt


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_gather_matches_reference(layout, cache_dtype, out_dtype, device):
    _skip_fnuz(device, cache_dtype)
    bs, H, D = 16, 2, 24
    lens, starts = [5, 0, 37], [3, 0, 11]  # a zero-length sequence in the middle
    kc, vc, bt = _table_and_cache(device, cache_dtype, layout, 3, bs, 4, H, D, 3)
    cu = torch.tensor([0, 5, 5, 42], dtype=torch.int32, device=device)
    k, v = cache_ops.gather_cache(kc, vc, bt, cu, torch.tensor(starts, dtype=torch.int32, device=device),
                                  k_scale=0.37, v_scale=0.0173, out_dtype=out_dtype, layout=layout)
    assert k.shape == (42, H, D) and v.shape == (42, H, D) and k.dtype == out_dtype
    for i, (n, s) in enumerate(zip(lens, starts)):
        rk, rv = paged.gather_kv(kc, vc, bt[i], s, s + n, layout=layout, k_scale=0.37, v_scale=0.0173,
                                 dtype=out_dtype)
        lo = int(cu[i])
        assert _same_bits(k[lo:lo + n], rk) and _same_bits(v[lo:lo + n], rv), f"sequence {i}"


def test_gather_block_size_544_and_mla(device):
    bs, W = 544, 576
    g = _gen(4)
    kc = torch.randn(3, bs, 1, W, generator=g).to(torch.bfloat16).to(device)
    bt = torch.tensor([[2, 0], [1, 2]], dtype=torch.int32, device=device)
    cu = torch.tensor([0, 600, 610], dtype=torch.int32, device=device)
    k, v = cache_ops.gather_cache(kc, None, bt, cu, torch.tensor([0, 540], dtype=torch.int32, device=device),
                                  out_dtype=torch.bfloat16)
    assert v is None
    r0, _ = paged.gather_kv(kc, None, bt[0], 0, 600, dtype=torch.bfloat16)
    r1, _ = paged.gather_kv(kc, None, bt[1], 540, 550, dtype=torch.bfloat16)
    assert torch.equal(k, torch.cat([r0, r1]))


def test_bad_inputs_name_the_argument(device):
    kc = torch.zeros(2, 16, 2, 8, device=device)
    key = torch.zeros(3, 2, 8, device=device)
    slots = torch.arange(3, device=device)
    with pytest.raises(ValueError, match="layout"):
        cache_ops.reshape_and_cache(key, key, kc, kc.clone(), slots, layout="NDH")
    with pytest.raises(ValueError, match="value/value_cache"):
        cache_ops.reshape_and_cache(key, key, kc, None, slots)
    with pytest.raises(ValueError, match="key"):
        cache_ops.reshape_and_cache(torch.zeros(3, 4, 8, device=device), None, kc, None, slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        cache_ops.reshape_and_cache(key, None, kc, None, slots[:2])
    with pytest.raises(ValueError, match="k_scale"):
        cache_ops.reshape_and_cache(key, None, kc, None, slots, k_scale=0.0)
    bt = torch.zeros(1, 1, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="cu_seq_lens"):
        cache_ops.gather_cache(kc, None, bt, torch.tensor([0], device=device), torch.tensor([0], device=device),
                               out_dtype=torch.float32)
    with pytest.raises(ValueError, match="out_dtype"):
        cache_ops.gather_cache(kc, None, bt, torch.tensor([0, 1], device=device), torch.tensor([0], device=device),
                               out_dtype=torch.int8)
