"""The paged cache: fp8 storage, write/gather round trips, layouts, slots, paged == contiguous."""

import pytest
import torch

from reference.mha import attention, paged_attention
from reference.paged import (dequantize, gather_kv, hnd_to_nhd, nhd_to_hnd, quantize_fp8, slot_mapping_for,
                             write_kv)

pytestmark = pytest.mark.smoke

FN, FNUZ = torch.float8_e4m3fn, torch.float8_e4m3fnuz


# ---- fp8 -------------------------------------------------------------------------------------

def _all_finite_values(fp8_dtype):
    vals = torch.arange(256, dtype=torch.uint8).view(fp8_dtype).float()
    return vals[torch.isfinite(vals)]


@pytest.mark.parametrize("fp8_dtype", [FN, FNUZ])
@pytest.mark.parametrize("scale", [1.0, 0.5, 3.0])
def test_quantize_is_exact_for_representable_values(fp8_dtype, scale):
    vals = _all_finite_values(fp8_dtype)
    stored = quantize_fp8(vals * scale, scale, fp8_dtype)
    assert stored.dtype == fp8_dtype
    assert torch.equal(stored.float(), vals)
    assert torch.equal(dequantize(stored, scale, torch.float64), vals.double() * scale)


@pytest.mark.parametrize("fp8_dtype,fmax,q250", [(FN, 448.0, 256.0), (FNUZ, 240.0, 240.0)])
def test_quantize_saturates(fp8_dtype, fmax, q250):
    x = torch.tensor([1e6, -1e6, fmax * 1.01, float("inf"), -float("inf")])
    assert quantize_fp8(x, 1.0, fp8_dtype).float().tolist() == [fmax, -fmax, fmax, fmax, -fmax]
    # 1000 / 4 = 250: fn rounds to 256 (step 16 in [128, 256)), fnuz saturates at 240
    assert quantize_fp8(torch.tensor([1000.0]), 4.0, fp8_dtype).float().item() == q250
    # a scale brings a large value back into range
    assert quantize_fp8(torch.tensor([896.0]), 4.0, fp8_dtype).float().item() == 224.0


@pytest.mark.parametrize("fp8_dtype", [FN, FNUZ])
def test_quantize_rounds_to_nearest_even(fp8_dtype):
    # between 1 and 2 the step is 1/8: 1.0625 is halfway 1.0|1.125 -> 1.0 (even mantissa),
    # 1.1875 is halfway 1.125|1.25 -> 1.25 (even); 1.07 is nearer 1.125
    x = torch.tensor([1.0625, 1.1875, 1.07, -1.0625])
    assert quantize_fp8(x, 1.0, fp8_dtype).float().tolist() == [1.0, 1.25, 1.125, -1.0]


def test_fn_and_fnuz_differ():
    x = torch.tensor([1.0, 300.0])
    fn, fnuz = quantize_fp8(x, 1.0, FN), quantize_fp8(x, 1.0, FNUZ)
    assert fn.view(torch.uint8)[0] != fnuz.view(torch.uint8)[0]  # exponent bias 7 vs 8
    assert fn.float()[1] == 288.0 and fnuz.float()[1] == 240.0  # fnuz saturates at 240
    # reading fn bytes as fnuz (bug class: hard-coded fp8 view) halves every value
    assert fn.view(torch.uint8).view(FNUZ).float()[0] == 0.5


def test_dequantize_non_fp8_is_a_cast():
    x = torch.randn(5, dtype=torch.bfloat16)
    assert torch.equal(dequantize(x, 7.0, torch.float64), x.double())


@pytest.mark.parametrize("kw,message", [({"fp8_dtype": torch.float16}, "fp8_dtype"),
                                        ({"fp8_dtype": FN, "scale": 0.0}, "scale")])
def test_quantize_bad_arguments(kw, message):
    args = {"scale": 1.0, **kw}
    with pytest.raises(ValueError, match=message):
        quantize_fp8(torch.ones(2), args["scale"], args["fp8_dtype"])


# ---- write / gather --------------------------------------------------------------------------

