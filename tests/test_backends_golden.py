"""The harness that judges a backend on a golden case: its verdict as data, and the holes a
backend could slip through (each shown with a planted backend that must not pass).

The backends x golden cases suite itself is collected by attncheck's pytest plugin
(``attncheck/pytest_plugin.py``, listed in ``testpaths``); ``tests/test_cli.py`` and
``tests/test_registry_plugins.py`` drive it as a user would.
"""

import json

import pytest
import torch

from attncheck import cases, harness, report
from attncheck.rule import bits
from impl.backend import BackendOutput, Capabilities, KnownIssue
from impl.batch import BatchError
from tests.planted import PlantedBackend

pytestmark = pytest.mark.smoke

PREFILL = "prefill-h8x2-d64-bs16-bf16"
MIXED = "mixed-h8x2-d64-bs16-bf16"
UNORDERED = "unordered-h8x2-d64-bs16-bf16"


class NoLSE(PlantedBackend):
    """Declares an LSE in its capabilities but returns none."""

    def run(self, batch):
        return BackendOutput(output=super().run(batch).output)


class Rejects(PlantedBackend):
    """Raises BatchError with a given message on every batch."""

    def __init__(self, message, name):
        super().__init__(None, name=name)
        self.message = message

    def run(self, batch):
        raise BatchError(self.message)


class WritesInput(PlantedBackend):
    """Correct output, but afterwards scribbles on one of its inputs."""

    def __init__(self, field_name):
        super().__init__(None, name=f"WRITES_{field_name.upper()}")
        self.field_name = field_name

    def run(self, batch):
        out = super().run(batch)
        value = getattr(batch, self.field_name)
        if isinstance(value, torch.Tensor):
            value.zero_() if value.dtype in (torch.int32, torch.int64) else value.mul_(2)
        else:
            setattr(batch, self.field_name, value * 2)
        return out


class DropsLastToken(PlantedBackend):
    """Returns one output row too few (a wrong shape: there is no per-row ratio)."""

    def run(self, batch):
        out = super().run(batch)
        return BackendOutput(output=out.output[:-1], lse=out.lse)


# ---- the verdict as data -----------------------------------------------------------------------

def test_failing_rows_are_data_that_locate_the_dropped_key():
    v = harness.run_backend(PlantedBackend("drop_last_key"), PREFILL)
    assert v.status == "fail" and v.reason
    rows = [r for r in v.failing_rows if r["check"] == "per-row"]
    assert rows and all(r["ratio"] > 1 for r in rows)
    seq_lens = cases.get_case(PREFILL).seq_lens
    # only a sequence's last query sees its last key: every failing row is at that position
    for r in rows:
        assert r["position"] == seq_lens[r["sequence"]] - 1, r
        assert r["kv_blocks"] and r["error"] > r["budget"] > 0
    assert {r["check"] for r in v.failing_rows} >= {"per-row", "lse"}


def test_verdict_as_dict_is_json_and_round_trips():
    v = harness.run_backend(PlantedBackend("lse_pos_inf"), MIXED)
    assert v.status == "fail" and v.reason
    text = json.dumps(v.as_dict(), allow_nan=False)
    back = harness.Verdict.from_dict(json.loads(text))
    assert back.as_dict() == v.as_dict()
    assert back.failing_rows[0]["error"] == float("inf") and back.checks == v.checks
    assert v.provider == "tests.planted"  # no declared provider: the backend's module


def test_every_fail_and_error_has_a_reason():
    for backend in (PlantedBackend("skip_cache_write"), PlantedBackend("wrong_page"), Rejects("boom", "REJECTS")):
        v = harness.run_backend(backend, MIXED)
        assert v.status in ("fail", "error") and v.reason, v


