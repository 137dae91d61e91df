"""The attncheck command line, run as a user would."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.smoke


def attncheck(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "attncheck.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cases_lists_the_catalogue():
    r = attncheck("cases", "--tier", "smoke")
    assert r.returncode == 0, r.stderr
    assert "mixed-h8x2-d64-bs16-bf16" in r.stdout and "cases" in r.stdout.splitlines()[-1]
    r = attncheck("cases", "--tier", "large", "--json")
    names = [c["name"] for c in json.loads(r.stdout)]
    assert "large-extend-h32x8-d128-bs16-bf16-3616over20000" in names


def test_unknown_tier_is_an_argument_error():
    r = attncheck("verify", "--tier", "huge")
    assert r.returncode == 2 and "invalid choice: 'huge'" in r.stderr


def test_unknown_backend_is_an_error_naming_valid_ones():
    r = attncheck("verify", "--device", "cpu", "--backend", "TRITON_ATN")
    assert r.returncode == 2 and "did you mean TRITON_ATTN" in r.stderr


def test_verify_with_a_failing_plugin_reports_sequence_token_head(tmp_path):
    js, junit = tmp_path / "v.json", tmp_path / "v.xml"
    r = attncheck("verify", "--device", "cpu", "--backend-plugin", "tests.plugins.drop_last_key:BACKEND",
                  "--backend", "DROP_LAST_KEY", "TORCH_SDPA", "--json", str(js), "--junit", str(junit), "-n", "0")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "DROP_LAST_KEY" in r.stdout and "TORCH_SDPA" in r.stdout
    assert "sequence" in r.stdout and "token" in r.stdout and "head" in r.stdout
    data = json.loads(js.read_text())
    statuses = {(v["backend"], v["status"]) for v in data["verdicts"]}
    assert ("DROP_LAST_KEY", "fail") in statuses and ("TORCH_SDPA", "pass") in statuses
    assert ("TORCH_SDPA", "fail") not in statuses
    assert junit.read_text().startswith("<?xml")
