"""Load AMD AITER's kernels wherever they can run.

* ROCm: ``import aiter`` normally (its CK/ASM/HIP ops need the real package initialisation);
  no patch is applied.
* CUDA (compiled Triton) and the CPU Triton interpreter (``TRITON_INTERPRET=1``): AITER's
  ``aiter/__init__.py`` needs ``hipconfig`` / a ROCm install and would fail, so ``aiter`` is
  registered as a bare package whose ``__path__`` is the installed one, and only the Triton
  modules (``aiter.ops.triton.*``) are imported. A few small, named patches make those
  modules importable and runnable (research/aiter-kernels.md sections 2 and 8).

Every patch has a name, a one-line reason, and an environment switch
``ATTNCHECK_AITER_PATCH_<NAME>=0`` that turns it off (``tests/aiter/test_loader.py`` shows,
for each one, what breaks without it). The loading is process-wide and happens once: the
first ``load()`` decides the mode from ``TRITON_INTERPRET`` and the visible GPU.

Deliberately NOT patched: the rank-0 ``x[:, None]`` indexing that Triton >= 3.9 rejects in
``pa_decode``'s MHA (no-dot) kernels. This project runs ``pa_decode`` only for grouped
heads (its dot kernels); ungrouped MHA decodes go through ``unified_attention`` (see
impl/backends/rocm_aiter_fa.py), so the patch would be dead code. Interpreter arithmetic defects (bf16, fp32->fp8 casts) are handled only by
``impl.triton.compat.install()``, which ``load()`` calls in interpreter mode.
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

from packaging.version import Version

MIN_AITER_VERSION = "0.1.7"
DIST_NAME = "amd-aiter"
ENV_PREFIX = "ATTNCHECK_AITER_PATCH_"
# Launch options that only AMD's Triton backend understands (HIPOptions fields); CUDA's
# JITFunction raises "KeyError: Keyword argument ... was specified but unrecognised".
AMD_LAUNCH_OPTIONS = ("waves_per_eu", "matrix_instr_nonkdim", "kpack")


class AiterUnavailable(ImportError):
    """amd-aiter is missing, too old, or cannot run on this machine; the message says why."""


# ---- version ----------------------------------------------------------------------------------

def _installed_version() -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(DIST_NAME)
    except metadata.PackageNotFoundError:
        return None


def _release(text: str) -> tuple:
    """(major, minor, micro) of a PEP 440 version: "0.1.7.post2.dev18" counts as 0.1.7."""
    return (tuple(Version(text).release) + (0, 0, 0))[:3]


def aiter_version(lookup: Callable[[], Optional[str]] = None) -> str:
    """The installed amd-aiter version; ``AiterUnavailable`` if it is missing or too old."""
    lookup = lookup or _installed_version
    ver = lookup()
    if ver is None:
        raise AiterUnavailable(
            f"{DIST_NAME} is not installed: the AITER backends need {DIST_NAME}>={MIN_AITER_VERSION} "
            f"(pip install '{DIST_NAME}>={MIN_AITER_VERSION}')")
    if _release(ver) < _release(MIN_AITER_VERSION):
        raise AiterUnavailable(
            f"{DIST_NAME} {ver} is too old: the AITER backends need >= {MIN_AITER_VERSION} "
            f"(the unified_attention sinks argument and the Triton mha varlen API)")
    return ver


# ---- where are we -----------------------------------------------------------------------------

def _mode() -> str:
    """'interpreter', 'rocm' or 'cuda' (where AITER's kernels will run in this process)."""
    from impl import platform

    target = platform.kernel_target()
    if target != "none":
        return target
    raise AiterUnavailable(
        "AITER's Triton kernels need a GPU or the Triton interpreter: set TRITON_INTERPRET=1 "
        "to run them on the CPU")


def device_arch(mode: str) -> str:
    """Arch string of the device the kernels run on: 'sm_90' on CUDA; under the interpreter
    ATTNCHECK_ARCH if set (to ask "what would gfx942 do"), else 'cpu'."""
    if mode == "cuda":
        import torch

        major, minor = torch.cuda.get_device_capability()
        return f"sm_{major}{minor}"
    if mode == "rocm":
        import torch

        return torch.cuda.get_device_properties(0).gcnArchName.split(":")[0]
    from impl import platform

    env = os.environ.get(platform.ARCH_ENV_VAR)
    return platform.normalize_arch(env, platform.ARCH_ENV_VAR) if env else "cpu"


def device_num_sms(mode: str) -> int:
    """Compute units of the real device (CPU cores under the interpreter)."""
    if mode in ("cuda", "rocm"):
        import torch

        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count)
    return max(1, os.cpu_count() or 1)


def fp8_e4m3_for_arch(arch: str):
    """fnuz only on gfx942 (MI300); OCP e4m3fn on gfx950, NVIDIA and the CPU."""
    import torch

    return torch.float8_e4m3fnuz if arch.startswith("gfx94") else torch.float8_e4m3fn


