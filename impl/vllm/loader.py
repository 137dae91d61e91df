"""Load vLLM's own Triton attention kernels without ``import vllm``.

Where the code comes from (``find_source``): the folder named by ``ATTNCHECK_VLLM_SRC`` (a
folder holding ``vllm/``, e.g. written by ``python -m impl.vllm.extract``: about 50 .py files,
so a GPU machine without network gets them as a small folder), else the installed ``vllm``
distribution (``pip install --no-deps vllm==0.33.0``: its dependencies are not needed). vLLM's
code is only loaded, never copied into this repository.

How: ``vllm`` is registered as a bare package (its ``__init__`` is never run) and only the
modules under ``vllm/v1/attention/ops/`` with their few imports are executed. What stands in
the way of that on a machine without vLLM's compiled parts and dependencies is fixed by small,
named patches (``PATCHES``). Every patch has a one-line reason and a switch,
``ATTNCHECK_VLLM_PATCH_<NAME>=0``; ``Loaded.describe()`` says which were applied and why any
was not; ``tests/vllm/test_loader.py`` shows, for each, what breaks without it.

The platform: vLLM's kernels ask ``vllm.platforms.current_platform`` (several kernel modules
compute launch constants from it at import). Here it is an object that answers from an arch
string: ``sm_90`` etc. on CUDA, the gfx arch on ROCm, and under the Triton interpreter
(``TRITON_INTERPRET=1``) ``ATTNCHECK_ARCH`` if set (to ask "what would vLLM do on gfx942"),
else ``INTERPRETER_ARCH`` (the GPU this project verifies on). The fp8 KV flavour follows it:
e4m3fnuz on gfx94x, e4m3fn everywhere else (vLLM's rule).

The loading is process-wide and happens once; the first ``load()`` decides mode and arch.
Interpreter arithmetic defects (bf16, fp32 -> fp8 casts) are handled only by
``impl.triton.compat.install()``, which ``load()`` calls in interpreter mode.

Versions: ``TESTED_VERSIONS`` are those whose kernels this project has run. Another version is
loaded anyway, with a note (``Loaded.version_note``): kernel signatures and patch points move
between vLLM releases, so a patch whose target is gone is reported as not applied, and a
kernel whose signature changed fails where it is called, with vLLM's own error.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import logging
import os
import re
import sys
import types
from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional

TESTED_VERSIONS = ("0.33.0",)
DIST_NAME = "vllm"
SRC_ENV = "ATTNCHECK_VLLM_SRC"
ENV_PREFIX = "ATTNCHECK_VLLM_PATCH_"
INTERPRETER_ARCH = "sm_90"  # the H100/H200 class this project verifies on
OPS = "vllm.v1.attention.ops"
# vLLM's Triton attention kernels this project runs (modules under vllm/v1/attention/ops/)
KERNEL_MODULES = ("triton_reshape_and_cache_flash", "triton_unified_attention", "prefix_prefill",
                  "chunked_prefill_paged_decode", "triton_decode_attention", "triton_merge_attn_states")
# compiled extensions vLLM's platform modules try to import (built for vLLM's own torch)
COMPILED_EXTENSIONS = ("vllm._C", "vllm._C_stable_libtorch", "vllm._rocm_C", "vllm._moe_C",
                       "vllm.cumem_allocator")
INSTALL_HINT = (f"pip install --no-deps vllm=={TESTED_VERSIONS[-1]}, or set {SRC_ENV} to a folder "
                f"written by 'python -m impl.vllm.extract'")


class VllmUnavailable(ImportError):
    """vLLM's kernels cannot be loaded here; the message says why (one line)."""


# ---- where vLLM's code comes from ---------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    package_dir: str  # the vllm package folder (holding v1/attention/ops/)
    version: str
    origin: str  # "installed" or "ATTNCHECK_VLLM_SRC=<path>"


_VERSION_RE = re.compile(r"""__version__\s*=\s*(?:version\s*=\s*)?['"]([^'"]+)['"]""")


