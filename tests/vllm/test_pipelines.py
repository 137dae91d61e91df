"""vLLM's kernels through the three pipelines, on in-memory cases aimed at vLLM's own paths.

Every case runs through ``attncheck.harness.run_backend`` (float64 reference, per-row budgets,
exact cache writes), with the backend forced to the vLLM provider. The cases pick the paths
vLLM chooses itself: TRITON_ATTN's 2-D and 3-D (split-KV) launches, including the 3-D launch
of short multi-token (spec-decode) queries; ROCM_ATTN's 5-D/4-D cache layout at every element
size, the non-power-of-two block size its decode runs in 32-key tiles, fp32 and fp8; TRITON_MLA
decodes long enough for several KV splits. Planted bugs in vLLM's code path (through the
adapters) must fail.
"""

import dataclasses

import pytest
import torch

from attncheck import harness
from attncheck.cases import MHACase
from attncheck.cases import MLA_MINI_DIMS, MLACase
from impl.backends.rocm_attn import RocmAttnBackend
from impl.backends.triton_attn import TritonAttnBackend
from impl.backends.triton_mla import TritonMLABackend
from impl.vllm import kernels, loader
from tests.planted import unguarded_merge

try:
    STATE, NO_VLLM = loader.load(), None
except loader.VllmUnavailable as e:
    STATE, NO_VLLM = None, str(e)

