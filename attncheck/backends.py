"""The backend registry.

Every backend comes through the entry-point group ``attncheck.backends``: attncheck's own
entry point ``builtin`` (``impl.backends:builtin_backends``, every module of impl/backends that
lists ``BACKENDS``) and those of any installed distribution. Then ``--backend-plugin
module:attr`` (CLI and pytest) and ``register()`` add more for one run. A target may be a
backend object, a backend class, a callable returning a backend or a list of them, or a list of
any of these. Run from a source tree that is not installed (no entry points), the built-in
target is loaded directly.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import os
import sys

from impl.backend import Backend

ENTRY_POINT_GROUP = "attncheck.backends"
BUILTIN_TARGET = "impl.backends:builtin_backends"  # attncheck's own entry point (pyproject.toml)


class UnknownBackendError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class PluginError(ValueError):
    """A backend plugin that cannot be loaded; the message is one line naming the source."""


_builtin: dict = {}  # name -> backend, from attncheck's own entry point
_plugins: dict = {}  # name -> backend, from other entry points, --backend-plugin and register()
_entry_points_loaded = False


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _import_target(spec, option: str = "--backend-plugin") -> object:
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise PluginError(f"{option} {spec!r}: expected 'module:attr' (e.g. my_backends:BACKEND)")
    mod, attr = spec.split(":")
    # like `python -m`, the current directory is importable (a user's my_backends.py, tests.plugins...)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(mod)
    except Exception as e:  # ImportError, SyntaxError, or whatever the module raises at import
        raise PluginError(f"{option} {spec!r}: cannot import module {mod!r} ({_one_line(e)})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"{option} {spec!r}: module {mod!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _materialise(obj, source: str) -> list:
    if isinstance(obj, (list, tuple)):
        out = []
        for o in obj:
            out += _materialise(o, source)
        return out
    if isinstance(obj, type) or (callable(obj) and not isinstance(obj, Backend)):
        what = obj.__name__ if hasattr(obj, "__name__") else repr(obj)
        try:
            made = obj()
        except Exception as e:  # a factory that raises, or needs arguments (time:sleep)
            raise PluginError(f"{source}: calling {what}() to make a backend failed ({_one_line(e)}); "
                              "expected a backend, a class or a factory taking no arguments") from None
        return [_checked(made, source)] if isinstance(obj, type) else _materialise(made, source)
    return [_checked(obj, source)]


def _checked(obj, source: str):
    missing = [a for a in ("name", "kind", "capabilities", "availability", "run") if not hasattr(obj, a)]
    if missing:
        raise PluginError(f"{source}: {type(obj).__name__} object is not a backend (missing {', '.join(missing)})")
    if not isinstance(obj.name, str) or not obj.name.strip():
        raise PluginError(f"{source}: backend {type(obj).__name__} has name {obj.name!r}; expected a non-empty string")
    if obj.kind not in ("MHA", "MLA"):
        raise PluginError(f"{source}: backend {obj.name} has kind {obj.kind!r}, expected 'MHA' or 'MLA'")
    _check_known_issues(obj, source)
    return obj


def _check_known_issues(backend, source: str) -> None:
    """A known issue names only families the catalogue has. (One that names another backend,
    e.g. inherited from a base class, does not apply: attncheck.harness matches the name.)"""
    from attncheck.cases import Family

    for known in getattr(backend, "known_issues", ()) or ():
        for fam in sorted(known.families or ()):
            try:
                Family.parse(fam)
            except ValueError as e:
                raise PluginError(f"{source}: known issue of backend {backend.name}: {e}") from None


def register(backend, source: str = "register()") -> list:
    """Register a backend object/class/factory; returns the backend names added."""
    _load_entry_points()
    return _add(_plugins, backend, source)


def _add(table: dict, backend, source: str) -> list:
    names = []
    for b in _materialise(backend, source):
        if b.name in _builtin and table is not _builtin:
            raise PluginError(f"{source}: backend name {b.name} is a built-in; choose another name")
        table[b.name] = b
        names.append(b.name)
    return names


def load_plugin(spec: str) -> list:
    return register(_import_target(spec), source=f"--backend-plugin {spec}")


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    found = sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.value != BUILTIN_TARGET)
    if not any(ep.value == BUILTIN_TARGET for ep in found):  # a source tree on sys.path, not installed
        _add(_builtin, _import_target(BUILTIN_TARGET, "built-in backends"), f"built-in backends ({BUILTIN_TARGET})")
    for ep in found:
        source = f"entry point {ep.name} ({ep.value})"
        try:
            target = ep.load()
        except Exception as e:
            raise PluginError(f"{source}: cannot be loaded ({_one_line(e)})") from None
        _add(_builtin if ep.value == BUILTIN_TARGET else _plugins, target, source)


def reload_entry_points() -> None:
    """Forget what was discovered and look again (tests install entry points at run time)."""
    global _entry_points_loaded
    _entry_points_loaded = False
    _builtin.clear()
    _load_entry_points()


def builtin_names() -> list:
    _load_entry_points()
    return list(_builtin)


def names() -> list:
    _load_entry_points()
    return list(_builtin) + sorted(_plugins)


def get_backend(name: str):
    _load_entry_points()
    for table in (_plugins, _builtin):
        if name in table:
            return table[name]
    upper = name.upper() if isinstance(name, str) else name
    if upper != name and (upper in _builtin or upper in _plugins):
        return get_backend(upper)
    close = difflib.get_close_matches(str(name).upper(), names(), n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise UnknownBackendError(f"unknown backend {name!r}{hint} Valid backends: {', '.join(names())}")


def check_name(name: str) -> None:
    """Raise UnknownBackendError (closest name, valid names) unless ``name`` is registered."""
    try:
        get_backend(name)
    except PluginError:
        pass  # registered but broken: reported per case as an error


def kind_of(name: str):
    """The backend's attention kind, or None when it cannot be loaded (its cases then report
    the load error instead of vanishing)."""
    try:
        return get_backend(name).kind
    except (UnknownBackendError, PluginError):
        return None
