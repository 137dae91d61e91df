"""Planted bugs in the MLA pipelines must fail the golden check (and the clean pipeline must pass).

Each bug is a real class from vLLM's history (research/vllm-backends.md section 5 and 4.3):
wrong prefill scale (1/sqrt(576) instead of the layer scale, PR #41569), rope and nope halves of
the query concatenated in the wrong order, the zero-padded V (128 -> 192) not sliced back, and the
last latent page of a decode pointing at the wrong block (like the page-size-1 ``last_page_len``
bug, PR #31282). Bugs are planted by replacing the module-level helpers / kernels the pipelines
look up at call time; each test also checks that the report names the rows that carry the bug.
"""

import pytest
import torch

from attncheck import golden, harness
from attncheck.cases import MLA_MINI_DIMS, MLACase
from impl.backends import rocm_aiter_mla, triton_mla
from tests.planted import unguarded_merge

# AITER's Triton MLA decode evaluates exp(-inf - -inf) for the padding heads of its 16-head tile
# (8 heads here); those rows are masked on store, numpy just warns about the NaN it computed.
pytestmark = [pytest.mark.smoke,
              pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")]
BACKENDS = ["TRITON_MLA", "ROCM_AITER_MLA"]

# decode rows (0, 1, 2) then an extend (3) and a prefill (4); mini latent dims keep the interpreter fast
MIXED = MLACase("planted-mixed-h8-mini-bs16-bf16", (5, 40, 17, 30, 12), (1, 1, 1, 6, 12), num_heads=8,
                seed=500, **MLA_MINI_DIMS)
# DeepSeek-V3 dims (qk 192, latent 576) for the scale bug: 1/sqrt(576) is the wrong-scale value
SCALE = MLACase("planted-prefill-h8-bs16-bf16", (20, 9), (6, 9), num_heads=8, seed=501)

_TENSORS = {}


def _tensors(case):
    if case.name not in _TENSORS:
        _TENSORS[case.name] = golden.generate(case)
    return _TENSORS[case.name]


@pytest.fixture
def run(device):
    """Judge a backend on a case, on this run's device (tensors generated once per case)."""
    return lambda backend, case: harness.run_backend(backend, case, device=device, tensors=_tensors(case))


def _failing_sequences(verdict) -> set:
    return {r["sequence"] for r in verdict.failing_rows}


@pytest.mark.parametrize("backend", BACKENDS)
def test_clean_pipelines_pass(backend, run):
    for case in (MIXED, SCALE):
        v = run(backend, case)
        assert v.status == "pass", v.report


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_prefill_scale_fails(backend, monkeypatch, run):
    cls = type(harness.get_backend(backend))
    orig = cls._attend

    def attend_576(self, q, k, v, cu_q, cu_k, max_q, max_k, q_lens, k_lens, causal, scale):
        return orig(self, q, k, v, cu_q, cu_k, max_q, max_k, q_lens, k_lens, causal, 576 ** -0.5)

    monkeypatch.setattr(cls, "_attend", attend_576)
    v = run(backend, SCALE)
    assert v.status == "fail", v.report
    assert _failing_sequences(v) <= {0, 1} and _failing_sequences(v)
    assert "per-row" in v.report and "sequence" in v.report


@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_and_nope_swapped_in_prefill_query_fails(backend, monkeypatch, run):
    monkeypatch.setattr(triton_mla, "prefill_query", lambda q_nope, q_pe: torch.cat([q_pe, q_nope], -1).contiguous())
    v = run(backend, MIXED)
    assert v.status == "fail", v.report
    assert _failing_sequences(v) and _failing_sequences(v) <= {3, 4}  # only the prefill-path rows


@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_and_nope_swapped_in_absorbed_query_fails(backend, monkeypatch, run):
    monkeypatch.setattr(triton_mla, "absorbed_query", lambda ql, q_pe: torch.cat([q_pe, ql], -1).contiguous())
    v = run(backend, MIXED)
    assert v.status == "fail", v.report
    assert _failing_sequences(v) and _failing_sequences(v) <= {0, 1, 2}  # only the decode rows


def test_v_padding_not_sliced_back_fails(monkeypatch, run):
    # vLLM pads V 128 -> qk dim on ROCm; forgetting the slice and flattening heads mixes them up
    def flatten_bug(out, v_dim):
        t, n, _ = out.shape
        return out.reshape(t, -1)[:, :n * v_dim].reshape(t, n, v_dim)

    monkeypatch.setattr(triton_mla, "unpad_v", flatten_bug)
    v = run("TRITON_MLA", MIXED)
    assert v.status == "fail", v.report
    rows = v.failing_rows
    assert _failing_sequences(v) <= {3, 4}
    assert all(r["head"] != 0 for r in rows)  # head 0 survives the flatten; the others do not


@pytest.mark.parametrize("backend", BACKENDS)
def test_last_latent_page_wrong_fails(backend, monkeypatch, run):
    orig = triton_mla.expand_decode_entries

    def last_page_wrong(query_lens, seq_lens, block_table):
        tables, kv_lens = orig(query_lens, seq_lens, block_table)
        tables = tables.clone()
        bs = MIXED.block_size
        for e, n in enumerate(kv_lens.tolist()):
            last = (n - 1) // bs
            if last > 0:  # point the last page at the sequence's first block
                tables[e, last] = tables[e, 0]
        return tables, kv_lens

    monkeypatch.setattr(triton_mla, "expand_decode_entries", last_page_wrong)
    v = run(backend, MIXED)
    assert v.status == "fail", v.report
    # sequence 0 (5 keys) has one page and is untouched; 1 (40 keys) and 2 (17 keys) are wrong
    assert _failing_sequences(v) and _failing_sequences(v) <= {1, 2}
    assert "KV blocks" in v.report


def test_aiter_page_size_one_expansion_bug_fails(monkeypatch, run):
    # the same bug class inside the AITER-specific page-size-1 expansion: the last slot is off by one
    orig = rocm_aiter_mla.page_size_one_indices

    def off_by_one(tables, kv_lens, bs):
        indptr, idx = orig(tables, kv_lens, bs)
        idx = idx.clone()
        last = indptr[1:].long() - 1
        idx[last] = idx[last] - 1
        return indptr, idx

    monkeypatch.setattr(rocm_aiter_mla, "page_size_one_indices", off_by_one)
    v = run("ROCM_AITER_MLA", MIXED)
    assert v.status == "fail", v.report
    assert _failing_sequences(v) <= {0, 1, 2}


# fp8 latent cache with kv_scale 3/4; a zero-context prefill beside an extend whose context takes
# three chunks (the context merge then meets -inf LSEs on both sides for the prefill's rows)
FP8_CHUNKS = MLACase("planted-chunks-h8-mini-bs16-bf16-fp8e4m3fn", (3, 45, 7), (1, 6, 7), num_heads=8,
                     kv_cache_dtype="fp8_e4m3fn", kv_scale=0.75, context_chunk_tokens=16, seed=502, **MLA_MINI_DIMS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_context_gathered_without_dequantisation_fails(backend, monkeypatch, run):
    # vLLM's AITER FA extend once gathered fp8 context with dequant=False (research notes, bug 4)
    from impl.triton import cache_ops

    assert run(backend, FP8_CHUNKS).status == "pass"
    orig = cache_ops.gather_cache
    monkeypatch.setattr(cache_ops, "gather_cache", lambda *a, **kw: orig(*a, **{**kw, "k_scale": 1.0}))
    v = run(backend, FP8_CHUNKS)
    assert v.status == "fail", v.report
    # TRITON_MLA gathers only the extend's context; AITER's Triton decode also gathers for the decode row
    assert _failing_sequences(v) <= {0, 1}


def test_merge_without_both_neg_inf_guard_fails(monkeypatch, run):
    # merge_attn_states' Triton kernel on ROCm had no guard for two -inf LSEs (research notes, bug 12)
    from impl.triton import merge_attn_states as merge_mod

    monkeypatch.setattr(merge_mod, "merge_attn_states", unguarded_merge)
    # the project's own merge kernel runs under the stand-in provider (tests/vllm plants vLLM's)
    v = run(triton_mla.TritonMLABackend(provider="stand-in"), FP8_CHUNKS)
    assert v.status == "fail", v.report
    assert "NaN" in v.report and _failing_sequences(v) == {2}, v.report  # the zero-context prefill
