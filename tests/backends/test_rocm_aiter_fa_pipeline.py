"""ROCM_AITER_FA pipeline paths: the split, chunking defaults and overrides, the sliding-window
extend path, and the kernels each row kind reaches. Tiny shapes under the interpreter."""

import pytest
import torch

from attncheck import harness
from attncheck.cases import MHACase
from impl.backends import rocm_aiter_fa as fa
from impl.batch import BatchError
from impl.platform import is_interpreter

pytestmark = [pytest.mark.smoke,
              pytest.mark.skipif(not is_interpreter() and not torch.cuda.is_available(),
                                 reason="AITER Triton kernels need TRITON_INTERPRET=1 or a GPU")]


def test_split_counts_and_rejects_unordered():
    sp = fa.split_batch([1, 1, 4, 5, 7], [9, 17, 20, 5, 7], threshold=1)
    assert (sp.num_decodes, sp.num_extends, sp.num_prefills) == (2, 1, 2)
    assert (sp.decode_tokens, sp.extend_tokens) == (2, 4)
    with pytest.raises(BatchError, match="batch order"):
        fa.split_batch([4, 1], [20, 9], threshold=1)  # extend before decode: vLLM would mis-split
    assert fa.min_seqlen_q([3, 6]) == 1


def test_default_chunk_is_32k_over_num_extends_not_block_rounded(monkeypatch, device):
    seen = {}
    real = fa.AiterFABackend._extend_chunked

    def spy(self, batch, out, sp, thr, info):
        real(self, batch, out, sp, thr, info)
        seen.update(info)

    monkeypatch.setattr(fa.AiterFABackend, "_extend_chunked", spy)
    case = MHACase("fa-chunk-default", seq_lens=(40, 29, 30), query_lens=(5, 3, 7), dtype="fp16")
    v = harness.run_backend("ROCM_AITER_FA", case, device=device)
    assert v.status == "pass", v.report
    assert seen["context_chunk_tokens"] == 32768 // 3 == 10922 and seen["context_chunks"] == 1


def test_override_runs_many_chunks_with_empty_requests_per_chunk(device):
    # chunk 7 tokens: sequence 1 (context 5) is empty in every chunk after the first
    case = MHACase("fa-chunk-many", seq_lens=(40, 9), query_lens=(5, 4), dtype="bf16", context_chunk_tokens=7)
    v = harness.run_backend("ROCM_AITER_FA", case, device=device)
    assert v.status == "pass", v.report
    assert v.info["context_chunks"] == 5


def test_sliding_window_extend_path(device):
    # decode seq_len 32 is block-aligned; extends have context longer and shorter than the window
    case = MHACase("fa-sw-extend", seq_lens=(32, 45, 12, 9), query_lens=(1, 6, 5, 9), dtype="fp16",
                   sliding_window=8)
    v = harness.run_backend("ROCM_AITER_FA", case, device=device)
    assert v.status == "pass", v.report
    assert "sliding window" in v.info["extend"]
    assert v.info["decode"] == "aiter.ops.triton.unified_attention"


def test_sliding_window_gather_start_matters(monkeypatch, device):
    """The SW path gathers the last min(seq_len, q_len + W) tokens; starting the gather one token
    late (a plausible off-by-one) must fail."""
    case = MHACase("fa-sw-gather", seq_lens=(45, 30), query_lens=(6, 5), dtype="fp16", sliding_window=8)
    from impl.triton import cache_ops
    real = cache_ops.gather_cache

    def late(kc, vc, bt, cu, starts, **kw):
        return real(kc, vc, bt, cu, starts + 1, **kw)

    monkeypatch.setattr(cache_ops, "gather_cache", late)
    v = harness.run_backend("ROCM_AITER_FA", case, device=device)
    assert v.status == "fail", v.report


def test_grouped_decodes_use_pa_decode(device):
    case = MHACase("fa-decodes", seq_lens=(17, 33, 5), query_lens=(1, 1, 1), dtype="bf16")
    v = harness.run_backend("ROCM_AITER_FA", case, device=device)
    assert v.status == "pass", v.report
    assert v.info["decode"] == "aiter.ops.triton.pa_decode"


def test_unsupported_knobs_are_declared():
    caps = fa.AiterFABackend().capabilities
    assert caps.unsupported({"softcap": 30.0}) == "softcap not supported"
    assert caps.unsupported({"causal": False}) == "non-causal attention not supported"
    assert caps.unsupported({"sliding_window": 8}) is None
