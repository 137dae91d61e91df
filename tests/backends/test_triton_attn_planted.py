"""Planted bugs in TRITON_ATTN: the suite must fail each one, and pass the unmodified backend.

Each bug is a small wrapper (or, for the segment reduce, a buggy copy of the kernel) swapped
in with monkeypatch through the module the backend looks kernels up in at call time:

  (a) the last partial KV block of a decode is skipped (seq_len rounded down to the block);
  (b) the sliding window is one key too wide;
  (c) the fp8 k/v scales are ignored by the attention kernel (cache writes stay right);
  (d) the last GQA group reads KV head 0 instead of its own head;
  (e) the split-KV segment reduce lacks the -inf / empty-segment guard: it reads the partial
      output of segments that saw no key (unwritten, NaN-poisoned workspace) and weights it by 0.
"""

import pytest
import torch
import triton
import triton.language as tl

from attncheck import harness
from attncheck.cases import MHACase
from impl.backends.triton_attn import TritonAttnBackend
from impl.triton import unified_attention as ua

pytestmark = pytest.mark.smoke
_real_unified = ua.unified_attention


@pytest.fixture
def run(device):
    """Judge TRITON_ATTN on a case, on this run's device; the bugs are planted in the project's
    kernels, so they are forced (ATTNCHECK_PROVIDER=stand-in)."""
    backend = TritonAttnBackend(provider="stand-in")
    available = backend.availability(torch.device(device))
    if not available.ok:
        pytest.skip(available.reason)
    return lambda case: harness.run_backend(backend, case, device=device)


def _failing(verdict, what):
    """(sequence, head) pairs of the failing rows the verdict names."""
    pairs = [(r["sequence"], r["head"]) for r in verdict.failing_rows]
    assert pairs, f"{what}: the verdict names no failing row:\n{verdict.report}"
    return pairs


def _assert_caught(run, case, what):
    v = run(case)
    assert v.status == "fail", f"{what} was not caught: {v.status} {v.reason}\n{v.report}"
    return v


def _assert_clean(run, case):
    v = run(case)
    assert v.status == "pass", f"unmodified TRITON_ATTN should pass {getattr(case, 'name', case)}:\n{v.report}{v.reason}"


# (a) -----------------------------------------------------------------------------------------
DECODE = "decode-h8x2-d64-bs16-bf16"  # seq_lens (1, 15, 17, 113): 17 and 113 end in a partial block


def _skip_last_partial_block(*args, **kw):
    sl = kw["seq_lens"]
    bs = args[1].shape[1]
    qlen = kw["query_start_loc"][1:] - kw["query_start_loc"][:-1]
    trimmed = torch.where((qlen == 1) & (sl > bs) & (sl % bs != 0), sl - sl % bs, sl)
    return _real_unified(*args, **{**kw, "seq_lens": trimmed})


def test_a_skipped_last_partial_block_is_caught(monkeypatch, run):
    _assert_clean(run, DECODE)
    monkeypatch.setattr(ua, "unified_attention", _skip_last_partial_block)
    v = _assert_caught(run, DECODE, "skipped last partial block")
    seqs = {s for s, _ in _failing(v, "partial block")}
    assert seqs <= {2, 3} and seqs, f"failing sequences {seqs}; only 2 and 3 end in a partial block"


# (b) -----------------------------------------------------------------------------------------
WINDOW = "decode-h8x2-d128-bs16-fp16-window7"


def _window_off_by_one(*args, **kw):
    return _real_unified(*args, **{**kw, "sliding_window": kw["sliding_window"] + 1})


def test_b_sliding_window_off_by_one_is_caught(monkeypatch, run):
    _assert_clean(run, WINDOW)
    monkeypatch.setattr(ua, "unified_attention", _window_off_by_one)
    v = _assert_caught(run, WINDOW, "window off by one")
    seqs = {s for s, _ in _failing(v, "window")}
    # sequence 1 has 9 keys: only it and the 64/33-key rows can see key qpos - 7
    assert seqs and seqs <= {0, 1, 2}


# (c) -----------------------------------------------------------------------------------------
FP8 = "mixed-h8x2-d64-bs16-bf16-fp8e4m3fn"  # k_scale 0.75, v_scale 1.25


def _fp8_scale_ignored(*args, **kw):
    return _real_unified(*args, **{**kw, "k_scale": 1.0, "v_scale": 1.0})


def test_c_ignored_fp8_scale_is_caught(monkeypatch, run):
    _assert_clean(run, FP8)
    monkeypatch.setattr(ua, "unified_attention", _fp8_scale_ignored)
    _assert_caught(run, FP8, "fp8 scale ignored")