pytestmark = [pytest.mark.smoke,
              pytest.mark.skipif(STATE is None, reason=f"vLLM's kernels cannot load here: {NO_VLLM}"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]
FP8 = "fp8_e4m3fnuz" if STATE is not None and "gfx94" in STATE.arch else "fp8_e4m3fn"


@pytest.fixture
def run(device):
    """Judge a backend on a case on this run's device (an error is never a result here)."""
    def judge(backend, case):
        v = harness.run_backend(backend, case, device=device)
        assert v.status != "error", v.report
        return v
    return judge


@pytest.fixture
def passes(run, device):
    def judge(backend, case):
        v = run(backend, case)
        if v.status == "xfail" and device == "cuda" and case.dtype == "fp32":
            assert "TF32" in v.reason, v.reason  # the declared known issue (vLLM's fp32 dots on NVIDIA)
            return v
        assert v.status == "pass", f"{v.reason}\n{v.report}"
        return v
    return judge


# ---- TRITON_ATTN -------------------------------------------------------------------------------

TRITON_CASES = [
    # all decode, 4 sequences <= seq_threshold_3D (128 // 2): the 3-D split-KV launch
    (MHACase("v-ta-decode-3d", (300, 17, 129, 64), (1, 1, 1, 1), seed=701), "3-D"),
    (MHACase("v-ta-decode-3d-window-softcap", (200, 40, 77), (1, 1, 1), sliding_window=33, softcap=30.0,
             query_std=8.0, seed=702), "3-D"),
    (MHACase("v-ta-decode-3d-alibi-sinks-fp16", (150, 9), (1, 1), dtype="fp16", alibi=True, sinks=True,
             seed=703), "3-D"),
    # causal queries of <= 8 tokens also take the 3-D launch when the scratch holds every token
    (MHACase("v-ta-spec-3d", (90, 40, 33), (4, 4, 4), seed=704), "3-D"),
    # a prefill row of 12 tokens > MAX_3D_QUERY_LEN: 2-D
    (MHACase("v-ta-mixed-2d", (50, 30, 12), (1, 5, 12), seed=705), "2-D"),
    # non-causal multi-token queries are 2-D
    (MHACase("v-ta-noncausal-2d", (20, 24), (3, 24), causal=False, dtype="fp16", seed=706), "2-D"),
    # more sequences than seq_threshold_3D (128 // 8 = 16 with 8 kv heads): 2-D
    (MHACase("v-ta-many-decodes-2d", (20,) * 17, (1,) * 17, num_heads=8, num_kv_heads=8, seed=707), "2-D"),
    (MHACase("v-ta-fp8-3d", (70, 33), (1, 1), kv_cache_dtype=FP8, k_scale=0.5, v_scale=2.0, seed=708), "3-D"),
    (MHACase("v-ta-d80-bs32-2d", (45, 20), (5, 20), head_size=80, block_size=32, seed=709), "2-D"),
]


def test_triton_attn_vllm_alibi_with_sinks_is_a_declared_bug(run):
    """vLLM's linear ALiBi bias is query-independent (slope * (key_pos - context_len)): harmless
    in a softmax, wrong against a sink logit on every new-token row after the first. Decode rows
    (the first new token) are right: v-ta-decode-3d-alibi-sinks-fp16 passes."""
    case = MHACase("v-ta-alibi-sinks-extend-fp16", (40, 30), (1, 12), dtype="fp16", alibi=True, sinks=True, seed=710)
    v = run(TritonAttnBackend(provider="vllm"), case)
    assert v.status == "xfail" and "apply_alibi_to_score" in v.reason, v.report
    assert v.worst_ratio > 10
    assert {r["sequence"] for r in v.failing_rows} == {1}  # the 12-token row only; the decode row is right
    assert run(TritonAttnBackend(provider="stand-in"), case).status == "pass"
    assert run(TritonAttnBackend(provider="vllm"), dataclasses.replace(case, sinks=False)).status == "pass"


def test_triton_attn_vllm_non_causal_alibi_is_a_declared_bug(run):
    """Without the causal mask vLLM keeps its causal linear bias slope * (key_pos - context_len):
    keys after the query are favoured instead of penalised (-slope * |q - k|). A sequence's last
    row sees no later key and is right; a one-token sequence is right."""
    case = MHACase("v-ta-alibi-noncausal-fp16", (1, 12), (1, 12), dtype="fp16", alibi=True, causal=False, seed=711)
    v = run(TritonAttnBackend(provider="vllm"), case)
    assert v.status == "xfail" and "without the causal mask" in v.reason, v.report
    assert v.worst_ratio > 10
    assert {r["sequence"] for r in v.failing_rows} == {1}
    assert run(TritonAttnBackend(provider="stand-in"), case).status == "pass"
    assert run(TritonAttnBackend(provider="vllm"), dataclasses.replace(case, causal=True)).status == "pass"


@pytest.mark.parametrize("case,launch", TRITON_CASES, ids=[c.name for c, _ in TRITON_CASES])
def test_triton_attn_vllm_paths(case, launch, passes):
    v = passes(TritonAttnBackend(provider="vllm"), case)
    assert v.info["kernels"][-1] == f"vllm unified_attention ({launch})"


def test_launch_prediction_matches_what_vllm_launches(monkeypatch, device):
    """The '2-D'/'3-D' label comes from reproducing vLLM's decision; check it against the launch
    vLLM's wrapper really makes (its segment reduce runs only after a 3-D launch)."""
    mod = loader.kernel_module("triton_unified_attention")
    calls = []

    class Spy:
        def __getitem__(self, grid):
            calls.append(grid)
            return lambda **kw: None  # the output is not checked here

    monkeypatch.setattr(mod, "reduce_segments", Spy())
    be = TritonAttnBackend(provider="vllm")
    for case, launch in TRITON_CASES[:6]:
        calls.clear()
        v = harness.run_backend(be, case, device=device)
        assert v.info["kernels"][-1].endswith(f"({launch})")
        assert bool(calls) == (launch == "3-D"), case.name


def test_planted_bug_in_vllms_split_kv_path_is_caught(monkeypatch, run, passes):
    """A split-KV launch that gets one softmax segment too few (the last keys are dropped)."""
    mod = loader.kernel_module("triton_unified_attention")
    real = mod.unified_attention

    def short_segments(*args, **kw):
        if kw.get("seqused_k") is not None and kw.get("max_seqlen_q") == 1:
            kw = dict(kw, seqused_k=torch.clamp(kw["seqused_k"] - 16, min=1))
        return real(*args, **kw)

    case = TRITON_CASES[0][0]
    passes(TritonAttnBackend(provider="vllm"), case)
    monkeypatch.setattr(mod, "unified_attention", short_segments)
    v = run(TritonAttnBackend(provider="vllm"), case)
    assert v.status == "fail", v.report


# ---- ROCM_ATTN ---------------------------------------------------------------------------------

ROCM_CASES = [
    MHACase("v-ra-mixed-fp16", (40, 3, 25, 16), (1, 1, 9, 16), dtype="fp16", seed=711),
    MHACase("v-ra-bs544-bf16", (600, 30, 40), (1, 6, 40), num_heads=8, num_kv_heads=1, block_size=544, seed=712),
    MHACase("v-ra-d96-bs64-fp32", (70, 20), (1, 7), head_size=96, block_size=64, dtype="fp32",
            num_heads=4, num_kv_heads=4, seed=713),
    MHACase("v-ra-fp8-scaled", (50, 21), (1, 8), kv_cache_dtype=FP8, k_scale=0.25, v_scale=1.5, seed=714),
    MHACase("v-ra-window-fp16", (60, 40), (1, 12), sliding_window=10, dtype="fp16", seed=715),
    MHACase("v-ra-alibi-fp16", (60, 40), (1, 12), alibi=True, dtype="fp16", seed=715),
    MHACase("v-ra-noncausal-sinks", (20, 30), (1, 10), causal=False, sinks=True, seed=716),
]


@pytest.mark.parametrize("case", ROCM_CASES, ids=[c.name for c in ROCM_CASES])
def test_rocm_attn_vllm_paths(case, passes):
    v = passes(RocmAttnBackend(provider="vllm"), case)
    kinds = " ".join(v.info["kernels"])
    assert ("prefix prefill" in kinds) == (max(case.query_lens) > 1)
    assert ("kernel_paged_attention_2d" in kinds) == (min(case.query_lens) == 1)


KNOWN = [
    (MHACase("v-ra-softcap", (30, 20), (1, 8), softcap=20.0, query_std=8.0, seed=717),
     "never passes it to chunked_prefill_paged_decode"),
    (MHACase("v-ra-window-alibi-fp16", (60, 40), (1, 12), sliding_window=10, alibi=True, dtype="fp16", seed=715),
     "_fwd_kernel_alibi) takes no sliding window"),
]


@pytest.mark.parametrize("case,why", KNOWN, ids=[c.name for c, _ in KNOWN])
def test_rocm_attn_known_vllm_bugs_fail_and_are_declared(case, why, run):
    v = run(RocmAttnBackend(provider="vllm"), case)
    assert v.status == "xfail" and why in v.reason, v.report
    assert v.worst_ratio > 1.0
    assert run(RocmAttnBackend(provider="stand-in"), case).status == "pass"


def test_layout_round_trip_is_exact_and_matches_vllms_writer(device):
    """NHD -> 5-D K / 4-D V -> NHD keeps every bit (NaN poison included), and a token written by
    vLLM's writer into the 5-D layout lands where the reference NHD write puts it."""
    g = torch.Generator().manual_seed(5)
    for dt in (torch.float16, torch.float32, loader.load().fp8_dtype):
        kc = torch.randn(3, 16, 2, 64, generator=g).to(dt)
        vc = torch.randn(3, 16, 2, 64, generator=g).to(dt)
        kc[1, 3] = float("nan")
        k5, v4 = kernels.rocm_attn_layout(kc, vc)
        x = kernels.rocm_attn_x(kc)
        assert k5.shape == (3, 2, 64 // x, 16, x) and v4.shape == (3, 2, 64, 16)
        assert torch.equal(k5[2, 1, 3, 7].view(torch.uint8), kc[2, 7, 1, 3 * x:4 * x].view(torch.uint8))
        assert torch.equal(v4[0, 1, 9, 4:5].view(torch.uint8), vc[0, 4, 1, 9:10].view(torch.uint8))
        k2, v2 = torch.empty_like(kc), torch.empty_like(vc)
        kernels.nhd_from_rocm_attn_layout(k5, v4, k2, v2)
        assert torch.equal(k2.view(torch.uint8), kc.view(torch.uint8))
        assert torch.equal(v2.view(torch.uint8), vc.view(torch.uint8))
    new_k = torch.randn(2, 2, 64, generator=g).half().to(device)
    new_v = torch.randn(2, 2, 64, generator=g).half().to(device)
    kc = torch.zeros(3, 16, 2, 64, dtype=torch.float16, device=device)
    vc = torch.zeros_like(kc)
    k5, v4 = kernels.rocm_attn_layout(kc, vc)
    kernels.reshape_and_cache_flash(new_k, new_v, k5, v4, torch.tensor([5, 40], device=device))
    kernels.nhd_from_rocm_attn_layout(k5, v4, kc, vc)
    assert torch.equal(kc[0, 5], new_k[0]) and torch.equal(kc[2, 8], new_k[1])
    assert torch.equal(vc[0, 5], new_v[0]) and torch.equal(vc[2, 8], new_v[1])
    assert int((kc != 0).sum()) == int((new_k != 0).sum())


def test_adapters_refuse_bad_inputs_naming_the_argument():
    q = torch.zeros(2, 4, 64, dtype=torch.float16)
    kc = torch.zeros(2, 16, 2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="^key_cache: head size 60 must be a multiple of 8"):
        kernels.rocm_attn_layout(torch.zeros(2, 16, 2, 60, dtype=torch.float16),
                                 torch.zeros(2, 16, 2, 60, dtype=torch.float16))
    other_fp8 = torch.float8_e4m3fnuz if loader.load().fp8_dtype is torch.float8_e4m3fn else torch.float8_e4m3fn
    with pytest.raises(ValueError, match="^key_cache: vLLM on .* reads fp8 caches as"):
        kernels.reshape_and_cache_flash(q[:, :2], q[:, :2], kc.to(other_fp8), kc.to(other_fp8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="^out: expected"):
        kernels.unified_attention(q, kc, kc, q[:1], query_start_loc=torch.tensor([0, 2], dtype=torch.int32),
                                  seq_lens=torch.tensor([2], dtype=torch.int32),
                                  block_table=torch.zeros(1, 1, dtype=torch.int32), max_query_len=2,
                                  max_seq_len=2, scale=0.1)
    with pytest.raises(ValueError, match="^prefix_lse: expected"):
        kernels.merge_attn_states(q, q, torch.zeros(2, 4), q, torch.zeros(4, 2))


# ---- TRITON_MLA --------------------------------------------------------------------------------

MLA_CASES = [
    # 2100 keys -> 2100 // 512 = 4 -> 4 KV splits (capped at twice the compute units)
    MLACase("v-mla-decode-splits", (2100, 700, 9), (1, 1, 1), num_heads=8, seed=721, **MLA_MINI_DIMS),
    MLACase("v-mla-chunks-fp8", (3, 45, 7), (1, 6, 7), num_heads=8, kv_cache_dtype=FP8, kv_scale=0.75,
            context_chunk_tokens=16, seed=722, **MLA_MINI_DIMS),
    MLACase("v-mla-bs32-fp16", (40, 70, 5), (1, 9, 5), num_heads=16, block_size=32, dtype="fp16", seed=723, **MLA_MINI_DIMS),
]


@pytest.mark.parametrize("case", MLA_CASES, ids=[c.name for c in MLA_CASES])
def test_triton_mla_vllm_paths(case, passes):
    v = passes(TritonMLABackend(provider="vllm"), case)
    ran = v.info["kernels"]
    assert "vllm decode_attention_fwd(is_mla)" in ran
    assert ("vllm merge_attn_states (Triton)" in ran) == bool(v.info.get("context_chunks"))


def test_mla_split_count_follows_vllm():
    assert kernels.mla_num_kv_splits(2100, num_sms=132) == 4
    assert kernels.mla_num_kv_splits(100, num_sms=132) == 1
    assert kernels.mla_num_kv_splits(1 << 20, num_sms=2) == 4  # capped at twice the compute units
    assert kernels.mla_num_kv_splits(2100) == min(4, 2 * loader.load().num_sms)


def test_planted_merge_without_both_neg_inf_guard_is_caught(monkeypatch, run):
    """vLLM's Triton merge once had no guard for two -inf LSEs (research notes, bug 12): the
    zero-context prefill's rows meet -inf on both sides in the chunked context merge."""
    mod = loader.kernel_module("triton_merge_attn_states")

    case = MLA_CASES[1]
    monkeypatch.setattr(mod, "merge_attn_states", unguarded_merge)
    v = run(TritonMLABackend(provider="vllm"), case)
    assert v.status == "fail" and "NaN" in v.report, v.report