def _version_from_folder(package_dir: str) -> Optional[str]:
    """The version written in vllm/_version.py (read as text, never executed)."""
    for name in ("_version.py", "version.py"):
        path = os.path.join(package_dir, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                m = _VERSION_RE.search(f.read())
            if m:
                return m.group(1)
    return None


def _installed_version() -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(DIST_NAME)
    except metadata.PackageNotFoundError:
        return None


def find_source(env: Optional[Mapping[str, str]] = None,
                installed_version: Callable[[], Optional[str]] = _installed_version) -> Source:
    """Where vLLM's code is: ``ATTNCHECK_VLLM_SRC`` first, else the installed distribution.

    Raises ``VllmUnavailable`` (one line naming the variable or the package) when neither
    holds vLLM's kernels.
    """
    env = os.environ if env is None else env
    src = env.get(SRC_ENV, "").strip()
    if src:
        root = os.path.abspath(src)
        if not os.path.isdir(root):
            raise VllmUnavailable(f"{SRC_ENV}={src}: no such folder (expected a folder holding vllm/, "
                                  f"as written by 'python -m impl.vllm.extract')")
        pkg = os.path.join(root, "vllm")
        if not os.path.isdir(os.path.join(pkg, "v1", "attention", "ops")):
            raise VllmUnavailable(f"{SRC_ENV}={src}: expected a folder holding vllm/v1/attention/ops/ "
                                  f"(as written by 'python -m impl.vllm.extract')")
        return Source(pkg, _version_from_folder(pkg) or "unknown", f"{SRC_ENV}={src}")
    version = installed_version()
    spec = importlib.util.find_spec(DIST_NAME) if version else None
    if version is None or spec is None or not spec.submodule_search_locations:
        raise VllmUnavailable(f"vLLM is not installed: {INSTALL_HINT}")
    return Source(list(spec.submodule_search_locations)[0], version, "installed")


def version_note(version: str) -> Optional[str]:
    """None for a tested version; else one line saying what may go wrong (never an error)."""
    if version in TESTED_VERSIONS:
        return None
    return (f"vllm {version} is not a version attncheck was tested with ({', '.join(TESTED_VERSIONS)}): "
            f"kernel signatures and patch points move between releases, so a patch may not apply "
            f"and a kernel may fail where it is called")


# ---- where we run ---------------------------------------------------------------------------------

def _mode() -> str:
    """'interpreter', 'rocm' or 'cuda': where vLLM's Triton kernels will run in this process."""
    from impl import platform

    if platform.is_interpreter():
        return "interpreter"
    if platform.is_rocm():
        return "rocm"
    if platform.is_cuda():
        return "cuda"
    raise VllmUnavailable("vLLM's Triton kernels need a GPU or the Triton interpreter: set "
                          "TRITON_INTERPRET=1 to run them on the CPU")


def device_arch(mode: str) -> str:
    """'sm_90'-style on CUDA, the gfx arch on ROCm; under the interpreter ATTNCHECK_ARCH if set,
    else INTERPRETER_ARCH."""
    if mode == "cuda":
        import torch

        major, minor = torch.cuda.get_device_capability()
        return f"sm_{major}{minor}"
    if mode == "rocm":
        import torch

        return torch.cuda.get_device_properties(0).gcnArchName.split(":")[0]
    from impl import platform

    env = os.environ.get(platform.ARCH_ENV_VAR)
    return platform.normalize_arch(env, platform.ARCH_ENV_VAR) if env else INTERPRETER_ARCH


def device_num_sms(mode: str) -> int:
    """Compute units of the real device (CPU cores under the interpreter)."""
    if mode in ("cuda", "rocm"):
        import torch

        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count)
    return max(1, os.cpu_count() or 1)


def capability_of(arch: str) -> tuple:
    """(major, minor) of an arch string: sm_90 -> (9, 0); gfx942 -> (9, 4), gfx90a -> (9, 0),
    gfx1100 -> (11, 0) (how HIP derives it, as vLLM's ROCm platform does)."""
    m = re.fullmatch(r"sm_(\d+)(\d)", arch)
    if m:
        return int(m.group(1)), int(m.group(2))
    m = re.match(r"gfx(\d+)", arch)
    if not m or len(m.group(1)) < 2:
        raise VllmUnavailable(f"arch {arch!r}: expected 'sm_<major><minor>' or a gfx arch such as 'gfx942'")
    d = m.group(1)
    return (int(d[:2]), int(d[2])) if len(d) >= 4 else (int(d[0]), int(d[1]))