# (d) -----------------------------------------------------------------------------------------
GQA = "mixed-h8x2-d64-bs16-bf16"  # 8 query heads on 2 KV heads: group 1 = heads 4..7


def _wrong_kv_head(q, key_cache, value_cache, out, **kw):
    hkv = key_cache.shape[2]
    idx = torch.tensor(list(range(hkv - 1)) + [0], device=key_cache.device)  # last group -> head 0
    return _real_unified(q, key_cache[:, :, idx], value_cache[:, :, idx], out, **kw)


def test_d_wrong_kv_head_for_a_gqa_group_is_caught(monkeypatch, run):
    _assert_clean(run, GQA)
    monkeypatch.setattr(ua, "unified_attention", _wrong_kv_head)
    v = _assert_caught(run, GQA, "wrong KV head")
    heads = {h for _, h in _failing(v, "GQA")}
    assert heads and heads <= {4, 5, 6, 7}, f"failing heads {heads}; only group 1 (heads 4..7) is wrong"


# (e) -----------------------------------------------------------------------------------------
# A long decode next to two one-tile decodes: the split-KV path runs, and the short rows have
# segments with no key at all.
SPLIT = MHACase(name="planted-split-kv-empty-segments", seq_lens=(700, 20, 1), query_lens=(1, 1, 1),
                num_heads=8, num_kv_heads=2, head_size=64, block_size=16, dtype="bf16", seed=11, family="decode")


@triton.jit
def _reduce_without_guard(out_ptr, lse_ptr, sinks_ptr, seg_acc_ptr, seg_m_ptr, seg_l_ptr,
                          num_rows, num_q_heads, stride_ot, stride_oh, stride_od, stride_lh, stride_lt,
                          v_scale,
                          D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                          NUM_SEGMENTS: tl.constexpr, USE_SINKS: tl.constexpr, WRITE_LSE: tl.constexpr):
    # The planted bug: every segment's partial output is read and weighted, even when the
    # segment saw no key (weight 0, workspace never written): 0 * NaN = NaN.
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < num_rows
    offs_s = tl.arange(0, NUM_SEGMENTS)
    offs_d = tl.arange(0, BLOCK_D)
    m = tl.load(seg_m_ptr + r[:, None] * NUM_SEGMENTS + offs_s[None, :], mask=r_ok[:, None], other=float("-inf"))
    l = tl.load(seg_l_ptr + r[:, None] * NUM_SEGMENTS + offs_s[None, :], mask=r_ok[:, None], other=0.0)
    m_max = tl.max(m, 1)
    w = tl.exp2(m - m_max[:, None])
    key_sum = tl.sum(l * w, 1)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for s in range(NUM_SEGMENTS):
        ws = tl.sum(tl.where(offs_s[None, :] == s, w, 0.0), 1)
        part = tl.load(seg_acc_ptr + (r * NUM_SEGMENTS + s)[:, None] * BLOCK_D + offs_d[None, :],
                       mask=r_ok[:, None], other=0.0)
        acc += part * ws[:, None]
    out = acc * (v_scale / key_sum)[:, None]
    head = r % num_q_heads
    t = r // num_q_heads
    tl.store(out_ptr + (t * stride_ot + head * stride_oh)[:, None] + offs_d[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & (offs_d < D)[None, :])
    if WRITE_LSE:
        tl.store(lse_ptr + head * stride_lh + t * stride_lt, (m_max + tl.log2(key_sum)) * 0.6931471805599453,
                 mask=r_ok)


def _poisoned_workspace(numel, device):
    return torch.full((numel,), float("nan"), dtype=torch.float32, device=device)


def test_e_segment_reduce_without_inf_guard_is_caught(monkeypatch, run, device):
    assert ua.use_split_kv(1, max(SPLIT.seq_lens), len(SPLIT.seq_lens), SPLIT.num_kv_heads,
                           torch.device(device)), "the case must take the split-KV path"
    monkeypatch.setattr(ua, "workspace", _poisoned_workspace)  # unwritten scratch holds NaN
    _assert_clean(run, SPLIT)
    monkeypatch.setattr(ua, "_reduce_segments_kernel", _reduce_without_guard)
    v = _assert_caught(run, SPLIT, "segment reduce without the -inf guard")
    assert "nan" in v.report.lower(), v.report


def test_backend_reports_the_kernels_it_ran(run):
    v = run(SPLIT)
    assert v.status == "pass", v.report
    assert any("3-D" in k for k in v.info["kernels"])
