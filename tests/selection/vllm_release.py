"""The Python sources of one vLLM release, from its wheel, kept in a cache folder.

``sources(version, files)`` returns a folder holding ``vllm/...`` with at least ``files``:
the installed vLLM's own files when it is exactly that version, else the files extracted from
the release's wheel (``pip download --no-deps vllm==X``) into
``$ATTNCHECK_CACHE/vllm-<X>/`` (default ``~/.cache/attncheck``). Only the listed ``.py`` files
are kept and the wheel is deleted, so the download happens once per cache; a file lock makes
parallel test workers wait for the one that downloads. ``ReleaseUnavailable`` says why the
sources cannot be had (no network, no such release).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Iterable

from filelock import FileLock

CACHE_VAR = "ATTNCHECK_CACHE"
DOWNLOAD_TIMEOUT_S = 600


class ReleaseUnavailable(RuntimeError):
    """The release's sources cannot be had here; the message says why."""


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_VAR) or Path.home() / ".cache" / "attncheck")


def module_file(module: str) -> str:
    """``vllm.platforms.rocm`` -> ``vllm/platforms/rocm.py`` (packages: their __init__)."""
    return module.replace(".", "/") + ".py"


def _installed_root(version: str, files: Iterable[str]):
    try:
        dist = metadata.distribution("vllm")
    except metadata.PackageNotFoundError:
        return None
    if dist.version != version:
        return None
    root = Path(dist.locate_file(""))
    return root if all((root / f).is_file() for f in files) else None


def sources(version: str, files: Iterable[str]) -> Path:
    """A folder that holds ``vllm/<files>`` of vLLM ``version`` (see the module docstring)."""
    files = sorted(set(files))
    installed = _installed_root(version, files)
    if installed is not None:
        return installed
    root = cache_root()
    target = root / f"vllm-{version}"
    complete = target / "COMPLETE"
    if complete.is_file() and all((target / f).is_file() for f in files):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"vllm-{version}.lock")):
        if complete.is_file() and all((target / f).is_file() for f in files):
            return target  # another worker fetched it while this one waited
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            wheel = _download(version, Path(tmp))
            staged = Path(tmp) / "staged"
            _extract(wheel, files, staged)
            (staged / "COMPLETE").write_text(f"vllm {version}: {len(files)} files from "
                                             f"{wheel.name}\n")
            if target.exists():
                shutil.rmtree(target)
            staged.rename(target)  # one rename: a reader sees all the files or none
    return target


def _download(version: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(into), f"vllm=={version}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ReleaseUnavailable(f"pip download vllm=={version} took over "
                                 f"{DOWNLOAD_TIMEOUT_S} s") from None
    wheels = sorted(into.glob(f"vllm-{version}-*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ReleaseUnavailable(f"pip download vllm=={version} failed: {last[0]}")
    return wheels[0]


def _extract(wheel: Path, files: list, into: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        missing = [f for f in files if f not in names]
        if missing:
            raise ReleaseUnavailable(f"{wheel.name} has no {', '.join(missing)}")
        for f in files:
            z.extract(f, into)
