"""The wheel carries what `attncheck verify` and `attncheck golden verify` need without a
checkout: the three packages, the golden store (attncheck/goldens) and the entry points (the
pytest plugin, the built-in backends). docs/ARCHITECTURE.md records the clean-venv run."""

import configparser
import importlib.util
import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from attncheck import backends, pytest_plugin

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_builtin_entry_point_is_the_registrys_builtin_target():
    group = PYPROJECT["project"]["entry-points"]["attncheck.backends"]
    assert group == {"builtin": backends.BUILTIN_TARGET}
    assert PYPROJECT["project"]["entry-points"]["pytest11"] == {pytest_plugin.__name__: pytest_plugin.__name__}


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("build") is None, reason="needs the build package (pip install -e '.[dev]')")
def test_wheel_ships_packages_goldens_and_entry_points(tmp_path):
    src = tmp_path / "src"  # a clean copy: no build leftovers, and nothing written into the checkout
    for name in ("attncheck", "impl", "reference", "golden"):
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", ".lock"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    r = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"),
                        str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("attncheck-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("attncheck/goldens/MANIFEST.json"))
        eps = configparser.ConfigParser()
        eps.read_string(z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode())
    assert {f"attncheck/goldens/{e['path']}" for e in manifest["cases"].values()} <= names
    stored = {str(p.relative_to(REPO / "golden")) for p in (REPO / "golden").rglob("*") if p.is_file()}
    assert {f"attncheck/goldens/{p}" for p in stored if not p.endswith(".lock")} <= names  # models too
    assert {"attncheck/cli.py", "attncheck/pytest_plugin.py", "impl/backends/triton_attn.py",
            "reference/mha.py"} <= names
    assert not any(n.startswith("tests/") for n in names)
    assert eps["attncheck.backends"]["builtin"] == backends.BUILTIN_TARGET
    assert eps["pytest11"][pytest_plugin.__name__] == pytest_plugin.__name__
    assert eps["console_scripts"]["attncheck"] == "attncheck.cli:main"
