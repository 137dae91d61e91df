"""Write the vLLM source files its Triton attention kernels need into a folder.

    python -m impl.vllm.extract DEST

loads vLLM's kernels here (from the installed ``vllm``, or ``ATTNCHECK_VLLM_SRC``; under the
Triton interpreter when no GPU is visible), then copies every vLLM .py file the loading
executed, plus ``vllm/_version.py``, to ``DEST/vllm/`` (about 40 files, under 1 MB). On a
machine without network: ``ATTNCHECK_VLLM_SRC=DEST`` (``impl.vllm.loader.find_source``).

DEST is written whole or not at all: the files go to a temporary folder beside it first, and an
existing ``DEST/vllm`` is replaced only once the new one is complete.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile


def files_needed() -> list:
    """Relative paths (under the vllm package folder) of the files the kernels need."""
    from impl.vllm import loader

    loader.load()
    return sorted(set(loader.loaded_files()) | {"_version.py"})


def extract(dest: str) -> tuple:
    """Copy the needed files to ``dest/vllm``; returns (number of files, total bytes)."""
    from impl.vllm import loader

    if os.path.exists(dest) and not os.path.isdir(dest):
        raise ValueError(f"DEST: {dest} is a file; expected a folder (created if missing)")
    src = loader.load().source.package_dir
    names = [n for n in files_needed() if os.path.isfile(os.path.join(src, n))]
    parent = os.path.abspath(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".vllm-extract-", dir=parent)
    try:
        total = 0
        for name in names:
            target = os.path.join(tmp, "vllm", name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(os.path.join(src, name), target)
            total += os.path.getsize(target)
        final, old = os.path.join(parent, "vllm"), None
        if os.path.exists(final):
            old = os.path.join(tmp, "old")
            os.rename(final, old)
        try:
            os.rename(os.path.join(tmp, "vllm"), final)
        except OSError:
            if old:
                os.rename(old, final)  # put the previous copy back
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return len(names), total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m impl.vllm.extract",
                                description="copy the vLLM sources its Triton attention kernels need into DEST/vllm")
    p.add_argument("dest", metavar="DEST", help="folder to write (then run with ATTNCHECK_VLLM_SRC=DEST)")
    args = p.parse_args(argv)
    from impl import platform

    if not platform.is_interpreter():
        import torch

        if not torch.cuda.is_available():  # loading needs a mode; the interpreter needs no GPU
            os.environ["TRITON_INTERPRET"] = "1"
    from impl.vllm import loader

    try:
        count, size = extract(args.dest)
    except (ValueError, OSError, loader.VllmUnavailable) as e:
        print(f"impl.vllm.extract: {e}", file=sys.stderr)
        return 2
    print(f"wrote {count} files ({size / 1024:.0f} KiB) of vllm {loader.load().version} to "
          f"{os.path.join(args.dest, 'vllm')}; use ATTNCHECK_VLLM_SRC={args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