def is_rocm_arch(arch: str) -> bool:
    return arch.startswith("gfx")


def fp8_dtype_for_arch(arch: str):
    """vLLM's rule: e4m3fnuz on gfx94x (MI300), OCP e4m3fn everywhere else."""
    import torch

    return torch.float8_e4m3fnuz if "gfx94" in arch else torch.float8_e4m3fn


# ---- state ----------------------------------------------------------------------------------------

@dataclass
class Loaded:
    source: Source
    mode: str
    arch: str
    num_sms: int
    applied: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (name, reason)

    @property
    def version(self) -> str:
        return self.source.version

    @property
    def provider(self) -> str:
        """The provider string verdicts carry, e.g. 'vllm==0.33.0'."""
        return f"{DIST_NAME}=={self.version}"

    @property
    def version_note(self) -> Optional[str]:
        return version_note(self.version)

    @property
    def fp8_dtype(self):
        return fp8_dtype_for_arch(self.arch)

    def describe(self) -> str:
        answering = f"answering as {self.arch}" if self.mode == "interpreter" else f"arch {self.arch}"
        s = f"vllm {self.version} ({self.source.origin}; {self.mode}, {answering}, {self.num_sms} CUs)"
        if self.applied:
            s += "; patches: " + ", ".join(self.applied)
        if self.skipped:
            s += "; not applied: " + ", ".join(f"{n} ({why})" for n, why in self.skipped)
        if self.version_note:
            s += "; NOTE: " + self.version_note
        return s


@dataclass
class Patch:
    name: str
    why: str
    apply: Callable[[Loaded], None]
    # None when the patch is needed here; else why it is not (the state decides)
    not_needed: Callable[[Loaded], Optional[str]] = lambda state: None

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    def enabled(self) -> bool:
        return os.environ.get(self.env, "1").strip().lower() not in ("0", "false", "no", "off")


# ---- patch helpers ----------------------------------------------------------------------------------

def _bare_package(name: str, path: str) -> types.ModuleType:
    """Register ``name`` as a package whose submodules load from ``path``, without its __init__."""
    mod = sys.modules.get(name)
    if mod is not None:
        return mod
    mod = types.ModuleType(name)
    mod.__path__ = [path]
    mod.__file__ = os.path.join(path, "__init__.py")
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, origin=mod.__file__, is_package=True)
    mod.__spec__.submodule_search_locations = [path]
    mod.__attncheck_stub__ = True
    sys.modules[name] = mod
    parent, _, child = name.rpartition(".")
    if parent and parent in sys.modules:
        setattr(sys.modules[parent], child, mod)
    return mod


def _stub_module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__attncheck_stub__ = True
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    parent, _, child = name.rpartition(".")
    if parent in sys.modules:
        setattr(sys.modules[parent], child, mod)
    return mod


