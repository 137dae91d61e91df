"""The import sandbox of the differential test (tests/selection/vllm_sandbox.py)."""

from __future__ import annotations

import sys

import pytest

from tests.selection.vllm_sandbox import Lazy, Sandbox, Stub

pytestmark = pytest.mark.smoke


def _tree(tmp_path):
    pkg = tmp_path / "vllm" / "platforms"
    pkg.mkdir(parents=True)
    (pkg / "rocm.py").write_text(
        "import amdsmi\n"
        "from vllm import _C\n"  # compiled: a stub
        "from vllm.logger import init_logger\n"  # not real: a stub
        "from vllm.platforms import current_platform\n"
        "logger = init_logger(__name__)\n"
        "ARCH = amdsmi.arch()\n"
        "@init_logger\n"  # a stub used as a decorator keeps the function
        "def on_gfx9():\n    return ARCH.startswith('gfx9')\n"
        "class Platform(_C.Base):\n    pass\n")
    return tmp_path


def test_real_modules_load_and_the_rest_is_answered_or_stubbed(tmp_path, monkeypatch):
    installed = object()
    monkeypatch.setitem(sys.modules, "vllm", installed)  # an installed vLLM stays hidden
    for name in [n for n in sys.modules if n.startswith("vllm.")]:
        # vLLM's kernels loaded earlier in this process (impl.vllm, the vLLM provider) stay out of it
        monkeypatch.delitem(sys.modules, name)
    sandbox = Sandbox(_tree(tmp_path), ["vllm.platforms.rocm"], answers={
        "amdsmi": {"arch": lambda: "gfx942"},
        "vllm.platforms": {"current_platform": Lazy(lambda: "the platform")}})
    with sandbox:
        rocm = sandbox.module("vllm.platforms.rocm")
        assert rocm.on_gfx9() is True and rocm.ARCH == "gfx942"
        assert isinstance(rocm.logger, Stub) and issubclass(rocm.Platform, object)
        assert rocm.current_platform == "the platform"
        assert sys.modules["vllm"] is not installed
    assert sys.modules["vllm"] is installed and "vllm.platforms.rocm" not in sys.modules
    assert "amdsmi" not in sys.modules
    with sandbox:  # modules survive between uses; functions import lazily inside
        assert sys.modules["vllm.platforms.rocm"] is rocm


def test_a_missing_real_module_is_an_import_error(tmp_path):
    with Sandbox(tmp_path, ["vllm.nothing"]) as sandbox:
        with pytest.raises(ImportError, match="missing from the vLLM sources"):
            sandbox.module("vllm.nothing")
