"""Self-tests of the MLA reference (reference/mla.py): the two paths are one sum, chunking and
paging do not change it, the fp8 latent cache follows the storage convention, and the math
matches a naive per-head loop written straight from the equations."""

import math

import pytest
import torch

from reference import mla

pytestmark = pytest.mark.smoke

F64 = torch.float64


def _rand_case(seed, sq, sk, n=4, L=32, R=8, P=16, V=16, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)
    return dict(
        q_nope=r(sq, n, P).to(dtype), q_pe=r(sq, n, R).to(dtype),
        kv_c=r(sk, L).to(dtype), k_pe=r(sk, R).to(dtype),
        w_uk=(r(L, n, P) / math.sqrt(L)).to(dtype), w_uv=(r(L, n, V) / math.sqrt(L)).to(dtype),
    )


def _naive(c, scale, causal=True):
    """Per head, per query, straight from the definition (loops, no einsum)."""
    q_nope, q_pe, kv_c, k_pe, w_uk, w_uv = (c[k] for k in ("q_nope", "q_pe", "kv_c", "k_pe", "w_uk", "w_uv"))
    sq, n, _ = q_nope.shape
    sk = kv_c.shape[0]
    out = torch.zeros(sq, n, w_uv.shape[-1], dtype=F64)
    for h in range(n):
        k_nope = kv_c @ w_uk[:, h, :]
        v = kv_c @ w_uv[:, h, :]
        for i in range(sq):
            qpos = sk - sq + i
            s = torch.tensor([scale * (q_nope[i, h] @ k_nope[j] + q_pe[i, h] @ k_pe[j]) for j in range(sk)])
            if causal:
                s[qpos + 1:] = float("-inf")
            out[i, h] = torch.softmax(s, 0) @ v
    return out


@pytest.mark.parametrize("path", ["absorbed", "upprojected"])
@pytest.mark.parametrize("sq,sk", [(1, 9), (5, 5), (4, 11)])
def test_paths_match_naive_definition(path, sq, sk):
    c = _rand_case(1, sq, sk)
    out, lse = mla._PATHS[path](**c, scale=0.3)
    ref = _naive(c, 0.3)
    assert torch.allclose(out, ref, atol=1e-12, rtol=0), (out - ref).abs().max()
    assert lse.shape == (4, sq) and torch.isfinite(lse).all()


def test_absorbed_equals_upprojected_to_float64_rounding_deepseek_dims():
    # DeepSeek-V3 sizes (L 512, R 64, P 128, V 128) with the real layer scale.
    c = _rand_case(7, 6, 40, n=3, L=512, R=64, P=128, V=128)
    scale = mla.softmax_scale(192, rope_factor=40.0)
    oa, la = mla.absorbed_attention(**c, scale=scale)
    ou, lu = mla.upprojected_attention(**c, scale=scale)
    # Same sum in a different order: differences are a few float64 ulps of the operands.
    assert (oa - ou).abs().max() <= 1e-12 * ou.abs().max()
    assert (la - lu).abs().max() <= 1e-12 * lu.abs().max()
    # and the outputs are not trivially zero / equal to the mean of v
    assert ou.abs().max() > 1e-2


def test_softmax_scale_uses_qk_dim_and_yarn_mscale():
    assert mla.softmax_scale(192) == pytest.approx(1 / math.sqrt(192))
    m = 0.1 * math.log(40.0) + 1.0  # DeepSeek yarn_get_mscale(40, 1.0) written out
    assert mla.softmax_scale(192, rope_factor=40.0) == pytest.approx(m * m / math.sqrt(192))
    assert mla.yarn_mscale(1.0) == 1.0 and mla.yarn_mscale(0.5, 3.0) == 1.0
    assert mla.softmax_scale(192) != pytest.approx(1 / math.sqrt(576))


@pytest.mark.parametrize("path", ["absorbed", "upprojected"])
@pytest.mark.parametrize("chunk", [1, 3, 7, 100, None])
def test_chunked_context_equals_one_pass(path, chunk):
    sq, ctx = 5, 13
    c = _rand_case(3, sq, ctx + sq)
    full, full_lse = mla._PATHS[path](**c, scale=0.25)
    L = slice(0, ctx)
    N = slice(ctx, ctx + sq)
    out, lse = mla.chunked_prefill(c["q_nope"], c["q_pe"], c["kv_c"][N], c["k_pe"][N], c["kv_c"][L],
                                   c["k_pe"][L], c["w_uk"], c["w_uv"], scale=0.25, chunk_tokens=chunk, path=path)
    assert (out - full).abs().max() <= 1e-12
    assert (lse - full_lse).abs().max() <= 1e-12


