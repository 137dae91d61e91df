"""Live cases' draws (attncheck.draws.CounterDraws): the same bits on every device, because
each is an exact integer hash of its counter, and a stream that behaves like one.

The GPU run (scripts/gpu/sweep.sh, part "draws") compares a sweep case built on CUDA with the
same case built on the CPU; here the tensor code is compared with a pure-Python hash."""

from __future__ import annotations

import pytest
import torch

from attncheck import mha_case, mla_case, sweep
from attncheck.draws import CounterDraws, Draws, counter_bits53_python


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
def test_counter_bits_match_the_python_hash(device):
    d = CounterDraws(1234, device)
    head = d._bits53(5)
    d._bits53(1000)
    tail = d._bits53(3)  # counters 1005..1007: the stream continues where it stopped
    want_head = [counter_bits53_python(1234, i) for i in range(5)]
    want_tail = [counter_bits53_python(1234, i) for i in range(1005, 1008)]
    assert head.cpu().tolist() == want_head
    assert tail.cpu().tolist() == want_tail


def test_counters_beyond_32_bits_use_the_high_word():
    d = CounterDraws(7)
    d._next = 2 ** 32 - 2  # the counter crosses 2**32 inside this draw
    got = d._bits53(4).tolist()
    assert got == [counter_bits53_python(7, 2 ** 32 - 2 + i) for i in range(4)]
    assert counter_bits53_python(7, 5) != counter_bits53_python(7, 5 + 2 ** 32)


def test_chunked_draws_equal_one_draw(monkeypatch):
    from attncheck import draws as draws_mod

    whole = CounterDraws(3)._bits53(1000)
    monkeypatch.setattr(draws_mod, "_CHUNK", 64)
    assert torch.equal(CounterDraws(3)._bits53(1000), whole)


def test_the_stream_looks_uniform_and_normal():
    d = CounterDraws(11)
    u = d.uniform((200_000,))
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    counts = torch.histc(u, bins=20, min=0.0, max=1.0)
    expected = 200_000 / 20
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 50.0  # 19 degrees of freedom: p < 1e-4 above 45
    z = d.normal((200_000,))
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1.0) < 0.01
    bits = d._bits53(200_000)
    for bit in (0, 26, 27, 52):  # both hash halves, ends and seam
        share = float(((bits >> bit) & 1).double().mean())
        assert abs(share - 0.5) < 0.01, (bit, share)
    assert not torch.equal(CounterDraws(11)._bits53(64), CounterDraws(12)._bits53(64))


@pytest.mark.parametrize("index", [0, 1, 2, 3, 4, 5, 6, 7])
def test_live_cases_are_drawn_by_the_counter_stream_and_stored_ones_are_not(index):
    """Live builders use CounterDraws; the stored tiers' builders keep Draws (their files)."""
    case = sweep.config(0, index, sweep.sizes_for("cpu"))
    module = mha_case if case.kind == "MHA" else mla_case
    live = module.build_inputs(case, CounterDraws(case.seed))
    again = module.build_inputs(case, CounterDraws(case.seed))
    stored_style = module.build_inputs(case, Draws(case.seed))
    first = "query" if case.kind == "MHA" else "q_nope"
    assert torch.equal(live[first], again[first])
    assert not torch.equal(live[first], stored_style[first])
    assert torch.equal(module.build_live(case, "cpu")[first], live[first])  # what the live tiers run
    assert torch.equal(module.build_golden(case)[first], stored_style[first])  # what the store holds
    for name in ("block_table", "slot_mapping", "seq_lens", "query_start_loc"):
        assert live[name].device.type == "cpu"