def _cache(nb, bs, h, d, dtype=torch.float64, layout="NHD"):
    shape = (nb, bs, h, d) if layout == "NHD" else (nb, h, bs, d)
    return torch.full(shape, float("nan"), dtype=torch.float32).to(dtype)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_write_then_gather_round_trips(layout):
    g = torch.Generator().manual_seed(0)
    nb, bs, h, d, n = 6, 4, 3, 5, 13
    table = torch.randperm(nb, generator=g)[:4].to(torch.int32)
    key = torch.randn(n, h, d, generator=g, dtype=torch.float64)
    value = torch.randn(n, h, d, generator=g, dtype=torch.float64)
    kc, vc = _cache(nb, bs, h, d, layout=layout), _cache(nb, bs, h, d, layout=layout)
    slots = slot_mapping_for(table[None], [n], [n], bs)
    write_kv(key, value, kc, vc, slots, layout=layout)
    k, v = gather_kv(kc, vc, table, 0, n, layout=layout, dtype=torch.float64)
    assert torch.equal(k, key) and torch.equal(v, value)
    k, v = gather_kv(kc, vc, table, 5, 11, layout=layout, dtype=torch.float64)
    assert torch.equal(k, key[5:11]) and torch.equal(v, value[5:11])
    assert torch.isnan(kc).sum() == (nb * bs - n) * h * d  # nothing outside the slots was touched


def test_hnd_write_equals_converted_nhd_write():
    g = torch.Generator().manual_seed(1)
    key = torch.randn(7, 2, 4, generator=g)
    slots = torch.tensor([3, 9, 0, 14, 5, 6, 11])
    nhd, hnd = torch.zeros(4, 4, 2, 4), torch.zeros(4, 2, 4, 4)
    write_kv(key, key, nhd, nhd.clone(), slots)
    write_kv(key, key, hnd, hnd.clone(), slots, layout="HND")
    assert torch.equal(nhd_to_hnd(nhd), hnd) and torch.equal(hnd_to_nhd(hnd), nhd)
    assert nhd[2, 1].tolist() == key[1].tolist()  # slot 9 = block 2, offset 1


@pytest.mark.parametrize("fp8_dtype", [FN, FNUZ])
def test_fp8_write_quantises_and_gather_dequantises(fp8_dtype):
    g = torch.Generator().manual_seed(2)
    key = torch.randn(5, 2, 8, generator=g, dtype=torch.bfloat16) * 100
    value = torch.randn(5, 2, 8, generator=g, dtype=torch.bfloat16)
    kc = torch.zeros(2, 4, 2, 8, dtype=fp8_dtype)
    vc = torch.zeros(2, 4, 2, 8, dtype=fp8_dtype)
    table = torch.tensor([1, 0], dtype=torch.int32)
    write_kv(key, value, kc, vc, slot_mapping_for(table[None], [5], [5], 4), k_scale=0.75, v_scale=0.25)
    k, v = gather_kv(kc, vc, table, 0, 5, k_scale=0.75, v_scale=0.25, dtype=torch.float64)
    assert torch.equal(k, quantize_fp8(key, 0.75, fp8_dtype).double() * 0.75)
    assert torch.equal(v, quantize_fp8(value, 0.25, fp8_dtype).double() * 0.25)
    # a gather that forgets the scale is visibly wrong
    k_raw, _ = gather_kv(kc, vc, table, 0, 5, dtype=torch.float64)
    assert (k_raw - k).abs().max() > 1.0


def test_mla_cache_without_values():
    g = torch.Generator().manual_seed(3)
    latent = torch.randn(6, 1, 576, generator=g, dtype=torch.bfloat16)
    cache = torch.zeros(3, 4, 1, 576, dtype=torch.bfloat16)
    slots = torch.tensor([4, 5, 6, 7, 0, 1])
    write_kv(latent, None, cache, None, slots)
    k, v = gather_kv(cache, None, torch.tensor([1, 0]), 0, 6, dtype=torch.bfloat16)
    assert v is None and torch.equal(k, latent)
    flat = torch.zeros(3, 4, 576, dtype=torch.bfloat16)  # 3-D MLA cache [nb, bs, L + R]
    write_kv(latent[:, 0], None, flat, None, slots)
    assert torch.equal(flat[1, 2], latent[2, 0])