def test_empty_row_and_merge_of_two_empty_states():
    c = _rand_case(4, 3, 3)
    out, lse = mla.absorbed_attention(**c, scale=0.5, q_offset=-1)  # query 0 sees no key
    assert torch.all(out[0] == 0) and torch.all(lse[:, 0] == float("-inf"))
    assert torch.isfinite(out).all()
    o = torch.randn(2, 4, 16, dtype=F64)
    neg = torch.full((4, 2), float("-inf"), dtype=F64)
    pos = torch.full((4, 2), float("inf"), dtype=F64)
    mo, ml = mla.merge_states(o, pos, o, neg)
    assert torch.all(mo == 0) and torch.all(ml == float("-inf"))


def _paged_setup(dtype, cache_dtype, kv_scale, bs=4, seed=5):
    g = torch.Generator().manual_seed(seed)
    qlens, slens = [1, 3, 4], [9, 10, 4]
    T, n, L, R, P, V = sum(qlens), 2, 32, 8, 16, 16
    all_lat = [torch.randn(s, L + R, generator=g, dtype=F64) for s in slens]
    nblk = [-(-s // bs) for s in slens]
    perm = torch.randperm(sum(nblk) + 3, generator=g)
    table = torch.zeros(len(slens), max(nblk), dtype=torch.int32)
    k = 0
    for b, m in enumerate(nblk):
        table[b, :m] = perm[k:k + m].to(torch.int32)
        k += m
    cache = torch.full((sum(nblk) + 3, bs, L + R), float("nan"), dtype=F64).to(cache_dtype)
    slots, new = [], []
    for b, (q, s) in enumerate(zip(qlens, slens)):
        ctx = s - q
        sl = [int(table[b, p // bs]) * bs + p % bs for p in range(s)]
        mla.write_latent(all_lat[b][:ctx, :L], all_lat[b][:ctx, L:], cache, torch.tensor(sl[:ctx], dtype=torch.int64), kv_scale)
        slots += sl[ctx:]
        new.append(all_lat[b][ctx:])
    new = torch.cat(new)
    qsl = torch.tensor([0, 1, 4, 8], dtype=torch.int32)
    q_nope = torch.randn(T, n, P, generator=g, dtype=F64)
    q_pe = torch.randn(T, n, R, generator=g, dtype=F64)
    w_uk = torch.randn(L, n, P, generator=g, dtype=F64) / math.sqrt(L)
    w_uv = torch.randn(L, n, V, generator=g, dtype=F64) / math.sqrt(L)
    return dict(q_nope=q_nope.to(dtype), q_pe=q_pe.to(dtype), w_uk=w_uk.to(dtype), w_uv=w_uv.to(dtype),
                cache=cache, table=table, qsl=qsl, seq_lens=torch.tensor(slens, dtype=torch.int32),
                slots=torch.tensor(slots, dtype=torch.int64), new=new.to(dtype), all_lat=all_lat, L=L)


def test_paged_equals_per_sequence_and_write_is_exact():
    s = _paged_setup(F64, F64, 1.0)
    mla.write_latent(s["new"][:, :s["L"]], s["new"][:, s["L"]:], s["cache"], s["slots"])
    flat = s["cache"].view(-1, s["cache"].shape[-1])
    assert torch.equal(flat[s["slots"]], s["new"])
    out, lse = mla.paged_mla(s["q_nope"], s["q_pe"], s["cache"], s["w_uk"], s["w_uv"], s["table"], s["qsl"],
                             s["seq_lens"], scale=0.2)
    qsl = s["qsl"].tolist()
    for b, lat in enumerate(s["all_lat"]):
        a, e = qsl[b], qsl[b + 1]
        o, l = mla.upprojected_attention(s["q_nope"][a:e], s["q_pe"][a:e], lat[:, :s["L"]], lat[:, s["L"]:],
                                         s["w_uk"], s["w_uv"], scale=0.2)
        assert (out[a:e] - o).abs().max() <= 1e-12 and (lse[:, a:e] - l).abs().max() <= 1e-12
    # chunked context through the paged entry point, both paths
    for path in ("absorbed", "upprojected"):
        oc, lc = mla.paged_mla(s["q_nope"], s["q_pe"], s["cache"], s["w_uk"], s["w_uv"], s["table"], s["qsl"],
                               s["seq_lens"], scale=0.2, path=path, context_chunk_tokens=2)
        assert (oc - out).abs().max() <= 1e-12 and (lc - lse).abs().max() <= 1e-12


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e4m3fnuz])
def test_fp8_latent_cache_convention(fp8):
    x = torch.tensor([[0.0, 1.0, -3.3, 1000.0, -1000.0, 0.017]], dtype=torch.bfloat16)
    cache = torch.zeros(2, 2, 6, dtype=fp8)
    mla.write_latent(x[:, :4], x[:, 4:], cache, torch.tensor([3]), kv_scale=0.5)
    stored = cache.view(-1, 6)[3]
    m = 448.0 if fp8 == torch.float8_e4m3fn else 240.0
    want = (x[0].float() / 0.5).clamp(-m, m).to(fp8)
    assert torch.equal(stored.view(torch.uint8), want.view(torch.uint8))
    assert stored[3].float() == m and stored[4].float() == -m  # saturates, never NaN
    back = mla.gather_latent(cache, torch.tensor([0, 1]), 3, 4, kv_scale=0.5)
    assert back.dtype == F64 and back[0, 1] == 1.0 and back[0, 3] == m * 0.5


def test_fp8_prefill_reads_raw_new_tokens_and_dequantised_context():
    s = _paged_setup(torch.bfloat16, torch.float8_e4m3fn, 0.25)
    L = s["L"]
    mla.write_latent(s["new"][:, :L], s["new"][:, L:], s["cache"], s["slots"], 0.25)
    args = (s["q_nope"], s["q_pe"], s["cache"], s["w_uk"], s["w_uv"], s["table"], s["qsl"], s["seq_lens"])
    from_cache, _ = mla.paged_mla(*args, scale=0.2, kv_scale=0.25)
    raw_new, _ = mla.paged_mla(*args, scale=0.2, kv_scale=0.25, path="upprojected",
                               new_kv_c=s["new"][:, :L], new_k_pe=s["new"][:, L:])
    # the two differ only through the fp8 rounding of the new tokens: small but not zero
    d = (from_cache - raw_new).abs().max()
    assert 0 < d < 0.1 * from_cache.abs().max()
    assert torch.isfinite(from_cache).all()  # NaN-poisoned unused slots never read


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_paths_are_close_but_not_exact(dtype):
    c = _rand_case(9, 6, 30, n=4, L=64, R=16, P=32, V=32)
    ref, _ = mla.upprojected_attention(**c, scale=0.15)
    lp = {k: v.to(dtype) for k, v in c.items()}
    eps = torch.finfo(dtype).eps
    for path in ("absorbed", "upprojected"):
        out, lse = mla._PATHS[path](**lp, scale=0.15, lowp=True)
        assert out.dtype == dtype and lse.dtype == torch.float32
        err = (out.double() - ref).abs().max() / ref.abs().max()
        # error comes from inputs rounded to `dtype` plus the math: a few eps, never zero
        assert 0 < err < 32 * eps, (path, err)


def test_auto_path_picks_the_cheaper_and_matches():
    assert mla.cheaper_path(1, 4096, 16, 512, 64, 128, 128) == "absorbed"  # decode
    assert mla.cheaper_path(3616, 23616, 16, 512, 64, 128, 128) == "upprojected"  # long prefill
    s = _paged_setup(F64, F64, 1.0)
    mla.write_latent(s["new"][:, :s["L"]], s["new"][:, s["L"]:], s["cache"], s["slots"])
    args = (s["q_nope"], s["q_pe"], s["cache"], s["w_uk"], s["w_uv"], s["table"], s["qsl"], s["seq_lens"])
    oa, la = mla.paged_mla(*args, scale=0.2, path="absorbed")
    ou, lu = mla.paged_mla(*args, scale=0.2, path="auto")
    assert (oa - ou).abs().max() <= 1e-12 and (la - lu).abs().max() <= 1e-12
