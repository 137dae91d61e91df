"""The layers of docs/ARCHITECTURE.md are enforced by import-linter (CI runs ``lint-imports``
with the contracts in pyproject.toml). Here each contract is shown to break on a copy of the tree
with one planted import."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.smoke
REPO = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).parent / "lint-imports"
needs_linter = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (pip install -e '.[dev]')")


def _lint(tmp_path, plant=None):
    for package in ("reference", "impl", "attncheck"):
        shutil.copytree(REPO / package, tmp_path / package, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "goldens"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    if plant:
        module, line = plant
        with open(tmp_path / module, "a") as f:
            f.write(f"\n{line}\n")
    return subprocess.run([str(LINT), "--config", "pyproject.toml", "--no-cache"], capture_output=True, text=True,
                          cwd=tmp_path, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=300)


@needs_linter
def test_the_tree_keeps_every_contract(tmp_path):
    r = _lint(tmp_path)
    assert r.returncode == 0 and "3 kept, 0 broken" in r.stdout, r.stdout + r.stderr


@needs_linter
@pytest.mark.parametrize("plant, contract", [
    (("reference/mha.py", "import impl.batch"), "reference is an independent oracle"),
    (("reference/paged.py", "from attncheck import rule"), "reference is an independent oracle"),
    (("impl/batch.py", "import reference.mha"), "impl (the systems under test)"),
    (("impl/backend.py", "from attncheck import harness"), "impl (the systems under test)"),
    (("attncheck/rule.py", "from attncheck import harness"), "no import cycles"),
    (("impl/triton/compat.py", "from impl.backends import triton_attn"), "no import cycles"),
])
def test_a_planted_import_breaks_its_contract(tmp_path, plant, contract):
    r = _lint(tmp_path, plant)
    assert r.returncode != 0, r.stdout
    broken = r.stdout.split("Broken contracts")[-1]
    assert contract in broken, r.stdout
