"""One module per vLLM backend pipeline.

A module that provides backends lists them in ``BACKENDS`` (classes, instantiated with no
arguments, or backend objects); ``builtin_backends()`` imports every module of this package and
collects them. attncheck registers the result through its entry point in the
``attncheck.backends`` group, the same way as a third-party backend, so a new built-in backend
is one file here plus its tests. A backend module must import without its optional
dependencies (AITER, vLLM, a GPU): ``availability(device)`` says what is missing.
"""

from __future__ import annotations

import importlib
import pkgutil


def builtin_backends() -> list:
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        found += list(getattr(module, "BACKENDS", ()))
    return found