def test_negative_slots_are_padding_and_skipped():
    cache = torch.zeros(2, 2, 1, 1)
    write_kv(torch.ones(3, 1, 1), torch.ones(3, 1, 1), cache, cache.clone(), torch.tensor([2, -1, 0]))
    assert cache.flatten().tolist() == [1.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("kwargs,message", [
    ({"layout": "XYZ"}, "layout"),
    ({"slot_mapping": torch.tensor([0, 0])}, "same slot"),
    ({"slot_mapping": torch.tensor([0, 99])}, "slot_mapping"),
    ({"slot_mapping": torch.tensor([0])}, "slot_mapping"),
    ({"value_cache": None}, "value"),
    ({"key": torch.ones(2, 1, 3)}, "key"),
])
def test_write_kv_bad_arguments(kwargs, message):
    args = dict(key=torch.ones(2, 1, 2), value=torch.ones(2, 1, 2), key_cache=torch.zeros(2, 2, 1, 2),
                value_cache=torch.zeros(2, 2, 1, 2), slot_mapping=torch.tensor([0, 1]))
    args.update(kwargs)
    layout = args.pop("layout", "NHD")
    with pytest.raises(ValueError, match=message):
        write_kv(args.pop("key"), args.pop("value"), args.pop("key_cache"), args.pop("value_cache"),
                 args.pop("slot_mapping"), layout=layout)


def test_slot_mapping_for_new_tokens():
    table = torch.tensor([[5, 2, 0], [1, 3, 4]], dtype=torch.int32)
    # seq 0: 6 keys, 2 new -> positions 4, 5 -> block 2 (bs 4) offsets 0, 1 -> slots 8, 9
    # seq 1: 9 keys, 3 new -> positions 6, 7, 8 -> blocks 3, 3, 4 -> 14, 15, 16
    slots = slot_mapping_for(table, torch.tensor([6, 9]), [2, 3], 4)
    assert slots.dtype == torch.int64 and slots.tolist() == [8, 9, 14, 15, 16]
    with pytest.raises(ValueError, match="block_table"):
        slot_mapping_for(table, [13, 1], [1, 1], 4)
    with pytest.raises(ValueError, match="query_lens"):
        slot_mapping_for(table, [2, 1], [3, 1], 4)


# ---- paged attention == contiguous attention -------------------------------------------------

def _paged_batch(seq_lens, query_lens, hq=4, hkv=2, d=8, bs=4, cache_dtype=torch.float64, k_scale=1.0,
                 v_scale=1.0, seed=0):
    """Random per-sequence K/V written through a random permuted block table into a NaN cache."""
    g = torch.Generator().manual_seed(seed)
    blocks = [-(-s // bs) for s in seq_lens]
    nb = sum(blocks) + 3  # spare blocks stay NaN
    perm = torch.randperm(nb, generator=g)
    table = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks):
        table[b, :n] = perm[used:used + n]
        used += n
    keys = [torch.randn(s, hkv, d, generator=g, dtype=torch.float64) for s in seq_lens]
    values = [torch.randn(s, hkv, d, generator=g, dtype=torch.float64) for s in seq_lens]
    kc, vc = _cache(nb, bs, hkv, d, cache_dtype), _cache(nb, bs, hkv, d, cache_dtype)
    all_slots = slot_mapping_for(table, seq_lens, seq_lens, bs)
    write_kv(torch.cat(keys), torch.cat(values), kc, vc, all_slots, k_scale=k_scale, v_scale=v_scale)
    query = torch.randn(sum(query_lens), hq, d, generator=g, dtype=torch.float64)
    qsl = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32)
    return query, keys, values, kc, vc, table, qsl, torch.tensor(seq_lens, dtype=torch.int32)


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("knobs", [{}, {"sliding_window": 3, "softcap": 50.0},
                                   {"alibi": True, "sinks": True}, {"causal": False}],
                         ids=["plain", "window_softcap", "alibi_sinks", "non_causal"])
def test_paged_equals_contiguous(knobs, streaming):
    seq_lens, query_lens = [9, 1, 6, 13], [1, 1, 6, 5]
    query, keys, values, kc, vc, table, qsl, sl = _paged_batch(seq_lens, query_lens)
    kw = dict(knobs)
    kw["alibi_slopes"] = torch.rand(4) if kw.pop("alibi", False) else None
    kw["sinks"] = torch.randn(4) if kw.pop("sinks", False) else None
    out, lse = paged_attention(query, kc, vc, table, qsl, sl, scale=0.4, streaming=streaming, block_n=3,
                               block_m=2, **kw)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()  # NaN-poisoned slots stayed unread
    for b in range(len(seq_lens)):
        rows = slice(int(qsl[b]), int(qsl[b + 1]))
        o, l = attention(query[rows], keys[b], values[b], scale=0.4, **kw)
        torch.testing.assert_close(out[rows], o, rtol=0, atol=1e-13)
        torch.testing.assert_close(lse[:, rows], l, rtol=0, atol=1e-13)


@pytest.mark.parametrize("fp8_dtype", [FN, FNUZ])
def test_paged_fp8_equals_contiguous_on_dequantised_values(fp8_dtype):
    seq_lens, query_lens = [7, 10], [3, 1]
    query, keys, values, kc, vc, table, qsl, sl = _paged_batch(seq_lens, query_lens, cache_dtype=fp8_dtype,
                                                              k_scale=0.5, v_scale=0.25)
    out, lse = paged_attention(query, kc, vc, table, qsl, sl, scale=0.4, k_scale=0.5, v_scale=0.25)
    for b in range(2):
        rows = slice(int(qsl[b]), int(qsl[b + 1]))
        k = quantize_fp8(keys[b], 0.5, fp8_dtype).double() * 0.5
        v = quantize_fp8(values[b], 0.25, fp8_dtype).double() * 0.25
        o, l = attention(query[rows], k, v, scale=0.4)
        torch.testing.assert_close(out[rows], o, rtol=0, atol=1e-13)
        torch.testing.assert_close(lse[:, rows], l, rtol=0, atol=1e-13)


def test_wrong_block_table_is_caught():
    """Teeth: swapping two block-table entries changes the answer (the test reads through the table)."""
    query, keys, values, kc, vc, table, qsl, sl = _paged_batch([12], [4])
    good, _ = paged_attention(query, kc, vc, table, qsl, sl, scale=0.4)
    swapped = table.clone()
    swapped[0, [0, 2]] = swapped[0, [2, 0]]  # the last block holds keys only later queries see
    bad, _ = paged_attention(query, kc, vc, swapped, qsl, sl, scale=0.4)
    assert (bad - good).abs().max() > 1e-3


def test_reading_past_seq_len_would_leak_nan():
    """Teeth: one key too many reads a NaN-poisoned slot, so the NaN check above has bite."""
    query, keys, values, kc, vc, table, qsl, sl = _paged_batch([6], [2])
    out, _ = paged_attention(query, kc, vc, table, qsl, sl + 1, scale=0.4)
    assert torch.isnan(out).any()


def test_paged_bad_arguments():
    query, keys, values, kc, vc, table, qsl, sl = _paged_batch([6, 3], [2, 1])
    with pytest.raises(ValueError, match="query_start_loc"):
        paged_attention(query, kc, vc, table, qsl[:-1], sl, scale=1.0)
    with pytest.raises(ValueError, match="seq_lens"):
        paged_attention(query, kc, vc, table, qsl, torch.tensor([1, 3]), scale=1.0)
    with pytest.raises(ValueError, match="key_cache"):
        paged_attention(query, kc[0], vc, table, qsl, sl, scale=1.0)
    with pytest.raises(ValueError, match="block_table"):
        paged_attention(query, kc, vc, table[:1], qsl, sl, scale=1.0)
