"""Planted bugs in kernel source: a copy of a module with textual edits, imported from a temp dir.

    bad = mutant(paged_decode, [("key_end = seq_len", "key_end = seq_len - 1", 1)], tmp_path)

Each ``(old, new, count)`` edit must match exactly ``count`` times, so a refactor that moves the
target makes the planted-bug test fail loudly instead of silently testing nothing.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys


def mutant(module, edits, tmp_path):
    src = inspect.getsource(module)
    for old, new, count in edits:
        assert src.count(old) == count, f"mutation target not found {count}x: {old!r}"
        src = src.replace(old, new)
    path = tmp_path / f"mutant_{module.__name__.rsplit('.', 1)[-1]}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses (and pickling) look their module up by name
    spec.loader.exec_module(mod)
    return mod
