"""impl.triton.unified_attention against reference.mha.paged_attention (float64).

Pass rule (DESIGN.md): per (token, head) row, max|o - ref| <= k * max|pt - ref| + 2 * rounding
step of ref in the output dtype, with pt = reference.lowp (the same math in the model dtype);
k = 2, 3 with softcap/ALiBi, 4 with fp8. LSE per row within k * |lse_pt - lse_ref| + 1e-5 (natural
log, float32). Unused cache slots are NaN: a kernel that reads them fails.
"""

import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from impl.triton import unified_attention as ua
from reference import lowp, mha, paged

pytestmark = pytest.mark.smoke
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FP8 = {"fn": torch.float8_e4m3fn, "fnuz": torch.float8_e4m3fnuz}


@dataclass
class Spec:
    seq_lens: tuple
    query_lens: tuple
    hq: int = 4
    hkv: int = 2
    d: int = 64
    block_size: int = 16
    dtype: str = "fp16"
    fp8: Optional[str] = None
    k_scale: float = 1.0
    v_scale: float = 1.0
    causal: bool = True
    window: Optional[int] = None
    softcap: Optional[float] = None
    alibi: bool = False
    sinks: bool = False
    seed: int = 0


def build(s: Spec):
    """A batch with every key already in the NaN-poisoned cache (random block placement)."""
    g = torch.Generator().manual_seed(s.seed)
    dt = DTYPES[s.dtype]
    B = len(s.seq_lens)
    T = sum(s.query_lens)
    max_blocks = max(-(-n // s.block_size) for n in s.seq_lens)
    nb = B * max_blocks + 3
    cache_dt = FP8[s.fp8] if s.fp8 else dt
    kc = torch.full((nb, s.block_size, s.hkv, s.d), float("nan")).to(cache_dt)
    vc = kc.clone()
    bt = torch.randperm(nb, generator=g)[: B * max_blocks].view(B, max_blocks).to(torch.int32)
    for b, n in enumerate(s.seq_lens):
        k = torch.randn(n, s.hkv, s.d, generator=g).to(dt)
        v = torch.randn(n, s.hkv, s.d, generator=g).to(dt)
        slots = paged.token_slots(bt[b], torch.arange(n), s.block_size)
        paged.write_kv(k, v, kc, vc, slots, k_scale=s.k_scale, v_scale=s.v_scale)
    q = torch.randn(T, s.hq, s.d, generator=g).to(dt)
    qsl = torch.tensor([0] + list(torch.tensor(s.query_lens).cumsum(0).tolist()), dtype=torch.int32)
    sl = torch.tensor(s.seq_lens, dtype=torch.int32)
    alibi = (torch.rand(s.hq, generator=g) * 0.5 + 0.05) if s.alibi else None
    sinks = (torch.randn(s.hq, generator=g) * 2) if s.sinks else None
    return dict(q=q, key_cache=kc, value_cache=vc, query_start_loc=qsl, seq_lens=sl, block_table=bt,
                alibi_slopes=alibi, sinks=sinks)


def knobs(s: Spec, batch):
    return dict(scale=1 / math.sqrt(s.d), causal=s.causal, sliding_window=s.window, softcap=s.softcap,
                alibi_slopes=batch["alibi_slopes"], sinks=batch["sinks"], k_scale=s.k_scale, v_scale=s.v_scale)


def run_kernel(device, s: Spec, batch, **kw):
    d = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    out = torch.full_like(d["q"], float("nan"))
    lse = torch.full((s.hq, d["q"].shape[0]), float("nan"), device=device)
    kn = knobs(s, batch)
    kn = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kn.items()}
    ua.unified_attention(d["q"], d["key_cache"], d["value_cache"], out, query_start_loc=d["query_start_loc"],
                         seq_lens=d["seq_lens"], block_table=d["block_table"], lse=lse, **kn, **kw)
    return out.cpu(), lse.cpu()


def check(s: Spec, batch, out, lse):
    args = (batch["q"], batch["key_cache"], batch["value_cache"], batch["block_table"], batch["query_start_loc"],
            batch["seq_lens"])
    kn = knobs(s, batch)
    ref, ref_lse = mha.paged_attention(args[0].double(), *args[1:], **kn)
    pt, pt_lse = lowp.paged_attention_lowp(*args, **kn)
    k = 4 if s.fp8 else (3 if (s.softcap or s.alibi) else 2)
    dt = out.dtype
    assert not torch.isnan(out).any(), "NaN in the output"
    err = (out.double() - ref).abs().amax(-1)  # [T, Hq]
    pt_err = (pt.double() - ref).abs().amax(-1)
    step = torch.finfo(dt).eps * ref.abs().amax(-1).clamp_min(torch.finfo(dt).tiny)
    budget = k * pt_err + 2 * step
    worst = (err / budget).max()
    t, h = divmod(int((err / budget).argmax()), s.hq)
    assert worst <= 1, f"row (token {t}, head {h}): error {err[t, h]:.3g} > budget {budget[t, h]:.3g}"
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "LSE -inf positions differ"
    fin = torch.isfinite(ref_lse)
    lse_err = (lse.double() - ref_lse).abs()[fin]
    lse_budget = (k * (pt_lse.double() - ref_lse).abs() + 1e-5 * (1 + ref_lse.abs()))[fin]
    assert (lse_err <= lse_budget).all(), f"LSE error {lse_err.max():.3g}"


def case(device, s: Spec, **kw):
    batch = build(s)
    out, lse = run_kernel(device, s, batch, **kw)
    check(s, batch, out, lse)


MIXED = dict(seq_lens=(37, 1, 40, 17), query_lens=(1, 1, 5, 17))  # decodes | extend | prefill


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_mixed_batch(dtype, device):
    case(device, Spec(**MIXED, dtype=dtype))


@pytest.mark.parametrize("d", [64, 80, 96, 128, 256])
def test_head_sizes(d, device):
    case(device, Spec(seq_lens=(21, 19), query_lens=(1, 6), d=d, dtype="bf16", seed=d))


@pytest.mark.parametrize("hq,hkv", [(8, 1), (4, 4), (6, 2)])
def test_gqa_groups(hq, hkv, device):
    case(device, Spec(**MIXED, hq=hq, hkv=hkv, seed=hq))


@pytest.mark.parametrize("block_size", [32, 64, 48, 544])
def test_block_sizes(block_size, device):
    case(device, Spec(seq_lens=(70, 33, 12), query_lens=(1, 9, 12), block_size=block_size, dtype="bf16"))


@pytest.mark.parametrize("knob", ["window", "window1", "softcap", "alibi", "sinks", "noncausal", "all"])
def test_knobs(knob, device):
    kw = {"window": dict(window=7), "window1": dict(window=1), "softcap": dict(softcap=5.0),
          "alibi": dict(alibi=True), "sinks": dict(sinks=True), "noncausal": dict(causal=False),
          "all": dict(window=9, softcap=8.0, alibi=True, sinks=True)}[knob]
    case(device, Spec(**MIXED, **kw, seed=3))


@pytest.mark.parametrize("fp8", ["fn", "fnuz"])
def test_fp8_kv(fp8, device):
    if fp8 == "fnuz" and torch.device(device).type == "cuda":
        pytest.skip("CUDA Triton has no float8_e4m3fnuz (interpreter only)")
    case(device, Spec(**MIXED, dtype="bf16", fp8=fp8, k_scale=0.37, v_scale=0.0173 * 20))


@pytest.mark.parametrize("knob", ["plain", "sinks", "window_softcap_alibi", "fp8"])
def test_split_kv_decode(knob, device):
    kw = {"plain": {}, "sinks": dict(sinks=True), "window_softcap_alibi": dict(window=50, softcap=6.0, alibi=True),
          "fp8": dict(fp8="fn", k_scale=0.5, v_scale=0.25, dtype="bf16")}[knob]
    # seq 1: most segments of that row are empty; segments must combine without NaN
    s = Spec(seq_lens=(300, 1, 75), query_lens=(1, 1, 1), hq=8, hkv=2, **kw, seed=5)
    case(device, s, split_kv=True, config=ua.TileConfig(block_m=16, block_n=16, num_segments=8))


def test_split_kv_matches_2d_path(device):
    s = Spec(seq_lens=(130, 64), query_lens=(1, 1), dtype="fp32", seed=6)
    batch = build(s)
    o2, l2 = run_kernel(device, s, batch, split_kv=False)
    o3, l3 = run_kernel(device, s, batch, split_kv=True, config=ua.TileConfig(block_m=16, block_n=16, num_segments=4))
    torch.testing.assert_close(o3, o2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l3, l2, rtol=1e-6, atol=1e-6)


def test_tile_config_does_not_change_the_result_beyond_rounding(device):
    s = Spec(seq_lens=(90, 50), query_lens=(30, 50), dtype="fp32", seed=7, window=40)
    batch = build(s)
    a, _ = run_kernel(device, s, batch, config=ua.TileConfig(block_m=16, block_n=16))
    b, _ = run_kernel(device, s, batch, config=ua.TileConfig(block_m=64, block_n=64))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_split_decision(device):
    assert not ua.use_split_kv(5, 4096, 1, 8, torch.device(device))  # not all-decode
    assert not ua.use_split_kv(1, 100, 1, 8, torch.device(device))  # short context
    assert ua.use_split_kv(1, 4096, 1, 2, torch.device(device))  # one long decode on 2 KV heads: few programs
    assert not ua.use_split_kv(1, 4096, 4096, 8, torch.device(device))  # a large batch fills the GPU by itself


def test_bad_inputs_name_the_argument():
    s = Spec(seq_lens=(5,), query_lens=(5,))
    b = build(s)
    out = torch.empty_like(b["q"])
    kw = dict(query_start_loc=b["query_start_loc"], seq_lens=b["seq_lens"], block_table=b["block_table"], scale=1.0)
    with pytest.raises(ValueError, match="key_cache"):
        ua.unified_attention(b["q"], b["key_cache"][..., :8], b["value_cache"], out, **kw)
    with pytest.raises(ValueError, match="out"):
        ua.unified_attention(b["q"], b["key_cache"], b["value_cache"], out[:2], **kw)
    with pytest.raises(ValueError, match="sinks"):
        ua.unified_attention(b["q"], b["key_cache"], b["value_cache"], out, sinks=torch.zeros(3), **kw)
    with pytest.raises(ValueError, match="lse"):
        ua.unified_attention(b["q"], b["key_cache"], b["value_cache"], out, lse=torch.zeros(5, 4), **kw)
