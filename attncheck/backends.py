"""The backend registry.

Three sources, in this order: the built-ins below, the entry-point group
``attncheck.backends`` of installed distributions, and ``--backend-plugin module:attr``
(pytest option and CLI). A plugin target may be a backend object, a backend class, a
callable returning a backend or a list of them, or a list of any of these.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
from typing import Iterable

from impl.backend import Backend

ENTRY_POINT_GROUP = "attncheck.backends"

BUILTIN = {
    "TORCH_SDPA": "impl.backends.torch_sdpa:TorchSDPABackend",
    "TRITON_ATTN": "impl.backends.triton_attn:TritonAttnBackend",
    "ROCM_ATTN": "impl.backends.rocm_attn:RocmAttnBackend",
    "FLEX_ATTENTION": "impl.backends.flex_attention:FlexAttentionBackend",
    "ROCM_AITER_UNIFIED_ATTN": "impl.backends.rocm_aiter_unified_attn:AiterUnifiedAttnBackend",
    "ROCM_AITER_FA": "impl.backends.rocm_aiter_fa:AiterFABackend",
    "TRITON_MLA": "impl.backends.triton_mla:TritonMLABackend",
    "ROCM_AITER_MLA": "impl.backends.rocm_aiter_mla:AiterMLABackend",
}


class UnknownBackendError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class PluginError(ValueError):
    pass


_plugins: dict = {}
_instances: dict = {}
_entry_points_loaded = False


def _import_target(spec: str):
    if ":" not in spec:
        raise PluginError(f"--backend-plugin {spec!r}: expected 'module:attr'")
    mod, attr = spec.split(":", 1)
    try:
        obj = importlib.import_module(mod)
    except ImportError as e:
        raise PluginError(f"--backend-plugin {spec!r}: cannot import module {mod!r} ({e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"--backend-plugin {spec!r}: module {mod!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _materialise(obj, source: str) -> list:
    if isinstance(obj, (list, tuple)):
        out = []
        for o in obj:
            out += _materialise(o, source)
        return out
    if isinstance(obj, type):
        obj = obj()
    elif callable(obj) and not isinstance(obj, Backend):
        obj = obj()
        return _materialise(obj, source)
    missing = [a for a in ("name", "kind", "capabilities", "availability", "run") if not hasattr(obj, a)]
    if missing:
        raise PluginError(f"{source}: {obj!r} is not a backend (missing {', '.join(missing)})")
    if obj.kind not in ("MHA", "MLA"):
        raise PluginError(f"{source}: backend {obj.name} has kind {obj.kind!r}, expected 'MHA' or 'MLA'")
    return [obj]


def register(backend, source: str = "register()") -> list:
    """Register a backend object/class/factory; returns the backend names added."""
    names = []
    for b in _materialise(backend, source):
        if b.name in BUILTIN:
            raise PluginError(f"{source}: backend name {b.name} is a built-in; choose another name")
        _plugins[b.name] = b
        names.append(b.name)
    return names


def load_plugin(spec: str) -> list:
    return register(_import_target(spec), source=f"--backend-plugin {spec}")


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        register(ep.load(), source=f"entry point {ep.name} ({ep.value})")


def reload_entry_points() -> None:
    """Forget what was discovered and look again (tests install entry points at run time)."""
    global _entry_points_loaded
    _entry_points_loaded = False
    _load_entry_points()


def names() -> list:
    _load_entry_points()
    return list(BUILTIN) + sorted(_plugins)


def get_backend(name: str):
    _load_entry_points()
    if name in _plugins:
        return _plugins[name]
    if name in BUILTIN:
        if name not in _instances:
            _instances[name] = _materialise(_import_target(BUILTIN[name]), f"built-in {name}")[0]
        return _instances[name]
    upper = name.upper() if isinstance(name, str) else name
    if upper in BUILTIN or upper in _plugins:
        return get_backend(upper)
    close = difflib.get_close_matches(str(name).upper(), names(), n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise UnknownBackendError(f"unknown backend {name!r}{hint} Valid backends: {', '.join(names())}")


def resolve(requested: Iterable[str] | None) -> list:
    """Backend objects for the names given (None = all registered)."""
    chosen = list(requested) if requested else names()
    return [get_backend(n) for n in chosen]
