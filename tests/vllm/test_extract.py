"""``python -m impl.vllm.extract DEST``: the folder a GPU machine without network loads vLLM from."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from impl.vllm import loader

pytestmark = [pytest.mark.smoke, pytest.mark.slow]
try:
    SOURCE, NO_SOURCE = loader.find_source(), None
except loader.VllmUnavailable as e:
    SOURCE, NO_SOURCE = None, str(e)
needs_vllm = pytest.mark.skipif(SOURCE is None, reason=f"vLLM's sources are not here: {NO_SOURCE}")

LOAD_AND_WRITE = """
import sys, torch
from impl.vllm import loader, kernels
s = loader.load()
print("DESCRIBE", s.describe())
k = torch.randn(2, 2, 64, dtype=torch.bfloat16)
kc = torch.zeros(4, 16, 2, 64, dtype=torch.bfloat16)
vc = torch.zeros_like(kc)
kernels.reshape_and_cache_flash(k, k, kc, vc, torch.tensor([3, 40]))
print("WRITE", bool((kc[0, 3] == k[0]).all() and (vc[2, 8] == k[1]).all()))
files = [m.__file__ for n, m in sys.modules.items() if n.startswith("vllm") and m is not None
         and getattr(m, "__file__", None) and not getattr(m, "__attncheck_stub__", False)]
print("OUTSIDE", [f for f in files if not f.startswith(sys.argv[1])])
"""


def _extract(dest, **env):
    return subprocess.run([sys.executable, "-m", "impl.vllm.extract", str(dest)], capture_output=True, text=True,
                          env=dict(os.environ, TRITON_INTERPRET="1", **env), timeout=300)


@needs_vllm
def test_extracted_folder_is_small_complete_and_loads_alone(tmp_path):
    dest = tmp_path / "vllm-src"
    r = _extract(dest)
    assert r.returncode == 0, r.stderr
    files = [p for p in (dest / "vllm").rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    assert f"wrote {len(files)} files" in r.stdout and 25 <= len(files) <= 80 and size < 1 << 20
    assert (dest / "vllm" / "_version.py").is_file()
    for op in loader.KERNEL_MODULES:
        assert (dest / "vllm" / "v1" / "attention" / "ops" / f"{op}.py").is_file()
    # the folder alone serves the loader: every vLLM module comes from it, the kernels run
    run = subprocess.run([sys.executable, "-c", LOAD_AND_WRITE, str(dest)], capture_output=True, text=True,
                         env=dict(os.environ, TRITON_INTERPRET="1", ATTNCHECK_VLLM_SRC=str(dest)), timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"({loader.SRC_ENV}={dest};" in run.stdout
    assert "WRITE True" in run.stdout and "OUTSIDE []" in run.stdout


@needs_vllm
def test_an_untested_version_loads_with_a_note(tmp_path):
    dest = tmp_path / "src"
    assert _extract(dest).returncode == 0
    ver = dest / "vllm" / "_version.py"
    ver.write_text(ver.read_text().replace(f"'{SOURCE.version}'", "'0.99.0'"))
    run = subprocess.run([sys.executable, "-c", LOAD_AND_WRITE, str(dest)], capture_output=True, text=True,
                         env=dict(os.environ, TRITON_INTERPRET="1", ATTNCHECK_VLLM_SRC=str(dest)), timeout=300)
    assert run.returncode == 0, run.stderr
    assert "vllm 0.99.0" in run.stdout and "NOTE: vllm 0.99.0 is not a version attncheck was tested with" in run.stdout
    assert "WRITE True" in run.stdout


@needs_vllm
def test_re_extracting_replaces_and_bad_destinations_fail_cleanly(tmp_path):
    dest = tmp_path / "src"
    assert _extract(dest).returncode == 0
    stale = dest / "vllm" / "stale.py"
    stale.write_text("x = 1\n")
    assert _extract(dest).returncode == 0 and not stale.exists()
    assert sorted(p.name for p in dest.iterdir()) == ["vllm"]  # no temporary folder left behind
    a_file = tmp_path / "file"
    a_file.write_text("keep me\n")
    r = _extract(a_file)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "DEST:" in r.stderr and "Traceback" not in r.stderr
    assert a_file.read_text() == "keep me\n"


def test_without_a_source_extract_says_why(tmp_path):
    r = _extract(tmp_path / "out", ATTNCHECK_VLLM_SRC=str(tmp_path / "missing"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("impl.vllm.extract: ATTNCHECK_VLLM_SRC=") and not Path(tmp_path / "out" / "vllm").exists()
