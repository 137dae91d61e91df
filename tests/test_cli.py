"""The attncheck command line, run as a user would (the console script, from a directory)."""

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytestmark = pytest.mark.smoke

REPO = Path(__file__).resolve().parent.parent
ONE_CASE = ("--case", "prefill-h8x2-d64-bs16-bf16")


def attncheck(*args, cwd=REPO, env=None, timeout=600):
    """The ``attncheck`` console script (not ``python -m``, which would put the current
    directory on sys.path by itself)."""
    return subprocess.run([str(Path(sys.executable).parent / "attncheck"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def one_line_error(r, *needles):
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "attncheck verify: tier" not in r.stdout, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and all(n in lines[0] for n in needles), r.stderr


def test_cases_lists_the_catalogue():
    r = attncheck("cases", "--tier", "smoke")
    assert r.returncode == 0, r.stderr
    assert "mixed-h8x2-d64-bs16-bf16" in r.stdout and "cases" in r.stdout.splitlines()[-1]
    r = attncheck("cases", "--tier", "large", "--json")
    names = [c["name"] for c in json.loads(r.stdout)]
    assert "large-extend-h32x8-d128-bs16-bf16-3616over20000" in names


def test_unknown_family_is_an_error_listing_the_valid_ones():
    r = attncheck("cases", "--family", "nope")
    assert r.returncode == 2 and "unknown family" in r.stderr and "sliding_window" in r.stderr, r.stderr


def test_python_dash_m_attncheck_works():
    r = subprocess.run([sys.executable, "-m", "attncheck", "cases", "--tier", "full"], capture_output=True,
                       text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0 and "full-decode-h32x8-d128-bs16-bf16" in r.stdout, r.stderr


def test_unknown_tier_is_an_argument_error():
    r = attncheck("verify", "--tier", "huge")
    assert r.returncode == 2 and "invalid choice: 'huge'" in r.stderr


def test_unknown_backend_is_an_error_naming_valid_ones():
    one_line_error(attncheck("verify", "--device", "cpu", "--backend", "TRITON_ATN"), "did you mean TRITON_ATTN")


def test_negative_worker_count_is_rejected():
    r = attncheck("verify", "--device", "cpu", "-n", "-3")
    assert r.returncode == 2 and "-n/--workers" in r.stderr and ">= 0" in r.stderr, r.stderr


@pytest.mark.parametrize("option, path, says", [
    ("--json", "/tmp", "is a directory"),
    ("--json", "/proc/x.json", "cannot write there"),
    ("--junit", "/proc/x.xml", "cannot write there"),
    ("--json", "/no/such/dir/v.json", "does not exist"),
])
def test_output_paths_are_checked_before_running(option, path, says):
    one_line_error(attncheck("verify", "--device", "cpu", option, path), option, says)


def test_missing_golden_store_is_named(tmp_path):
    env = dict(__import__("os").environ, ATTNCHECK_GOLDEN_DIR=str(tmp_path / "nowhere"))
    one_line_error(attncheck("verify", "--device", "cpu", env=env), "golden store", "golden dir", "does not exist")


def test_truncated_manifest_is_named(tmp_path):
    text = (REPO / "golden" / "MANIFEST.json").read_text()
    (tmp_path / "MANIFEST.json").write_text(text[: len(text) // 2])
    env = dict(__import__("os").environ, ATTNCHECK_GOLDEN_DIR=str(tmp_path))
    one_line_error(attncheck("verify", "--device", "cpu", env=env), "golden store", "not valid JSON")


BROKEN = {
    "boom.py": "from impl.backends.torch_sdpa import TorchSDPABackend\n"
               "class Boom(TorchSDPABackend):\n    name = 'BOOM'\n"
               "    def run(self, batch):\n        raise RuntimeError('kernel exploded')\n"
               "BACKEND = Boom()\n",
    "known.py": "from impl.backend import KnownIssue\nfrom impl.backends.torch_sdpa import TorchSDPABackend\n"
                "class Known(TorchSDPABackend):\n    name = 'KNOWN_BAD'\n"
                "    known_issues = (KnownIssue(backend='KNOWN_BAD', reason='planted: output off by 5%', link='none'),)\n"
                "    def run(self, batch):\n        out = super().run(batch)\n"
                "        out.output.mul_(1.05)\n        return out\n"
                "BACKEND = Known()\n",
}


def test_junit_counts_an_exception_as_error_and_an_xfail_as_xfail(tmp_path):
    for name, text in BROKEN.items():
        (tmp_path / name).write_text(text)
    r = attncheck("verify", "--device", "cpu", "--backend-plugin", "boom:BACKEND", "--backend-plugin",
                  "known:BACKEND", "--backend", "BOOM", "KNOWN_BAD", *ONE_CASE, "--junit", "v.xml", "--json",
                  "v.json", "-n", "0", cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    suite = ET.parse(tmp_path / "v.xml").getroot().find("testsuite")
    assert (suite.get("errors"), suite.get("failures"), suite.get("skipped"), suite.get("xfailed")) == ("1", "0", "0", "1")
    cases = {tc.get("classname"): tc for tc in suite.iter("testcase")}
    assert cases["attncheck.BOOM"].find("error").get("message") == "RuntimeError: kernel exploded"
    assert cases["attncheck.KNOWN_BAD"].find("skipped") is None
    verdicts = {v["backend"]: v for v in json.loads((tmp_path / "v.json").read_text())["verdicts"]}
    assert verdicts["BOOM"]["status"] == "error" and verdicts["KNOWN_BAD"]["status"] == "xfail"


def test_readme_plugin_example_from_the_repository_root(tmp_path):
    """README: `attncheck verify --device cpu --backend-plugin tests.plugins.drop_last_key:BACKEND
    --backend DROP_LAST_KEY` (here on two cases, with TORCH_SDPA beside it)."""
    js, junit = tmp_path / "v.json", tmp_path / "v.xml"
    r = attncheck("verify", "--device", "cpu", "--backend-plugin", "tests.plugins.drop_last_key:BACKEND",
                  "--backend", "DROP_LAST_KEY", "TORCH_SDPA", "--case", "prefill-h8x2-d64-bs16-bf16",
                  "mixed-h8x2-d64-bs16-bf16", "--json", str(js), "--junit", str(junit))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "No module named" not in r.stderr
    assert "DROP_LAST_KEY" in r.stdout and "TORCH_SDPA" in r.stdout
    assert "sequence" in r.stdout and "token" in r.stdout and "head" in r.stdout
    data = json.loads(js.read_text())
    statuses = {(v["backend"], v["status"]) for v in data["verdicts"]}
    assert statuses == {("DROP_LAST_KEY", "fail"), ("TORCH_SDPA", "pass")}
    for v in data["verdicts"]:
        if v["status"] == "fail":
            assert v["reason"] and v["failing_rows"]
            assert {"sequence", "token", "position", "head", "kv_blocks", "error", "budget", "ratio",
                    "check"} <= set(v["failing_rows"][0])
            assert isinstance(v["failing_rows"][0]["sequence"], int)
    assert ET.parse(junit).getroot().find("testsuite").get("failures") == "2"


def test_verify_runs_from_any_directory_with_a_users_plugin(tmp_path):
    shutil.copy(REPO / "tests" / "planted.py", tmp_path / "my_planted.py")
    (tmp_path / "my_backends.py").write_text("from my_planted import PlantedBackend\n"
                                             "BACKEND = PlantedBackend('wrong_gqa_group', name='MY_KERNEL')\n")
    r = attncheck("verify", "--device", "cpu", "--backend-plugin", "my_backends:BACKEND", "--backend", "MY_KERNEL",
                  *ONE_CASE, "-n", "0", cwd=tmp_path)
    assert r.returncode == 1 and "FAIL MY_KERNEL :: prefill-h8x2-d64-bs16-bf16" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("workers", ["0", "2"])
def test_verify_keeps_the_environments_pytest_plugins_out(tmp_path, workers):
    """A pytest plugin installed in the environment (an entry point in group pytest11, as
    pytest-benchmark or pytest-randomly have) takes no part in the verify run, in this process
    or in xdist's workers: it is not part of the verdict, and pytest-benchmark, for one, creates
    ``.benchmarks/`` in the working directory."""
    site, probe_cwd, cwd = tmp_path / "site", tmp_path / "probe", tmp_path / "cwd"
    (site / "intruder-1.0.dist-info").mkdir(parents=True)
    probe_cwd.mkdir()
    cwd.mkdir()
    (site / "intruder-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: intruder\nVersion: 1.0\n")
    (site / "intruder-1.0.dist-info" / "entry_points.txt").write_text("[pytest11]\nintruder = intruder_plugin\n")
    (site / "intruder_plugin.py").write_text(
        "import os\n\ndef pytest_configure(config):\n"
        "    open(os.path.join(os.getcwd(), 'intruder-was-here'), 'w').close()\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("PYTEST_DISABLE_PLUGIN_AUTOLOAD", None)
    probe = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", str(tmp_path / "none")], cwd=probe_cwd,
                           env=env, capture_output=True, text=True, timeout=300)
    assert (probe_cwd / "intruder-was-here").exists(), "plain pytest does not autoload the plugin: " + probe.stderr
    r = attncheck("verify", "--device", "cpu", "--backend", "TORCH_SDPA", *ONE_CASE, "-n", workers, cwd=cwd, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert list(cwd.iterdir()) == []