def _exec_package_after(name: str, before: Callable[[], None]) -> None:
    """Create package ``name`` from its spec, run ``before`` (which may import its submodules),
    then run the package's own ``__init__``."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[name] = pkg
    try:
        before()
        spec.loader.exec_module(pkg)
    except BaseException:
        sys.modules.pop(name, None)
        raise


def _sub(state: Loaded, *parts: str) -> str:
    return os.path.join(state.source.package_dir, *parts)


# ---- the patches ------------------------------------------------------------------------------------

def _patch_stub_package(state: Loaded) -> None:
    pkg = _bare_package(DIST_NAME, state.source.package_dir)
    pkg.__version__ = state.version


def _patch_regex_alias(state: Loaded) -> None:
    sys.modules.setdefault("regex", re)


def regex_installed() -> bool:
    """Whether the third-party regex module is on sys.path (this patch's alias does not count)."""
    if sys.modules.get("regex") not in (None, re):
        return True
    return importlib.machinery.PathFinder.find_spec("regex") is not None


def _regex_installed(state: Loaded) -> Optional[str]:
    return "regex is installed" if regex_installed() else None


def _patch_block_compiled_extensions(state: Loaded) -> None:
    for name in COMPILED_EXTENSIONS:
        sys.modules.setdefault(name, None)  # `import vllm._C` now raises ImportError at once


def _patch_quantization_bare_packages(state: Loaded) -> None:
    for parts in (("model_executor",), ("model_executor", "layers"),
                  ("model_executor", "layers", "quantization"),
                  ("model_executor", "layers", "quantization", "utils")):
        _bare_package("vllm." + ".".join(parts), _sub(state, *parts))


def _patch_parallel_state_stub(state: Loaded) -> None:
    def no_group(*args, **kwargs):
        raise RuntimeError("attncheck runs vLLM's kernels without a distributed state")

    _bare_package("vllm.distributed", _sub(state, "distributed"))
    _stub_module("vllm.distributed.parallel_state", get_tp_group=no_group, get_ep_group=no_group,
                 get_pp_group=no_group, is_global_first_rank=lambda: True,
                 is_local_first_rank=lambda: True)


def _patch_kv_cache_dtype_handler(state: Loaded) -> None:
    _bare_package("vllm.config", _sub(state, "config"))
    # upstream kv-cache dtype strings ("auto", "fp8", ...) have no handler: None
    _stub_module("vllm.config.cache", get_kv_cache_dtype_handler=lambda name: None)


def _patch_custom_ops_stub(state: Loaded) -> None:
    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise NotImplementedError(f"vllm._custom_ops.{name} is a compiled vLLM op; attncheck runs "
                                  f"vLLM's Triton kernels only")

    _stub_module("vllm._custom_ops", __getattr__=__getattr__)


def make_platform(arch: str, num_sms: int):
    """An instance of a ``vllm.platforms.interface.Platform`` subclass answering for ``arch``."""
    import torch
    from vllm.platforms.interface import DeviceCapability, Platform, PlatformEnum

    major, minor = capability_of(arch)
    rocm = is_rocm_arch(arch)
    fp8 = fp8_dtype_for_arch(arch)

    class ArchPlatform(Platform):
        _enum = PlatformEnum.ROCM if rocm else PlatformEnum.CUDA
        device_name = "cuda"
        device_type = "cuda"
        dispatch_key = "CUDA"
        arch_name = arch

        @classmethod
        def get_device_capability(cls, device_id: int = 0):
            return DeviceCapability(major=major, minor=minor)

        @classmethod
        def get_device_name(cls, device_id: int = 0) -> str:
            return f"attncheck platform answering as {arch}"

        @classmethod
        def num_compute_units(cls, device_id: int = 0) -> int:
            return num_sms

        @classmethod
        def supports_fp8(cls) -> bool:
            return True

        @classmethod
        def is_fp8_fnuz(cls) -> bool:
            return fp8 is torch.float8_e4m3fnuz

        @classmethod
        def fp8_dtype(cls):
            return fp8

    return ArchPlatform()


def _patch_platform_answers(state: Loaded) -> None:
    platforms = importlib.import_module("vllm.platforms")
    platforms._current_platform = make_platform(state.arch, state.num_sms)


def _patch_force_triton(state: Loaded) -> None:
    def force():
        importing = importlib.import_module("vllm.triton_utils.importing")
        importing.HAS_TRITON = True

    _exec_package_after("vllm.triton_utils", force)


class _GcnArchProps:
    def __init__(self, arch: str):
        self.gcnArchName = arch


def _patch_rocm_arch_at_import(state: Loaded) -> None:
    if "vllm.platforms.rocm" in sys.modules:
        return
    import torch

    original = torch.cuda.get_device_properties
    torch.cuda.get_device_properties = lambda *args, **kwargs: _GcnArchProps(state.arch)
    try:
        importlib.import_module("vllm.platforms.rocm")
    finally:
        torch.cuda.get_device_properties = original


def _patch_no_custom_paged_attention(state: Loaded) -> None:
    rocm = importlib.import_module("vllm.platforms.rocm")
    rocm.use_rocm_custom_paged_attention = lambda *args, **kwargs: False


def _only_gfx(state: Loaded) -> Optional[str]:
    if is_rocm_arch(state.arch):
        return None
    return f"{state.arch} is not a gfx arch: vLLM already answers False"


class _CudaAnswers(types.ModuleType):
    """``torch.cuda`` with get_device_capability answering for the arch (interpreter only)."""

    def __init__(self, cuda, capability):
        super().__init__("torch.cuda")
        self._cuda, self._capability = cuda, capability

    def get_device_capability(self, device=None):
        return self._capability

    def __getattr__(self, name):
        return getattr(self._cuda, name)


class _TorchAnswers(types.ModuleType):
    """``torch`` whose ``cuda`` is ``_CudaAnswers``; everything else is torch's."""

    def __init__(self, torch_mod, capability):
        super().__init__("torch")
        self._torch = torch_mod
        self.cuda = _CudaAnswers(torch_mod.cuda, capability)

    def __getattr__(self, name):
        return getattr(self._torch, name)


def _patch_cuda_capability_answer(state: Loaded) -> None:
    import torch

    mod = importlib.import_module(f"{OPS}.triton_reshape_and_cache_flash")
    if not isinstance(mod.torch, _TorchAnswers):
        mod.torch = _TorchAnswers(torch, capability_of(state.arch))


def _only_interpreter_on_cuda_arch(state: Loaded) -> Optional[str]:
    if state.mode != "interpreter":
        return f"{state.mode}: torch.cuda answers for the real GPU"
    if is_rocm_arch(state.arch):
        return f"{state.arch}: vLLM's ROCm branch does not ask torch.cuda"
    return None


PATCHES: Dict[str, Patch] = {p.name: p for p in (
    Patch("stub_package", "vllm/__init__.py imports vllm.env_override, which sets environment "
          "variables and monkeypatches torch's inductor for the whole process", _patch_stub_package),
    Patch("regex_alias", "vllm.utils.import_utils imports the third-party regex module (not a "
          "dependency here); the stdlib re serves the patterns the kernels' imports need",
          _patch_regex_alias, _regex_installed),
    Patch("block_compiled_extensions", "vllm.platforms.rocm imports vllm._C and friends, binaries "
          "built for vLLM's own torch; only the Triton kernels are wanted", _patch_block_compiled_extensions),
    Patch("quantization_bare_packages", "triton_reshape_and_cache_flash imports quantization.utils."
          "quant_utils; the model_executor/layers/quantization __init__s import the whole model zoo",
          _patch_quantization_bare_packages),
    Patch("parallel_state_stub", "quant_utils imports vllm.distributed.parallel_state (needs zmq, "
          "torch.distributed set-up) and the logger's *_once helpers ask it for ranks",
          _patch_parallel_state_stub),
    Patch("kv_cache_dtype_handler", "is_quantized_kv_cache asks vllm.config.cache for plugin dtype "
          "handlers; vllm.config needs pydantic and the whole config tree", _patch_kv_cache_dtype_handler),
    Patch("custom_ops_stub", "chunked_prefill_paged_decode imports vllm._custom_ops, which loads the "
          "compiled vllm._C (and requests, flashinfer helpers)", _patch_custom_ops_stub),
    Patch("platform_answers", "kernel modules compute launch constants and the fp8 dtype from "
          "current_platform at import; the real CUDA/ROCm platforms import compiled modules and probe "
          "NVML/amdsmi", _patch_platform_answers),
    Patch("force_triton", "vllm.triton_utils swaps in a placeholder triton whose @jit does nothing "
          "when no GPU driver is active (the CPU) or vLLM has no package metadata (a source folder)",
          _patch_force_triton),
    Patch("rocm_arch_at_import", "vllm.platforms.rocm reads the GPU arch at import (amdsmi, then "
          "torch.cuda.get_device_properties) and chunked_prefill_paged_decode imports it on every call",
          _patch_rocm_arch_at_import),
    Patch("no_custom_paged_attention", "on gfx archs chunked_prefill_paged_decode prefers the compiled "
          "HIP paged attention (ops.paged_attention_rocm); its Triton decode kernel is what runs here",
          _patch_no_custom_paged_attention, _only_gfx),
    Patch("cuda_capability_answer", "triton_reshape_and_cache_flash asks torch.cuda.get_device_capability"
          " directly on a CUDA platform; the interpreter has no CUDA device",
          _patch_cuda_capability_answer, _only_interpreter_on_cuda_arch),
)}

_STATE: Optional[Loaded] = None
_ERROR: Optional[VllmUnavailable] = None  # a failure after patching began (not retried)


def _quiet_vllm_logger() -> None:
    """vLLM logs INFO/WARNING lines on import and first calls (missing amdsmi, Triton fallback):
    keep them out of test and CLI output unless VLLM_LOGGING_LEVEL asks for them (vllm.logger
    configures the "vllm" logger from it on import)."""
    importlib.import_module("vllm.logger")
    if not os.environ.get("VLLM_LOGGING_LEVEL"):
        logging.getLogger("vllm").setLevel(logging.ERROR)


def load() -> Loaded:
    """Import vLLM's Triton attention kernels here (idempotent, process-wide); returns what was
    done. Raises ``VllmUnavailable`` with a one-line reason when it cannot: no source or no GPU
    and no interpreter (checked again on the next call), or a failure while loading (final)."""
    global _STATE, _ERROR
    if _STATE is not None:
        return _STATE
    if _ERROR is not None:
        raise _ERROR
    source = find_source()
    mode = _mode()
    try:
        _STATE = _load(source, mode)
    except Exception as e:  # an import or patch point that moved: one line, the cause chained
        first = str(e).splitlines()[0] if str(e) else ""
        note = version_note(source.version)
        _ERROR = VllmUnavailable(f"vllm {source.version} ({source.origin}) could not be loaded: "
                                 f"{type(e).__name__}: {first}" + (f" ({note})" if note else ""))
        raise _ERROR from e
    return _STATE


def _load(source: Source, mode: str) -> Loaded:
    existing = sys.modules.get(DIST_NAME)
    imported_normally = existing is not None and not getattr(existing, "__attncheck_stub__", False)
    state = Loaded(source, mode, device_arch(mode), device_num_sms(mode))
    if mode == "interpreter":
        from impl.triton import compat

        compat.install()
    if imported_normally:  # its own platform and modules are used as they are
        for p in PATCHES.values():
            state.skipped.append((p.name, "vllm was imported normally before attncheck loaded it"))
    else:
        for p in PATCHES.values():
            if p.name == "block_compiled_extensions":
                _quiet_vllm_logger()  # before the platform modules log their failed probes
            if p.name != "cuda_capability_answer":  # it patches a kernel module: after the imports
                _apply(p, state)
    for name in KERNEL_MODULES:
        importlib.import_module(f"{OPS}.{name}")
    if not imported_normally:
        _apply(PATCHES["cuda_capability_answer"], state)
    return state


def _apply(p: Patch, state: Loaded) -> None:
    reason = p.not_needed(state)
    if reason:
        state.skipped.append((p.name, f"not needed: {reason}"))
    elif not p.enabled():
        state.skipped.append((p.name, f"switched off by {p.env}=0"))
    else:
        p.apply(state)
        state.applied.append(p.name)


def kernel_module(name: str):
    """``vllm.v1.attention.ops.<name>`` after ``load()`` (e.g. 'triton_unified_attention')."""
    load()
    return importlib.import_module(f"{OPS}.{name}")


def loaded_files() -> list:
    """Paths (relative to the vllm package folder) of every vLLM source file this process has
    loaded, after ``load()`` and the call-time imports of the kernels."""
    state = load()
    root = os.path.realpath(state.source.package_dir)
    files = set()
    for name, mod in list(sys.modules.items()):
        if not (name == DIST_NAME or name.startswith(DIST_NAME + ".")) or mod is None:
            continue
        path = getattr(mod, "__file__", None)
        if not path or getattr(mod, "__attncheck_stub__", False):
            continue
        path = os.path.realpath(path)
        if path.startswith(root + os.sep) and path.endswith(".py"):
            files.add(os.path.relpath(path, root))
    return sorted(files)
