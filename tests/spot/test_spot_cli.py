"""`attncheck spot`: tables and exit 0 for a correct backend, exit 1 naming a planted bug, exit 2
with a one-line error for bad arguments, JSON written."""

from __future__ import annotations

import json
import re

import pytest

from attncheck import backends
from attncheck.cli import main

SMALL = ["--device", "cpu", "--model", "retrieval", "--limit", "6", "--max-len", "64", "--no-progress"]
PLUGIN = ["--backend-plugin", "tests.spot.planted_backends:BACKENDS"]


@pytest.fixture(autouse=True)
def _forget_plugins():
    yield
    for name in [n for n in backends._plugins if n.startswith("SPOT_")]:
        del backends._plugins[name]


def test_correct_backend_prints_tables_and_exits_0(capsys, tmp_path):
    out_json = tmp_path / "spot.json"
    rc = main(["spot", *SMALL, "--backend", "TORCH_SDPA", "--json", str(out_json)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "|Tasks" in out.replace(" ", "") and "exact_match" in out and "TORCH_SDPA" in out
    result = json.loads(out_json.read_text())["results"][0]
    assert result["task"] == "retrieval" and result["backends"][0]["verdict"] == "PASS"
    assert result["backends"][0]["value"] == 1.0


def test_planted_bug_exits_1_and_is_named(capsys):
    rc = main(["spot", *SMALL, *PLUGIN, "--backend", "SPOT_CORRECT", "SPOT_WRONG_GQA"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAILED: SPOT_WRONG_GQA" in out
    assert re.search(r"-- SPOT_CORRECT\b.*: PASS", out) and re.search(r"-- SPOT_WRONG_GQA\b.*: FAIL", out)
    assert "first flip" in out


@pytest.mark.parametrize("argv, message", [
    (["--limit", "0"], "--limit: expected a positive integer"),
    (["--backend", "NO_SUCH_BACKEND"], "unknown backend"),
    (["--model", "/no/such/folder"], "expected 'retrieval', 'addition' or a checkpoint folder"),
    (["--backend-plugin", "nowhere_module:X"], "cannot import module"),
    (["--task", "gsm8k.jsonl"], "the retrieval model has only the task 'retrieval'"),
])
def test_bad_arguments_exit_2_with_one_line(capsys, tmp_path, argv, message):
    out_json = tmp_path / "never.json"
    rc = main(["spot", *SMALL, *argv, "--json", str(out_json)])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out_json.exists()
