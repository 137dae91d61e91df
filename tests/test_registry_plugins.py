"""Backend registry: built-ins, --backend-plugin, the attncheck.backends entry point group."""

import subprocess
import sys
import textwrap

import pytest

from attncheck import backends, harness

pytestmark = pytest.mark.smoke


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
    worst = v.details["failing_rows"][0]["where"]
    assert "sequence" in worst and "token" in worst and "head" in worst


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


def test_pytest_option_backend_plugin_runs_the_plugin(tmp_path):
    """--backend-plugin on the pytest command line reaches the golden suite."""
    r = subprocess.run([sys.executable, "-m", "pytest", "tests/test_backends_golden.py", "-q", "-p", "no:cacheprovider",
                        "-p", "no:benchmark", "-o", "addopts=", "--device", "cpu",
                        "--backend-plugin", "tests.plugins.drop_last_key:BACKEND", "--backend", "DROP_LAST_KEY",
                        "-k", "prefill-h8x2-d64-bs16-bf16"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 failed" in r.stdout and "sequence" in r.stdout
