"""Import a few of vLLM's Python modules from a folder of its sources, with everything else
answered by stubs.

vLLM's ROCm selector (``vllm/platforms/rocm.py`` and what it calls) is plain Python, but the
package around it needs a GPU, compiled extensions (``vllm._C``), and dozens of third-party
packages. A ``Sandbox`` loads only the modules named as *real* from the sources; every other
``vllm.*`` module, and the third-party modules named as *stubbed*, become permissive stubs
(any attribute exists, any call returns a stub, a decorator returns what it decorates, a stub
can be a base class). What the selector asks the machine (the GPU arch via ``amdsmi`` or
``torch.cuda``, whether ``aiter`` is installed, the current vLLM config) is answered by
modules the test passes in ``answers``.

The sandbox owns its modules: entering it swaps them into ``sys.modules`` (hiding an installed
vLLM, if any), leaving it puts back what was there. Functions of the loaded modules import
lazily, so call them only inside ``with sandbox:``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path
from typing import Iterable, Mapping, Optional


class Stub:
    """Anything: an attribute, a call result, a decorator, a base class, a type annotation."""

    def __init__(self, name: str = "stub"):
        object.__setattr__(self, "_name", name)

    def __repr__(self):
        return f"<stub {self._name}>"

    def __getattr__(self, attr):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return Stub(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        # A bare decorator (@stub) returns what it decorates, so decorated real code survives.
        if len(args) == 1 and not kwargs and _decoratable(args[0]):
            return args[0]
        return Stub(f"{self._name}()")

    def __mro_entries__(self, bases):
        return (type(self._name.rsplit(".", 1)[-1], (), {}),)

    def __getitem__(self, item):
        return Stub(f"{self._name}[]")

    def __iter__(self):
        return iter(())

    def __or__(self, other):
        return self

    __ror__ = __or__

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _decoratable(obj) -> bool:
    return isinstance(obj, (types.FunctionType, type, classmethod, staticmethod, property))


class Lazy:
    """An attribute of an answered module computed on first access (inside the sandbox)."""

    def __init__(self, make):
        self.make = make


class StubModule(types.ModuleType):
    """A module whose missing attributes are stubs, or its real submodules when there are."""

    def __init__(self, name: str, sandbox: "Sandbox", path: Optional[list] = None,
                 overrides: Optional[Mapping] = None):
        super().__init__(name)
        self.__path__ = path or []
        self.__dict__["_sandbox"] = sandbox
        for key, value in (overrides or {}).items():
            # a Lazy attribute stays out of __dict__ until first use, so __getattr__ sees it
            self.__dict__[key + "__lazy" if isinstance(value, Lazy) else key] = value

    def __getattr__(self, attr):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        lazy = self.__dict__.get(attr + "__lazy")
        if lazy is not None:
            value = lazy.make()
            setattr(self, attr, value)
            return value
        full = f"{self.__name__}.{attr}"
        if self.__dict__["_sandbox"].is_real_or_package(full):
            return importlib.import_module(full)
        return Stub(full)


class _Loader(importlib.abc.Loader):
    def __init__(self, make):
        self._make = make

    def create_module(self, spec):
        return self._make()

    def exec_module(self, module):
        pass


class Sandbox(importlib.abc.MetaPathFinder):
    """Loads ``real`` vLLM modules from ``root`` (the folder that holds ``vllm/``).

    ``stubbed``: top-level third-party names that become stub modules; ``answers``: module
    name -> module object (or dict of attributes for a stub module) given by the test.
    """

    def __init__(self, root: Path, real: Iterable[str], stubbed: Iterable[str] = (),
                 answers: Optional[Mapping[str, object]] = None, package: str = "vllm"):
        self.root = Path(root)
        self.real = frozenset(real)
        self.stubbed = frozenset(stubbed)
        self.answers = dict(answers or {})
        self.package = package
        self.packages = {m.rsplit(".", i)[0] for m in self.real
                         for i in range(1, m.count(".") + 1)}
        self._modules: dict = {}  # what this sandbox loaded (kept across with-blocks)
        self._saved: Optional[dict] = None
        self.patches: list = []  # (object, attribute, value) applied while active

    # -- what a name is --------------------------------------------------------------------
    def _ours(self, name: str) -> bool:
        top = name.split(".", 1)[0]
        return (top == self.package or top in self.stubbed or name in self.answers
                or top in self.answers)

    def is_real_or_package(self, name: str) -> bool:
        return name in self.real or name in self.packages

    def _file(self, name: str) -> tuple:
        base = self.root.joinpath(*name.split("."))
        if (base / "__init__.py").is_file():
            return base / "__init__.py", [str(base)]
        return base.with_suffix(".py"), None

    # -- the finder ------------------------------------------------------------------------
    def find_spec(self, name, path=None, target=None):
        if not self._ours(name):
            return None
        if name in self.answers:
            answer = self.answers[name]
            if isinstance(answer, types.ModuleType):
                make = lambda: answer  # noqa: E731
            else:
                make = lambda: StubModule(name, self, overrides=answer)  # noqa: E731
            return importlib.machinery.ModuleSpec(name, _Loader(make), is_package=True)
        if name in self.real:
            file, search = self._file(name)
            if not file.is_file():
                raise ImportError(f"{name}: {file} is missing from the vLLM sources")
            return importlib.util.spec_from_file_location(
                name, file, submodule_search_locations=search)
        folder = self.root.joinpath(*name.split("."))
        path_list = [str(folder)] if name in self.packages else []
        return importlib.machinery.ModuleSpec(
            name, _Loader(lambda: StubModule(name, self, path_list)), is_package=True)

    # -- activation ------------------------------------------------------------------------
    def __enter__(self):
        if self._saved is not None:
            raise RuntimeError("sandbox is already active")
        self._saved = {k: v for k, v in sys.modules.items() if self._ours(k)}
        for k in self._saved:
            del sys.modules[k]
        sys.modules.update(self._modules)
        sys.meta_path.insert(0, self)
        self._undo = []
        for obj, attr, value in self.patches:
            self._undo.append((obj, attr, getattr(obj, attr)))
            setattr(obj, attr, value)
        importlib.invalidate_caches()
        return self

    def __exit__(self, *exc):
        for obj, attr, value in reversed(self._undo):
            setattr(obj, attr, value)
        sys.meta_path.remove(self)
        mine = {k: v for k, v in sys.modules.items() if self._ours(k)}
        self._modules = mine
        for k in mine:
            del sys.modules[k]
        sys.modules.update(self._saved)
        self._saved = None
        return False

    def module(self, name: str):
        """Import ``name`` inside the sandbox (call while active)."""
        return importlib.import_module(name)