def fp8_e5m2_for_arch(arch: str):
    import torch

    return torch.float8_e5m2fnuz if arch.startswith("gfx94") else torch.float8_e5m2


# ---- patches ----------------------------------------------------------------------------------

@dataclass
class Patch:
    name: str
    why: str
    modes: tuple  # modes in which the patch is needed
    apply: Callable[["Loaded"], None]

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    def enabled(self) -> bool:
        return os.environ.get(self.env, "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass
class Loaded:
    mode: str
    version: str
    arch: str
    num_sms: int
    applied: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (name, reason)

    def describe(self) -> str:
        s = f"amd-aiter {self.version} ({self.mode}, arch {self.arch}, {self.num_sms} CUs)"
        if self.applied:
            s += "; patches: " + ", ".join(self.applied)
        if self.skipped:
            s += "; not applied: " + ", ".join(f"{n} ({why})" for n, why in self.skipped)
        return s


def _package_dir() -> str:
    spec = importlib.util.find_spec("aiter") if "aiter" not in sys.modules else None
    if spec is None or not spec.submodule_search_locations:
        mod = sys.modules.get("aiter")
        if mod is not None and getattr(mod, "__path__", None):
            return list(mod.__path__)[0]
        raise AiterUnavailable(f"{DIST_NAME}: the 'aiter' package cannot be found on sys.path")
    return list(spec.submodule_search_locations)[0]


def _patch_stub_package(state: Loaded) -> None:
    pkgdir = _package_dir()
    if isinstance(sys.modules.get("aiter"), types.ModuleType) and getattr(sys.modules["aiter"], "__attncheck_stub__", False):
        return
    stub = types.ModuleType("aiter")
    stub.__path__ = [pkgdir]
    stub.__file__ = os.path.join(pkgdir, "__init__.py")
    stub.__spec__ = importlib.machinery.ModuleSpec("aiter", None, origin=stub.__file__, is_package=True)
    stub.__spec__.submodule_search_locations = [pkgdir]
    stub.__attncheck_stub__ = True
    stub.__version__ = state.version
    sys.modules["aiter"] = stub


def _patch_arch_answers(state: Loaded) -> None:
    arch_info = importlib.import_module("aiter.ops.triton.utils._triton.arch_info")
    device_info = importlib.import_module("aiter.ops.triton.utils.device_info")
    arch, sms = state.arch, state.num_sms

    def get_device():
        if arch in arch_info._ARCH_TO_DEVICE:
            return arch_info._ARCH_TO_DEVICE[arch]
        raise KeyError(f"AITER's tuned-config JSON files are keyed by gfx arch; arch {arch!r} has "
                       f"none, so pass config= explicitly")

    def is_fp8_avail():
        if state.mode == "cuda":
            import torch

            return torch.cuda.get_device_capability() >= (8, 9)
        return True  # the interpreter runs both fp8 flavours

    arch_info.get_arch = lambda: arch
    arch_info.get_device = get_device
    arch_info.is_fp8_avail = is_fp8_avail
    arch_info.get_num_sms = lambda: sms  # missing in 0.1.7 although lean_atten calls it
    device_info.get_num_sms = lambda: sms


def _patch_fp8_dtypes(state: Loaded) -> None:
    t = importlib.import_module("aiter.ops.triton.utils.types")
    e4m3, e5m2 = fp8_e4m3_for_arch(state.arch), fp8_e5m2_for_arch(state.arch)
    t.e4m3_dtype, t.e5m2_dtype = e4m3, e5m2
    t.get_fp8_dtypes = lambda: (e5m2, e4m3)
    t.get_fp8_e4m3_dtype = lambda: e4m3
    for key in ("float8_e4m3fn", "e4m3fnuz", "fp8e4m3"):
        t.str_to_torch_dtype[key] = e4m3
    for key in ("float8_e5m2", "e5m2fnuz", "fp8e5m2"):
        t.str_to_torch_dtype[key] = e5m2


def _is_aiter_fn(fn) -> bool:
    mod = getattr(fn, "module", None) or getattr(getattr(fn, "fn", None), "__module__", None) or ""
    return str(mod).startswith("aiter.")


def _patch_autotune_keys(state: Loaded) -> None:
    from triton.runtime import autotuner

    if getattr(autotuner.Autotuner.__init__, "__attncheck_wrapped__", False):
        return
    orig = autotuner.Autotuner.__init__

    @functools.wraps(orig)
    def __init__(self, fn, arg_names, configs, key, *args, **kwargs):
        if _is_aiter_fn(fn) and key:
            key = [k for k in key if k in arg_names]
        orig(self, fn, arg_names, configs, key, *args, **kwargs)

    __init__.__attncheck_wrapped__ = True
    autotuner.Autotuner.__init__ = __init__


def strip_amd_options(kwargs: dict) -> dict:
    """The launch kwargs without AMD-only options (pure; the JITFunction.run wrapper uses it)."""
    return {k: v for k, v in kwargs.items() if k not in AMD_LAUNCH_OPTIONS}


def _patch_strip_amd_launch_options(state: Loaded) -> None:
    from triton.runtime.jit import JITFunction

    if getattr(JITFunction.run, "__attncheck_wrapped__", False):
        return
    orig = JITFunction.run

    @functools.wraps(orig)
    def run(self, *args, grid, warmup, **kwargs):
        if _is_aiter_fn(self):
            kwargs = strip_amd_options(kwargs)
        return orig(self, *args, grid=grid, warmup=warmup, **kwargs)

    run.__attncheck_wrapped__ = True
    JITFunction.run = run


def _patch_fa_amd_utils(state: Loaded) -> None:
    """Pre-register ``flash_attn_triton_amd``, patch its utils, then run its real __init__."""
    pkg_name = "aiter.ops.triton._triton_kernels.flash_attn_triton_amd"
    if pkg_name in sys.modules:
        return
    importlib.import_module("aiter.ops.triton._triton_kernels")
    spec = importlib.util.find_spec(pkg_name)
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[pkg_name] = pkg
    try:
        utils = importlib.import_module(pkg_name + ".utils")
        arch, sms = state.arch, state.num_sms
        utils.get_arch = lambda: arch
        utils.get_cu_count = lambda: sms
        utils.is_hip = lambda: False
        utils.is_cdna = lambda: False
        utils.is_rdna = lambda: False
        spec.loader.exec_module(pkg)
    except BaseException:
        sys.modules.pop(pkg_name, None)
        raise


def _triton_at_least(major: int, minor: int) -> bool:
    import triton

    return _release(triton.__version__)[:2] >= (major, minor)


PATCHES: Dict[str, Patch] = {p.name: p for p in (
    Patch("stub_package", "aiter/__init__.py needs hipconfig/ROCm and JIT-builds CK ops; only "
          "aiter.ops.triton is wanted", ("cuda", "interpreter"), _patch_stub_package),
    Patch("arch_answers", "arch_info.get_arch asks triton's active driver (none on the CPU; an "
          "int on CUDA, which types.py's `in (\"gfx950\")` turns into a TypeError) and "
          "device_info.get_num_sms calls torch.cuda", ("cuda", "interpreter"), _patch_arch_answers),
    Patch("fp8_dtypes", "utils/types.py picks fnuz fp8 unless the arch is gfx950; only gfx942 "
          "uses fnuz, NVIDIA and the CPU use OCP e4m3fn", ("cuda", "interpreter"), _patch_fp8_dtypes),
    Patch("autotune_keys", "Triton >= 3.9 rejects autotune keys that are not kernel arguments "
          "(flash_attn_triton_amd/bwd.py), so importing aiter.ops.triton.mha fails",
          ("cuda", "interpreter"), _patch_autotune_keys),
    Patch("fa_amd_utils", "flash_attn_triton_amd builds autotune configs at import from "
          "utils.get_arch/get_cu_count, which ask the active driver and torch.cuda",
          ("cuda", "interpreter"), _patch_fa_amd_utils),
    Patch("strip_amd_launch_options", "AITER's configs pass waves_per_eu/matrix_instr_nonkdim/"
          "kpack, which CUDA Triton rejects with KeyError", ("cuda",), _patch_strip_amd_launch_options),
)}

_STATE: Optional[Loaded] = None


def load() -> Loaded:
    """Make ``aiter.ops.triton`` importable here (idempotent); returns what was done."""
    global _STATE
    if _STATE is not None:
        return _STATE
    version = aiter_version()
    mode = _mode()
    if mode == "rocm":
        importlib.import_module("aiter")
        _STATE = Loaded(mode, version, device_arch(mode), device_num_sms(mode))
        return _STATE
    state = Loaded(mode, version, device_arch(mode), device_num_sms(mode))
    if mode == "interpreter":
        from impl.triton import compat

        compat.install()
    for p in PATCHES.values():
        if mode not in p.modes:
            continue
        if p.name == "autotune_keys" and not _triton_at_least(3, 9):
            state.skipped.append((p.name, "Triton < 3.9 does not check autotune keys"))
            continue
        if not p.enabled():
            state.skipped.append((p.name, f"switched off by {p.env}=0"))
            continue
        p.apply(state)
        state.applied.append(p.name)
    _STATE = state
    return state


def triton_module(name: str):
    """``aiter.ops.triton.<name>`` (e.g. 'unified_attention', 'mha') after ``load()``."""
    load()
    return importlib.import_module(f"aiter.ops.triton.{name}")


def rocm_aiter():
    """The real ``aiter`` package; only on ROCm."""
    state = load()
    if state.mode != "rocm":
        raise AiterUnavailable(f"aiter's CK/ASM/HIP entry points need ROCm; this process runs "
                               f"AITER in {state.mode} mode")
    return importlib.import_module("aiter")
