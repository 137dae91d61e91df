"""The panel report (python -m tests.panel.report): member x check worst ratios, bad input."""

import json

import pytest

from tests.panel import report
from tests.panel.test_panel_power import DropsNewestKey, SkipsCacheWrite, _mha

pytestmark = pytest.mark.smoke

CASE = "mixed-h8x2-d64-bs16-bf16-fp8e4m3fn"


def test_summary_names_each_members_worst_output_lse_and_cache():
    rows = [report.measure(m, CASE) for m in (report.MEMBERS["PANEL_EXP2"],
                                              _mha(DropsNewestKey, "PANEL_SCORES_FP32"),
                                              _mha(SkipsCacheWrite, "PANEL_SCORES_FP32"))]
    good, drops, skips = report.summarise(rows)
    assert good["failed"] == 0 and good["output_row"] <= 1 and good["lse"] <= 1 and not good["cache_wrong"]
    assert good["output_row_case"] == good["lse_case"] == CASE
    assert drops["failed"] == 1 and drops["output_row"] > 1 and drops["lse_rows_over"] > 0
    assert skips["failed"] == 1 and skips["cache_wrong"] == [CASE]
    table = report.format_summary(rows)
    assert "PLANTED_SkipsCacheWrite" in table and "1 wrong" in table and "exact" in table


def test_main_writes_the_tables_and_json(tmp_path, capsys):
    out, js = tmp_path / "panel.txt", tmp_path / "panel.json"
    rc = report.main(["--member", "PANEL_SPLIT_KV4", "--tier", "smoke", "--out", str(out), "--json", str(js)])
    data = json.loads(js.read_text())
    (summary,) = data["summary"]
    assert rc == 0, out.read_text()
    assert summary["member"] == "PANEL_SPLIT_KV4" and summary["cases"] == len(data["rows"]) > 0
    assert summary["output_row"] == max(r["row_ratio"] for r in data["rows"])
    assert out.read_text() == capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--device", "tpu"], "--device: expected cpu or cuda"),
    (["--member", "PANEL_NOPE"], "--member: unknown PANEL_NOPE"),
    (["--json", "/nonexistent-dir/x.json"], "--json: the folder of /nonexistent-dir/x.json does not exist"),
])
def test_bad_input_is_one_line_and_writes_nothing(argv, message, capsys, tmp_path):
    assert report.main(argv + ["--out", str(tmp_path / "t.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not any(tmp_path.iterdir())
