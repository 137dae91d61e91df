"""The live oracle packs sequences (FAST engine, reference.emulated ``_row_blocks``): query
blocks of several sequences, padded to the longest, computed in one batch. Padding must change
nothing but the float64 summation order: the same configurations computed one block at a time
(``BATCH_ELEMENTS = 1``: every batch one unpadded block) give the same expected values and
budgets, to float64 noise and the rare model-dtype rounding it flips."""

from __future__ import annotations

import pytest
import torch

from attncheck import mha_case, mla_case, sweep
from attncheck.draws import CounterDraws
from reference import emulated as em

pytestmark = pytest.mark.smoke


def _configurations(kind: str, want: int) -> list:
    """Small sweep configurations of ``kind`` with several sequences, chunked contexts among them."""
    found = [c for c in sweep.configs(11, 160, sweep.SIZES["small"]) if c.kind == kind and len(c.seq_lens) >= 3]
    chunked = [c for c in found if c.context_chunk_tokens]
    return (chunked[: want // 2] + [c for c in found if not c.context_chunk_tokens])[:want]


def _oracle(case, batch_elements, monkeypatch):
    module = mha_case if case.kind == "MHA" else mla_case
    monkeypatch.setattr(em, "BATCH_ELEMENTS", batch_elements)
    return module.expected_and_budgets(case, module.build_inputs(case, CounterDraws(case.seed, "cpu")),
                                       engine=em.FAST)


@pytest.mark.parametrize("case", _configurations("MHA", 8) + _configurations("MLA", 4), ids=lambda c: c.name)
def test_packed_batches_equal_one_block_at_a_time(case, monkeypatch):
    packed = _oracle(case, em.BATCH_ELEMENTS, monkeypatch)
    alone = _oracle(case, 1, monkeypatch)
    assert packed.keys() == alone.keys()
    for name, a in alone.items():
        p = packed[name].double()
        a = a.double()
        finite = torch.isfinite(a)
        assert torch.equal(finite, torch.isfinite(p)) and torch.equal(p[~finite], a[~finite]), name
        scale = float(a[finite].abs().max()) if finite.any() else 0.0
        close = (p - a).abs() <= 2e-7 * a.abs() + 1e-12 * max(scale, 1.0)  # pipeline terms are float64 noise
        if name.startswith("budget.pt_err"):  # a float64 ulp can flip one model-dtype rounding of a pt variant
            assert close[finite].float().mean() >= 0.98, name
        else:
            assert close[finite].all(), (name, float((p - a).abs().max()))
