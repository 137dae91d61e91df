"""The chunked-context extend pipeline equals one-pass attention, whatever the chunk size."""

import pytest
import torch

from reference.chunked import chunked_extend, chunked_extend_paged, context_chunks, workspace_chunk_tokens
from reference.mha import attention, paged_attention
from reference.paged import slot_mapping_for, write_kv

pytestmark = pytest.mark.smoke

BLOCK = 16
# (context, new tokens): a decode, zero-context prefills next to multi-chunk extends
SEQS = [(23, 1), (0, 5), (40, 4), (3, 3), (0, 1), (17, 6)]


def _batch(seqs=SEQS, hq=4, hkv=2, d=8, cache_dtype=torch.float64, k_scale=1.0, v_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in seqs]
    query_lens = [n for _, n in seqs]
    blocks = [-(-s // BLOCK) for s in seq_lens]
    nb = sum(blocks) + 2
    perm = torch.randperm(nb, generator=g)
    table = torch.zeros(len(seqs), max(blocks), dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks):
        table[b, :n] = perm[used:used + n]
        used += n
    kc = torch.full((nb, BLOCK, hkv, d), float("nan")).to(cache_dtype)  # poisoned: unused slots stay NaN
    vc = kc.clone()
    keys = torch.randn(sum(seq_lens), hkv, d, generator=g, dtype=torch.float64)
    values = torch.randn(sum(seq_lens), hkv, d, generator=g, dtype=torch.float64)
    write_kv(keys, values, kc, vc, slot_mapping_for(table, seq_lens, seq_lens, BLOCK), k_scale=k_scale,
             v_scale=v_scale)
    query = torch.randn(sum(query_lens), hq, d, generator=g, dtype=torch.float64)
    qsl = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32)
    # the new tokens' own K/V (the last q_len keys of each sequence), as vLLM's extend receives them
    starts = [0] + torch.tensor(seq_lens).cumsum(0).tolist()
    new_idx = torch.cat([torch.arange(starts[b + 1] - n, starts[b + 1]) for b, n in enumerate(query_lens)])
    return dict(query=query, key_cache=kc, value_cache=vc, block_table=table, query_start_loc=qsl,
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32)), keys[new_idx], values[new_idx]


KNOBS = {
    "plain": {},
    "window5": {"sliding_window": 5},
    "softcap_alibi": {"softcap": 50.0, "alibi_slopes": torch.tensor([0.05, 0.1, 0.2, 0.4])},
    "sinks": {"sinks": torch.tensor([0.5, -1.0, 2.0, 0.0])},
    "non_causal": {"causal": False},
}
CHUNKS = [1, 7, BLOCK - 1, BLOCK + 1, 1000]


def _assert_same(a, b, atol=1e-12):
    (out, lse), (ref_out, ref_lse) = a, b
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out, ref_out, rtol=0, atol=atol)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse[fin], rtol=0, atol=atol)


@pytest.mark.parametrize("chunk", CHUNKS, ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("name", list(KNOBS))
def test_chunked_batch_equals_one_pass(name, chunk):
    batch, _, _ = _batch()
    one_pass = paged_attention(**batch, scale=0.4, **KNOBS[name])
    _assert_same(chunked_extend_paged(**batch, scale=0.4, chunk_tokens=chunk, **KNOBS[name]), one_pass)


@pytest.mark.parametrize("chunk", [1, BLOCK + 1, 1000], ids=lambda c: f"chunk{c}")
def test_chunked_batch_with_new_kv_tensors_equals_one_pass(chunk):
    batch, key, value = _batch()
    one_pass = paged_attention(**batch, scale=0.4)
    _assert_same(chunked_extend_paged(**batch, scale=0.4, chunk_tokens=chunk, key=key, value=value), one_pass)


def test_chunk_plan_mixes_empty_and_full_chunks():
    """The grid really has empty chunks, zero-context rows and multi-chunk rows in one batch."""
    ctx = [c for c, _ in SEQS]
    plan = context_chunks(ctx, 9)
    assert len(plan) == 5  # cdiv(40, 9)
    assert plan[0][0] == (0, 9) and plan[2][0] == (18, 23) and plan[3][0] == (23, 23)
    assert all(plan[c][1] == (0, 0) for c in range(5))  # zero-context prefill: empty in every chunk
    assert plan[4][2] == (36, 40)
    assert context_chunks([], 4) == [] and context_chunks([0, 0], 4) == []


def test_workspace_chunking_is_not_block_rounded():
    assert workspace_chunk_tokens(3) == 32768 // 3 == 10922  # not a multiple of 16
    batch, _, _ = _batch()
    one_pass = paged_attention(**batch, scale=0.4)
    # 4 extends share a 50-token workspace -> 12-token chunks
    _assert_same(chunked_extend_paged(**batch, scale=0.4, workspace_tokens=50), one_pass)
    with pytest.raises(ValueError, match="num_extends"):
        workspace_chunk_tokens(0)


@pytest.mark.parametrize("fp8_dtype", [torch.float8_e4m3fn, torch.float8_e4m3fnuz])
def test_chunked_fp8_context_is_dequantised(fp8_dtype):
    batch, _, _ = _batch(cache_dtype=fp8_dtype, k_scale=0.5, v_scale=0.25)
    one_pass = paged_attention(**batch, scale=0.4, k_scale=0.5, v_scale=0.25)
    chunked = chunked_extend_paged(**batch, scale=0.4, chunk_tokens=7, k_scale=0.5, v_scale=0.25)
    _assert_same(chunked, one_pass)
    # teeth: gathering the fp8 context without its scale (vLLM bug #29887) is far off
    undequantised = chunked_extend_paged(**batch, scale=0.4, chunk_tokens=7)
    assert (undequantised[0] - one_pass[0]).abs().max() > 1e-2


def test_sink_applied_per_chunk_is_caught():
    """Teeth: a sink counted in every partial (instead of once) changes the answer."""
    from reference.merge import merge_attn_states

    sinks = KNOBS["sinks"]["sinks"]
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(10, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(10, 2, 8, generator=g, dtype=torch.float64)
    whole = attention(q, k, v, scale=0.4, sinks=sinks)
    wrong = merge_attn_states(*attention(q, k[:7], v[:7], scale=0.4, sinks=sinks, causal=False),
                              *attention(q, k[7:], v[7:], scale=0.4, sinks=sinks))
    assert (wrong[0] - whole[0]).abs().max() > 1e-3


@pytest.mark.parametrize("chunk", [1, 3, 4, 11, 50])
@pytest.mark.parametrize("name", ["plain", "window5", "sinks", "softcap_alibi"])
def test_single_sequence_chunked_extend(name, chunk):
    g = torch.Generator().manual_seed(4)
    ctx, new = 11, 4
    q = torch.randn(new, 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(ctx + new, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(ctx + new, 2, 6, generator=g, dtype=torch.float64)
    whole = attention(q, k, v, scale=0.4, **KNOBS[name])
    got = chunked_extend(q, k[ctx:], v[ctx:], k[:ctx], v[:ctx], scale=0.4, chunk_tokens=chunk, **KNOBS[name])
    _assert_same(got, whole)


def test_bad_arguments():
    batch, key, value = _batch()
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_extend_paged(**batch, scale=0.4, chunk_tokens=0)
    with pytest.raises(ValueError, match="key/value"):
        chunked_extend_paged(**batch, scale=0.4, key=key)
    q = torch.zeros(3, 4, 8, dtype=torch.float64)
    kv = torch.zeros(5, 2, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="k_new"):
        chunked_extend(q, kv, kv, kv, kv, scale=1.0, chunk_tokens=2)
