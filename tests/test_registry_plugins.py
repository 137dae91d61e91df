"""Backend registry: built-ins, --backend-plugin, the attncheck.backends entry point group."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from attncheck import backends, harness

pytestmark = pytest.mark.smoke
REPO = Path(__file__).resolve().parent.parent


def test_builtin_names_are_vllm_enum_names():
    for name in ("TRITON_ATTN", "ROCM_ATTN", "ROCM_AITER_FA", "ROCM_AITER_UNIFIED_ATTN", "FLEX_ATTENTION",
                 "TRITON_MLA", "ROCM_AITER_MLA", "TORCH_SDPA"):
        assert name in backends.names()


def test_unknown_backend_names_the_closest_and_lists_valid_ones():
    with pytest.raises(backends.UnknownBackendError) as e:
        backends.get_backend("TRITON_ATN")
    msg = str(e.value)
    assert "did you mean TRITON_ATTN" in msg and "Valid backends:" in msg and "ROCM_AITER_FA" in msg


def test_lowercase_name_resolves():
    assert backends.get_backend("torch_sdpa").name == "TORCH_SDPA"


def test_plugin_spec_errors_are_clear():
    with pytest.raises(backends.PluginError, match="expected 'module:attr'"):
        backends.load_plugin("no_colon_here")
    with pytest.raises(backends.PluginError, match="cannot import module"):
        backends.load_plugin("no_such_module_xyz:THING")
    with pytest.raises(backends.PluginError, match="has no attribute"):
        backends.load_plugin("tests.plugins.drop_last_key:NOPE")
    with pytest.raises(backends.PluginError, match="is not a backend"):
        backends.load_plugin("tests.plugins.drop_last_key:__doc__")


def test_plugin_that_drops_the_last_key_fails_with_sequence_token_head():
    assert backends.load_plugin("tests.plugins.drop_last_key:BACKEND") == ["DROP_LAST_KEY"]
    v = harness.run_backend("DROP_LAST_KEY", "prefill-h8x2-d64-bs16-bf16")
    assert v.status == "fail"
    worst = v.failing_rows[0]
    assert worst["sequence"] is not None and worst["token"] is not None and worst["head"] is not None


def test_plugin_factory_returning_a_list():
    assert backends.load_plugin("tests.plugins.drop_last_key:make_backends") == ["PLUGIN_CORRECT", "PLUGIN_SCALE"]
    assert harness.run_backend("PLUGIN_CORRECT", "mixed-h8x2-d64-bs16-bf16").status == "pass"
    assert harness.run_backend("PLUGIN_SCALE", "mixed-h8x2-d64-bs16-bf16").status == "fail"


def test_plugin_may_not_shadow_a_builtin():
    from tests.planted import PlantedBackend
    with pytest.raises(backends.PluginError, match="is a built-in"):
        backends.register(PlantedBackend(None, name="TRITON_ATTN"))


def test_entry_point_group_registers_backends(tmp_path, monkeypatch):
    dist = tmp_path / "attncheck_demo_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: attncheck-demo-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""\
        [attncheck.backends]
        demo = tests.plugins.drop_last_key:BACKEND
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    backends._plugins.pop("DROP_LAST_KEY", None)
    backends.reload_entry_points()
    assert "DROP_LAST_KEY" in backends.names()


BAD_PLUGINS = {  # module source, spec, what the one-line message must say
    "raises": ("raise RuntimeError('broken at import')\n", "bad_raises:BACKEND", "RuntimeError: broken at import"),
    "syntax": ("def oops(:\n", "bad_syntax:BACKEND", "SyntaxError"),
    "empty module": (None, ":X", "expected 'module:attr'"),
    "needs arguments": (None, "time:sleep", "factory taking no arguments"),
    "factory raises": ("def make():\n    raise ValueError('no GPU here')\n", "bad_factory:make",
                       "ValueError: no GPU here"),
    "name None": ("from tests.planted import PlantedBackend\nclass B(PlantedBackend):\n    pass\n"
                  "BACKEND = B()\nBACKEND.name = None\n", "bad_name:BACKEND", "expected a non-empty string"),
}


def _write_plugin(tmp_path, source, spec):
    if source is not None:
        (tmp_path / f"{spec.split(':')[0]}.py").write_text(source)


@pytest.mark.parametrize("what", sorted(BAD_PLUGINS))
def test_bad_plugin_is_a_one_line_plugin_error(what, tmp_path, monkeypatch):
    source, spec, says = BAD_PLUGINS[what]
    _write_plugin(tmp_path, source, spec)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(backends.PluginError) as e:
        backends.load_plugin(spec)
    assert says in str(e.value) and "\n" not in str(e.value)


def _pytest_script() -> list:
    """pytest as the console script runs it: ``python -P`` (3.11+) keeps the current directory
    off sys.path, so a plugin found there proves attncheck added it. (Not the `pytest` script
    beside sys.executable: a venv that sees pytest through system site-packages has none.)"""
    return [sys.executable, "-P", "-m", "pytest"]


@pytest.mark.parametrize("what", ["raises", "syntax", "name None"])
def test_bad_plugin_under_pytest_is_a_usage_error_not_internalerror(what, tmp_path):
    source, spec, says = BAD_PLUGINS[what]
    _write_plugin(tmp_path, source, spec)
    r = subprocess.run([*_pytest_script(), "-p", "no:cacheprovider", "--attncheck-backend-plugin", spec,
                        "--attncheck-tier", "smoke", "--attncheck-device", "cpu"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 4, r.stdout + r.stderr
    assert "INTERNALERROR" not in r.stdout + r.stderr and "Traceback" not in r.stdout + r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("ERROR:")]
    assert len(errors) == 1 and says in errors[0], r.stderr


def test_any_project_runs_the_suite_through_the_pytest_plugin(tmp_path):
    """A project with its own backend module, no conftest and no checkout of attncheck's tests."""
    (tmp_path / "my_backends.py").write_text(textwrap.dedent("""\
        from impl.backends.torch_sdpa import TorchSDPABackend

        class MyKernel(TorchSDPABackend):
            name = "MY_KERNEL"
            provider = "my-project"

        BACKEND = MyKernel()
        """))
    r = subprocess.run([*_pytest_script(), "-p", "no:cacheprovider", "--attncheck-backend", "MY_KERNEL",
                        "--attncheck-backend-plugin", "my_backends:BACKEND", "--attncheck-tier", "smoke",
                        "--attncheck-device", "cpu", "--attncheck-case", "prefill-h8x2-d64-bs16-bf16",
                        "mixed-h8x2-d64-bs16-bf16-sinks", "--attncheck-json", "out.json"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed, 1 skipped" in r.stdout and "MY_KERNEL" in r.stdout
    data = json.loads((tmp_path / "out.json").read_text())
    got = {v["case"]: (v["status"], v["provider"]) for v in data["verdicts"]}
    assert got == {"prefill-h8x2-d64-bs16-bf16": ("pass", "my-project"),
                   "mixed-h8x2-d64-bs16-bf16-sinks": ("skip", "my-project")}


def test_pytest_option_backend_plugin_runs_the_plugin():
    """--backend-plugin on the pytest command line of this repository reaches the golden suite."""
    r = subprocess.run([*_pytest_script(), "attncheck/pytest_plugin.py", "-q", "-p", "no:cacheprovider",
                        "-o", "addopts=", "--device", "cpu",
                        "--backend-plugin", "tests.plugins.drop_last_key:BACKEND", "--backend", "DROP_LAST_KEY",
                        "-k", "prefill-h8x2-d64-bs16-bf16"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 failed" in r.stdout and "sequence" in r.stdout


def test_a_new_builtin_backend_is_one_file(tmp_path, monkeypatch):
    """A module in impl/backends that lists BACKENDS is registered, run, and benchmarked."""
    import impl.backends

    (tmp_path / "zz_new_backend.py").write_text(textwrap.dedent("""\
        from tests.planted import PlantedBackend

        class NewBackend(PlantedBackend):
            def __init__(self):
                super().__init__(None, name="NEW_BUILTIN")

        BACKENDS = (NewBackend,)
        """))
    monkeypatch.setattr(impl.backends, "__path__", [*impl.backends.__path__, str(tmp_path)])
    try:
        backends.reload_entry_points()
        assert "NEW_BUILTIN" in backends.builtin_names()
        from attncheck.bench.rows import mha_backend_names
        assert "NEW_BUILTIN" in mha_backend_names()
        assert harness.run_backend("NEW_BUILTIN", "mixed-h8x2-d64-bs16-bf16").status == "pass"
    finally:
        monkeypatch.undo()
        sys.modules.pop("impl.backends.zz_new_backend", None)
        backends.reload_entry_points()
    assert "NEW_BUILTIN" not in backends.names()


def test_builtins_load_without_installed_entry_points(monkeypatch):
    """A source tree on PYTHONPATH (the GPU machine) has no entry points: built-ins still load."""
    monkeypatch.setattr(backends.importlib.metadata, "entry_points", lambda group: [])
    try:
        backends.reload_entry_points()
        assert {"TRITON_ATTN", "ROCM_AITER_MLA", "TORCH_SDPA"} <= set(backends.builtin_names())
    finally:
        monkeypatch.undo()
        backends.reload_entry_points()
