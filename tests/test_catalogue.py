"""The catalogue is data: names derived from the fields, families from an enum, each case kind
carrying its generator, known issues declared (not lambdas over dicts), no import cycle."""

import subprocess
import sys

import pytest

from attncheck import backends, cases, golden
from attncheck.cases import Family, MergeCase, MHACase, MLACase
from impl.backend import CaseParams, KnownIssue

pytestmark = pytest.mark.smoke


def test_every_catalogue_name_is_derived_from_its_fields():
    rows = cases.all_cases()
    assert rows and all(c.name == c.derived_name() for c in rows)


def test_a_name_that_restates_a_field_wrongly_is_refused():
    good = MHACase(seq_lens=(20, 9), query_lens=(1, 9), num_heads=8, num_kv_heads=2, head_size=64)
    assert good.name == "mixed-h8x2-d64-bs16-bf16"
    lying = MHACase(name="mixed-h8x2-d128-bs16-bf16", seq_lens=(20, 9), query_lens=(1, 9))
    with pytest.raises(ValueError, match="derive the name 'mixed-h8x2-d64-bs16-bf16'"):
        cases.check_catalogue([good, lying])
    with pytest.raises(ValueError, match="duplicate case names"):
        cases.check_catalogue([good, good])


@pytest.mark.parametrize("kw,name", [
    (dict(seq_lens=(9, 40), query_lens=(1, 1)), "decode-h8x2-d64-bs16-bf16"),
    (dict(seq_lens=(9, 40), query_lens=(9, 40), causal=False), "prefill-h8x2-d64-bs16-bf16-noncausal"),
    (dict(seq_lens=(19, 40), query_lens=(4, 4), sinks=True), "specdecode-h8x2-d64-bs16-bf16-sinks-q4"),
    (dict(seq_lens=(60, 90), query_lens=(12, 20), context_chunk_tokens=40), "extend-h8x2-d64-bs16-bf16-chunks2"),
    (dict(seq_lens=(9, 40), query_lens=(1, 3), scale=0.25, softcap=20.0, sliding_window=5, alibi=True,
          kv_cache_dtype="fp8_e4m3fnuz", tier="full"),
     "full-mixed-h8x2-d64-bs16-bf16-scale0.25-window5-softcap20-alibi-fp8e4m3fnuz"),
    (dict(seq_lens=(30, 50), query_lens=(30, 1), unordered=True, label="why"), "unordered-h8x2-d64-bs16-bf16-why"),
])
def test_mha_name_derivation(kw, name):
    assert MHACase(**kw).name == name


def test_mla_and_merge_name_derivation():
    assert MLACase(seq_lens=(9, 20), query_lens=(1, 20), num_heads=8).name == "mla-mixed-h8-bs16-bf16"
    mini = MLACase(seq_lens=(9,), query_lens=(1,), num_heads=16, **cases.MLA_MINI_DIMS, rope_factor=None,
                   kv_cache_dtype="fp8_e4m3fn")
    assert mini.name == "mla-decode-h16-mini-bs16-bf16-fp8e4m3fn-noyarn"
    odd = MLACase(seq_lens=(9,), query_lens=(9,), kv_lora_rank=256, rope_dim=32, nope_dim=64, v_dim=64)
    assert odd.name == "mla-prefill-h16-l256r32p64v64-bs16-bf16"
    assert MergeCase(num_tokens=5, num_heads=2, head_size=64, lse_pattern="pos_and_neg_inf").name == \
        "merge-pos-and-neginf-fp32-h2-d64"


def test_family_is_an_enum_and_unknown_families_are_errors():
    c = cases.get_case("decode-h8x2-d64-bs16-bf16")
    assert c.family is Family.DECODE and c.family == "decode" and f"{c.family:8}|" == "decode  |"
    with pytest.raises(ValueError, match="did you mean sliding_window"):
        MHACase(seq_lens=(3,), query_lens=(1,), family="sliding-window")
    with pytest.raises(ValueError, match="unknown family"):
        cases.select_cases(family="nope")
    assert {c.family for c in cases.select_cases(family="fp8")} == {Family.FP8}


def test_each_case_kind_carries_its_generator():
    from attncheck import merge_case, mha_case, mla_case
    expected = {"MHA": mha_case, "MLA": mla_case, "MERGE": merge_case}
    for c in cases.all_cases():
        assert golden.case_module(c) is expected[c.kind] is type(c).generator


def test_no_import_cycle_between_the_catalogue_and_the_generators():
    code = ("import sys, attncheck.mla_case, attncheck.mha_case, attncheck.merge_case; "
            "assert 'attncheck.cases' not in sys.modules, 'a generator imports the catalogue'")
    subprocess.run([sys.executable, "-c", code], check=True)


def _params(**kw) -> CaseParams:
    base = dict(kind="MHA", family="decode", tier="smoke", dtype="bf16", kv_cache_dtype="auto",
                query_lens=(1,), seq_lens=(17,), num_heads=8, num_kv_heads=2, head_size=64, block_size=16)
    return CaseParams(**{**base, **kw})


def test_known_issue_conditions_all_apply():
    k = KnownIssue(backend="B", reason="r", link="l", platform="cuda", dtypes={"fp32"}, families={Family.DECODE},
                   predicate=lambda p: p.seq_lens[0] % p.block_size != 0)
    assert k.applies(_params(dtype="fp32"), "cuda")
    assert not k.applies(_params(dtype="fp32"), "cpu")
    assert not k.applies(_params(dtype="bf16"), "cuda")
    assert not k.applies(_params(dtype="fp32", family="mixed"), "cuda")
    assert not k.applies(_params(dtype="fp32", seq_lens=(32,)), "cuda")
    with pytest.raises(ValueError, match="platform"):
        KnownIssue(backend="B", reason="r", link="l", platform="rocm7")


def test_known_issues_are_validated_when_a_backend_is_registered():
    from tests.planted import PlantedBackend

    class WrongFamily(PlantedBackend):
        known_issues = (KnownIssue(backend="PLANTED_NONE", reason="r", link="l", families={"decodes"}),)

    with pytest.raises(backends.PluginError, match="did you mean decode"):
        backends._materialise(WrongFamily(), "test")
    for name in backends.builtin_names():  # the built-ins' known issues are valid
        assert backends.get_backend(name).name == name


def test_a_known_issue_applies_only_to_the_backend_it_names():
    """A subclass under another name inherits its base's known issues; they must not excuse it."""
    from tests.planted import PlantedBackend

    def issue(backend):
        return KnownIssue(backend=backend, reason="planted", link="none", families={"mixed"})

    class Wrong(PlantedBackend):
        known_issues = (issue("SOMEONE_ELSE"),)

    class Declared(PlantedBackend):
        known_issues = (issue("PLANTED_SCALE_1_01"),)

    from attncheck import harness
    assert harness.run_backend(Wrong("scale_1.01"), "mixed-h8x2-d64-bs16-bf16").status == "fail"
    assert harness.run_backend(Declared("scale_1.01"), "mixed-h8x2-d64-bs16-bf16").status == "xfail"
