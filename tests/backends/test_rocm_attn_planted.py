"""Planted bugs: the suite (attncheck.harness) fails ROCM_ATTN for each bug class below, and the
unmodified backend passes the same case.

A planted bug is a mutant of the kernel module's own source (one line changed, the rest
identical), written to tmp_path, imported, and swapped in for the kernel function the backend
looks up at call time (``paged_decode.paged_decode`` / ``prefix_prefill.prefix_prefill``). The
backend code itself is untouched. Runs under TRITON_INTERPRET=1 on the CPU, tiny shapes.
"""

import pytest
import torch

from attncheck import harness
from attncheck.cases import MHACase
from impl.backends.rocm_attn import RocmAttnBackend
from impl.platform import is_interpreter
from impl.triton import paged_decode, prefix_prefill
from tests.mutants import mutant

pytestmark = [pytest.mark.smoke,
              pytest.mark.skipif(not is_interpreter() and not torch.cuda.is_available(),
                                 reason="ROCM_ATTN's Triton kernels need TRITON_INTERPRET=1 or a GPU")]

# Sequence 0 ends in a partial block (37 = 2*16 + 5); sequence 1 fills whole blocks.
PARTIAL_BLOCK = MHACase("planted-rocm-partial-block", seq_lens=(37, 32), query_lens=(1, 1), dtype="fp16",
                        num_heads=4, num_kv_heads=2)
# An extend whose queries all reach back exactly to the window edge.
WINDOW_EDGE = MHACase("planted-rocm-window-edge", seq_lens=(40, 10), query_lens=(12, 10), dtype="fp16",
                      num_heads=4, num_kv_heads=2, sliding_window=8)
# Sequence 0: 300 keys, window 16 -> with partitions of 256 keys, partition 0 has no visible
# key (stage 1 skips it); sequence 1 fits in partition 0.
EMPTY_PARTITION = MHACase("planted-rocm-empty-partition", seq_lens=(300, 40), query_lens=(1, 1), dtype="fp16",
                          num_heads=4, num_kv_heads=2, sliding_window=16)


@pytest.fixture
def run(device):
    """Judge ROCM_ATTN on a case, on this run's device; the bugs are planted in the project's
    kernels, so they are forced (ATTNCHECK_PROVIDER=stand-in)."""
    return lambda case: harness.run_backend(RocmAttnBackend(provider="stand-in"), case, device=device)


def _sequences(verdict) -> set:
    """The sequences of the failing rows the verdict names."""
    return {r["sequence"] for r in verdict.failing_rows}


@pytest.mark.parametrize("case", [PARTIAL_BLOCK, WINDOW_EDGE, EMPTY_PARTITION], ids=lambda c: c.name)
def test_unmodified_backend_passes(case, run):
    v = run(case)
    assert v.status == "pass", v.report


def test_decode_skipping_the_last_partial_block(monkeypatch, tmp_path, run):
    bad = mutant(paged_decode, [("key_end = seq_len", "key_end = (seq_len // block_size) * block_size", 1)],
                 tmp_path)
    monkeypatch.setattr(paged_decode, "paged_decode", bad.paged_decode)
    v = run(PARTIAL_BLOCK)
    assert v.status == "fail", v.report
    assert _sequences(v) == {0}, v.report


def test_prefix_prefill_window_off_by_one(monkeypatch, tmp_path, run):
    bad = mutant(prefix_prefill, [("visible = visible & (dist < window)", "visible = visible & (dist <= window)", 1)],
                 tmp_path)
    monkeypatch.setattr(prefix_prefill, "prefix_prefill", bad.prefix_prefill)
    v = run(WINDOW_EDGE)
    assert v.status == "fail", v.report
    named = _sequences(v)  # the worst rows; both sequences are affected
    assert named and named <= {0, 1}, v.report


def test_decode_reduce_without_the_inf_guard(monkeypatch, tmp_path, run):
    """The reduce reads every partition below cdiv(seq_len, P), including the one the window
    emptied and stage 1 never wrote (its workspace is NaN)."""
    bad = mutant(paged_decode, [("valid = (parts >= first) & (parts < last)", "valid = parts < last", 2),
                                ("start = (first // RED_BLOCK) * RED_BLOCK", "start = 0", 1)], tmp_path)
    monkeypatch.setattr(paged_decode, "paged_decode", bad.paged_decode)
    v = run(EMPTY_PARTITION)
    assert v.status == "fail", v.report
    assert "[FAIL] finite" in v.report, v.report  # NaN from the unwritten partition
    assert _sequences(v) == {0}, v.report
