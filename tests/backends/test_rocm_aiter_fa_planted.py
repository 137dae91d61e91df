"""Planted bugs: the suite fails ROCM_AITER_FA for each real bug class of research 5 it models,
and the same case passes without the bug. Kernels are replaced through the modules the
pipeline looks them up in, so the backend code itself is untouched.

Runs AITER's Triton kernels under the interpreter (TRITON_INTERPRET=1), tiny shapes.
"""

import pytest
import torch

from attncheck import harness
from attncheck.cases import MHACase
from impl.aiter import triton_kernels
from impl.backends import rocm_aiter_fa
from impl.platform import is_interpreter
from impl.triton import cache_ops

pytestmark = [pytest.mark.smoke,
              pytest.mark.skipif(not is_interpreter() and not torch.cuda.is_available(),
                                 reason="AITER Triton kernels need TRITON_INTERPRET=1 or a GPU")]

# decode rows' seq_lens are multiples of the block size, so the known unified_attention
# tile-mask issue (partly written last block) cannot turn a failure into an expected failure
FP8_CTX = MHACase("planted-fp8-context", seq_lens=(40, 29), query_lens=(5, 3), kv_cache_dtype="fp8_e4m3fn",
                  k_scale=0.25, v_scale=2.0, dtype="fp16", context_chunk_tokens=16)
DECODES = MHACase("planted-decode-cu", seq_lens=(32, 48, 16, 20), query_lens=(1, 1, 1, 6), dtype="fp16")
EXTEND = MHACase("planted-extend-lse", seq_lens=(32, 19), query_lens=(7, 4), dtype="fp16",
                 context_chunk_tokens=10)
SHORTEST_Q_GT_1 = MHACase("planted-min-seqlen-q", seq_lens=(30, 25, 12), query_lens=(3, 6, 12), dtype="fp16")


@pytest.fixture
def run(device):
    """Judge ROCM_AITER_FA on a case, on this run's device."""
    return lambda case: harness.run_backend("ROCM_AITER_FA", case, device=device)


def _sequences(verdict) -> set:
    """The sequences of the failing rows the verdict names."""
    return {r["sequence"] for r in verdict.failing_rows}


def test_fp8_context_gathered_without_dequantisation(monkeypatch, run):
    """research 5 #4: the chunked-context gather passed dequant=False (scales not applied)."""
    assert run(FP8_CTX).status == "pass"
    real = cache_ops.gather_cache

    def no_dequant(*args, **kw):
        kw["k_scale"], kw["v_scale"] = 1.0, 1.0
        return real(*args, **kw)

    monkeypatch.setattr(cache_ops, "gather_cache", no_dequant)
    v = run(FP8_CTX)
    assert v.status == "fail", v.report
    assert _sequences(v) <= {0, 1} and _sequences(v)


def test_decode_cu_seqlens_sliced_one_short(monkeypatch, run):
    """research 5 #2: query_start_loc[:num_decodes] instead of [:num_decodes + 1]."""
    assert run(DECODES).status == "pass"
    monkeypatch.setattr(rocm_aiter_fa, "decode_query_start_loc", lambda qsl, nd: qsl[:nd])
    v = run(DECODES)
    assert v.status == "fail", v.report
    assert _sequences(v) == {2}, v.report  # the last decode row is the one left out


def test_context_lse_not_returned_to_the_merge(monkeypatch, run):
    """research 5 #9 (the MLA twin of this pipeline): the context call's LSE never reaches the
    merge, which then weighs the context with a placeholder LSE of 0."""
    assert run(EXTEND).status == "pass"
    real = triton_kernels.flash_attn_varlen

    def lse_dropped(q, k, v, **kw):
        out, lse = real(q, k, v, **kw)
        if not kw["causal"]:  # the context chunks
            lse = torch.zeros_like(lse)
        return out, lse

    monkeypatch.setattr(triton_kernels, "flash_attn_varlen", lse_dropped)
    v = run(EXTEND)
    assert v.status == "fail", v.report
    assert _sequences(v) <= {0, 1} and _sequences(v)


def test_min_seqlen_q_is_the_batch_minimum(monkeypatch, run):
    """research 5 #1: min_seqlen_q = the batch's shortest query instead of 1. In this pipeline
    it is the decode threshold: the shortest row (q_len 3 > 1) goes down the one-query decode
    path and its earlier tokens are never computed."""
    assert run(SHORTEST_Q_GT_1).status == "pass"
    monkeypatch.setattr(rocm_aiter_fa, "min_seqlen_q", lambda qlens: min(qlens))
    v = run(SHORTEST_Q_GT_1)
    assert v.status == "fail", v.report
    assert 0 in _sequences(v), v.report