def test_keep_artifacts_holds_inputs_output_lse_and_caches():
    v = harness.run_backend(PlantedBackend(None), MIXED, keep_artifacts=True)
    assert v.status == "pass", v.report
    art = v.artifacts
    stored = harness.golden_tensors(MIXED)
    assert set(art["inputs"]) == {k for k in stored if not k.startswith(("expected.", "budget."))}
    assert torch.equal(art["inputs"]["query"], stored["query"])
    assert art["output"].shape == stored["expected.output"].shape and art["output"].device.type == "cpu"
    assert art["lse"].shape == stored["expected.lse"].shape
    slots = stored["slot_mapping"].long()
    after = art["caches"]["key_cache"].flatten(0, 1)
    assert torch.equal(after[slots], stored["key"]) and not torch.equal(after, art["inputs"]["key_cache"].flatten(0, 1))
    assert harness.run_backend(PlantedBackend(None), MIXED).artifacts is None


def test_wrong_shape_has_no_ratio_and_the_matrix_does_not_show_zero():
    v = harness.run_backend(DropsLastToken(None, name="SHORT"), MIXED)
    assert v.status == "fail" and "shape" in v.reason and v.worst_ratio is None
    table = report.render_matrix([v])
    assert "n/a" in table and "0.00" not in table


# ---- harness holes (issue 9, item 4) -----------------------------------------------------------

def test_declared_lse_that_is_not_returned_fails():
    assert NoLSE.capabilities.returns_lse
    v = harness.run_backend(NoLSE(None, name="NO_LSE"), MIXED)
    assert v.status == "fail" and "returned none" in v.reason, v.report


def test_backend_without_lse_that_declares_none_passes():
    class Honest(NoLSE):
        capabilities = Capabilities(returns_lse=False)
    assert harness.run_backend(Honest(None, name="HONEST"), MIXED).status == "pass"


def test_batch_error_on_an_ordered_case_is_an_error():
    v = harness.run_backend(Rejects("batch order: sequence 1 is a decode after an extend", "REJECTS"), MIXED)
    assert v.status == "error" and "BatchError" in v.reason


def test_unordered_case_rejection_must_name_the_order():
    vague = harness.run_backend(Rejects("something is wrong", "VAGUE"), UNORDERED)
    assert vague.status == "fail" and "order" in vague.reason, vague.report
    clear = harness.run_backend(Rejects("batch order: sequence 1 is a decode after a prefill", "CLEAR"), UNORDERED)
    assert clear.status == "pass", clear.report


@pytest.mark.parametrize("field_name", ["query", "key", "value", "block_table", "seq_lens", "slot_mapping",
                                        "query_start_loc", "scale"])
def test_backend_writing_its_inputs_is_reported_and_harms_no_one(field_name):
    tensors = harness.golden_tensors(MIXED)
    pristine = {k: t.clone() for k, t in tensors.items()}
    v = harness.run_backend(WritesInput(field_name), MIXED, tensors=tensors)
    assert v.status == "fail" and field_name in v.reason, v.report
    for k, t in tensors.items():  # the caller's tensors are untouched (bit for bit: NaN poison included) ...
        assert torch.equal(bits(t), bits(pristine[k])), k
    # ... so the next backend given the same tensors is judged on the real inputs
    assert harness.run_backend(PlantedBackend(None), MIXED, tensors=tensors).status == "pass"


def test_known_issue_turns_a_failure_into_an_expected_failure_only():
    class Known(PlantedBackend):
        known_issues = tuple(KnownIssue(backend=name, reason="planted", link="none") for name in ("KNOWN_BAD", "KNOWN_GOOD"))
    assert harness.run_backend(Known("scale_1.01", name="KNOWN_BAD"), MIXED).status == "xfail"
    good = harness.run_backend(Known(None, name="KNOWN_GOOD"), MIXED)
    assert good.status == "pass" and "did not reproduce" in good.report


def test_report_lists_every_failure():
    verdicts = [harness.Verdict(backend="B", case=f"case-{i:02d}", status="fail", reason=f"reason {i}",
                                report=f"report {i}") for i in range(30)]
    text = report.render_problems(verdicts)
    assert all(f"case-{i:02d}: reason {i}" in text for i in range(30)) and "30 failure(s)" in text
