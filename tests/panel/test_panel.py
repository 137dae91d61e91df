"""Every panel member passes every stored case of its kind (DESIGN.md "Pass/fail rule", property 2).

One test per (member, case), smoke and full tiers alike (plain torch: the whole panel takes
well under a minute on the CPU), through ``attncheck.harness.run_backend``: output, mean, LSE
and cache-write checks. A member never skips: it declares every capability the catalogue uses.
No pair is excused: before the emulated budgets (attncheck.budgets) 67 pairs failed the LSE
check (docs/panel.md "Findings"); a member that fails a case now is a budget bug to report.
"""

import ast
from pathlib import Path

import pytest
import torch

from attncheck import golden, harness
from attncheck.cases import get_case
from tests.panel.members import MEMBERS, MHA_MEMBERS, PanelMHA, Recipe, quantise

TIERS = ("smoke", "full")


def pytest_generate_tests(metafunc):
    if "panel_pair" not in metafunc.fixturenames:
        return
    params = []
    for member in MEMBERS.values():
        for tier in TIERS:
            for case in harness.list_cases(tier=tier, kind=member.kind):
                params.append(pytest.param((member.name, case), id=f"{member.name}::{case}",
                                           marks=getattr(pytest.mark, tier)))
    metafunc.parametrize("panel_pair", params)


def test_member_passes_stored_case(panel_pair, device):
    name, case = panel_pair
    v = harness.run_backend(MEMBERS[name], case, device=device)
    assert v.status == "pass", f"{v.status}: {v.reason}\n{v.report}"
    assert v.lse_checked, f"{name} returned no LSE on {case}"


@pytest.mark.smoke
def test_members_do_not_borrow_the_reference():
    """Independent means independent: the panel's maths imports only torch, the standard
    library and the public backend protocol (impl.backend)."""
    tree = ast.parse((Path(__file__).parent / "members.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module if node.module.startswith("impl") else node.module.split(".")[0])
    assert imported <= {"__future__", "math", "dataclasses", "typing", "torch", "impl.backend"}, imported


def _run(member, case_name, mutate=None):
    case = get_case(case_name)
    batch = golden.case_module(case).batch_from_tensors(case, golden.load(case), "cpu")
    if mutate is not None:
        mutate(batch)
    return member.run(batch), batch


@pytest.mark.smoke
@pytest.mark.parametrize("member", [m for m in MHA_MEMBERS if m.name not in
                                    ("PANEL_SCORES_FP32", "PANEL_FP8_NEW_FROM_INPUTS", "PANEL_FP8_NEW_FROM_CACHE")],
                         ids=lambda m: m.name)
def test_each_variation_changes_the_rounding(member):
    """A member that computed bit-for-bit what the base member computes would test nothing:
    each one's output or LSE differs from the fp32-scores member on a bf16 case (model-dtype
    rounding points show there; its scale 80 ** -0.5 is not a power of two) or on an fp32 case
    (fp32 reduction orders show there: a bf16 output usually rounds them away)."""
    def same(case):
        base, _ = _run(MEMBERS["PANEL_SCORES_FP32"], case)
        got, _ = _run(member, case)
        return torch.equal(got.output, base.output) and torch.equal(got.lse, base.lse)

    assert not (same("mixed-h5x1-d80-bs16-bf16") and same("mixed-h8x8-d64-bs16-fp32"))


@pytest.mark.smoke
def test_fp8_members_differ_in_where_new_tokens_come_from():
    """With new K/V that fp8 cannot represent, attending the unquantised inputs and reading the
    cache back give different outputs, while both write the same (quantised) cache bytes."""
    def lossy(batch):
        batch.key = (batch.key.float() * 1.01).to(batch.key.dtype)
        batch.value = (batch.value.float() * 0.99).to(batch.value.dtype)

    case = "mixed-h8x2-d64-bs16-bf16-fp8e4m3fn"
    raw, raw_batch = _run(MEMBERS["PANEL_FP8_NEW_FROM_INPUTS"], case, lossy)
    cached, cached_batch = _run(MEMBERS["PANEL_FP8_NEW_FROM_CACHE"], case, lossy)
    assert not torch.equal(raw.output, cached.output)
    for name in ("key_cache", "value_cache"):
        a, b = getattr(raw_batch, name), getattr(cached_batch, name)
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name


@pytest.mark.smoke
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e4m3fnuz], ids=str)
def test_fp8_write_rounds_to_nearest_even_and_saturates(fp8):
    """The panel's cache write: e4m3 has 3 mantissa bits, so in [1, 2) the grid step is 1/8.
    A tie goes to the even neighbour; anything past the largest finite value saturates."""
    fmax = torch.finfo(fp8).max
    x = torch.tensor([1 + 1 / 16, 1 + 3 / 16, -(1 + 1 / 16), 10 * fmax, -10 * fmax, 1e30])
    got = quantise(x, 1.0, fp8, fp8=True).float()
    assert got.tolist() == [1.0, 1.25, -1.0, fmax, -fmax, fmax]
    # the scale divides before rounding: 2 * (1 + 1/16) / 2 is the same tie
    assert quantise(x[:1] * 2, 2.0, fp8, fp8=True).float().tolist() == [1.0]


@pytest.mark.smoke
def test_recipe_rejects_an_unknown_order():
    bad = PanelMHA("PANEL_BAD", Recipe(scores="q_sideways"), "")
    with pytest.raises(ValueError, match="recipe.scores"):
        _run(bad, "decode-h8x2-d64-bs16-bf16")


@pytest.mark.smoke
@pytest.mark.parametrize("member", MHA_MEMBERS, ids=lambda m: m.name)
@pytest.mark.parametrize("sinks", [False, True], ids=["no-sinks", "sinks"])
def test_row_without_visible_keys_gives_zero_and_neg_inf(member, sinks):
    """No stored case has an empty row (every query sees itself), so drive one directly: three
    queries at positions 0..2 against keys at 5..44, all in their future under the causal mask."""
    from types import SimpleNamespace
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 16, generator=g).to(torch.bfloat16)
    k, v = torch.randn(40, 2, 16, generator=g), torch.randn(40, 2, 16, generator=g)
    batch = SimpleNamespace(dtype=torch.bfloat16, scale=0.25, softcap=None, alibi_slopes=None, causal=True,
                            sliding_window=None, sinks=torch.randn(4, generator=g) if sinks else None)
    o, lse = member._attend(batch, q, k, v, torch.arange(3), torch.arange(5, 45))
    assert torch.equal(o, torch.zeros_like(o))
    assert bool(torch.isneginf(lse).all())


@pytest.mark.smoke
def test_mla_softmax_and_merge_of_empty_rows():
    from tests.panel.members import _softmax_pv, merge
    s = torch.full((2, 3, 5), float("-inf"))
    o, lse = _softmax_pv(s, lambda p: p @ torch.ones(5, 4))
    assert torch.equal(o, torch.zeros(2, 3, 4)) and bool(torch.isneginf(lse).all())
    o, lse = merge(o, lse, o, lse, torch.bfloat16)  # both sides empty: 0, -inf, never NaN
    assert torch.equal(o, torch.zeros(2, 3, 4)) and bool(torch.isneginf(lse).all())
