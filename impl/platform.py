"""Platform facts: which vendor is this machine, which ROCm gfx arch, which fp8 flavour.

The selection policy (``impl/selection.py``) is vLLM's ROCm policy and needs a gfx arch. On a
ROCm machine the arch comes from torch (``torch.version.hip`` says ROCm, the device's
``gcnArchName`` says which GPU); anywhere else, or to ask "what would gfx950 do", the arch is
overridden by an argument or the ``ATTNCHECK_ARCH`` environment variable.

torch is imported lazily (inside ``detect_platform``) so that the pure selection policy and
its tests never need it.

Arch predicates follow vLLM (research/vllm-backends.md section 1.3): gfx9 = gfx90a, gfx942,
gfx950 (what AITER supported in late 2025); MI3xx = gfx942, gfx950; RDNA = gfx11xx / gfx12xx.
fp8 flavour: ``"gfx94"`` in the arch -> ``float8_e4m3fnuz`` (max 240), every other GPU
(gfx950, RDNA, NVIDIA) -> ``float8_e4m3fn`` (max 448).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

# The archs this project models (DESIGN.md / the seeds); order = how they are listed to users.
GFX9_ARCHS = ("gfx90a", "gfx942", "gfx950")
RDNA_ARCHS = ("gfx1100", "gfx1101", "gfx1200", "gfx1201")
ROCM_ARCHS = GFX9_ARCHS + RDNA_ARCHS
MI3XX_ARCHS = ("gfx942", "gfx950")

DEFAULT_POLICY_ARCH = "gfx942"  # MI300X: the machine the seed documents were written for
ARCH_ENV_VAR = "ATTNCHECK_ARCH"

FP8_E4M3FN = "fp8_e4m3fn"
FP8_E4M3FNUZ = "fp8_e4m3fnuz"


class PlatformError(ValueError):
    """A platform override (arch name) that is not one this project knows."""


def normalize_arch(name: object, source: str = "arch") -> str:
    """Validate a gfx arch name and return it in canonical form.

    Accepts torch's ``gcnArchName`` form with feature suffixes ("gfx942:sramecc+:xnack-") and
    any letter case. ``source`` names where the value came from, for the error message.
    """
    if not isinstance(name, str):
        raise PlatformError(f"{source}: expected a gfx arch name such as 'gfx942', got {name!r}")
    base = name.strip().split(":", 1)[0].lower()
    if not base:
        raise PlatformError(
            f"{source}: empty arch name; expected one of {', '.join(ROCM_ARCHS)}")
    if base not in ROCM_ARCHS:
        raise PlatformError(
            f"{source}: unknown ROCm arch {name!r}; expected one of {', '.join(ROCM_ARCHS)} "
            f"(gfx9: {', '.join(GFX9_ARCHS)}; RDNA: {', '.join(RDNA_ARCHS)})")
    return base


def is_gfx9(arch: str) -> bool:
    return normalize_arch(arch) in GFX9_ARCHS


def is_mi3xx(arch: str) -> bool:
    return normalize_arch(arch) in MI3XX_ARCHS


def is_rdna(arch: str) -> bool:
    return normalize_arch(arch) in RDNA_ARCHS


def fp8_flavour(arch: Optional[str] = None, vendor: str = "amd") -> str:
    """The e4m3 fp8 format a platform uses: "fp8_e4m3fnuz" on gfx94x, else "fp8_e4m3fn".

    ``arch=None`` with vendor "nvidia" (or "cpu") gives the OCP format e4m3fn.
    """
    if vendor not in ("amd", "nvidia", "cpu"):
        raise PlatformError(f"vendor: expected 'amd', 'nvidia' or 'cpu', got {vendor!r}")
    if vendor != "amd" or arch is None:
        if vendor == "amd":
            raise PlatformError("arch: an AMD platform needs a gfx arch to pick its fp8 flavour")
        return FP8_E4M3FN
    return FP8_E4M3FNUZ if "gfx94" in normalize_arch(arch) else FP8_E4M3FN


def torch_fp8_dtype(flavour: str):
    """The torch dtype of an fp8 flavour name (imports torch)."""
    import torch

    table = {FP8_E4M3FN: torch.float8_e4m3fn, FP8_E4M3FNUZ: torch.float8_e4m3fnuz}
    if flavour not in table:
        raise PlatformError(f"flavour: expected one of {sorted(table)}, got {flavour!r}")
    return table[flavour]


@dataclass(frozen=True)
class Platform:
    """What this machine is, plus the arch the ROCm policy should be evaluated for.

    ``vendor`` is the real machine ("amd" = a ROCm build of torch with a GPU, "nvidia",
    "cpu"); ``arch`` is a ROCm gfx arch: detected on ROCm, else from an override, else None.
    ``arch_source`` says which: "detected", "argument", "ATTNCHECK_ARCH" or None.
    """

    vendor: str
    arch: Optional[str] = None
    arch_source: Optional[str] = None
    hip_version: Optional[str] = None
    device_name: Optional[str] = None

    @property
    def on_rocm(self) -> bool:
        return self.vendor == "amd"

    @property
    def on_cuda(self) -> bool:
        return self.vendor == "nvidia"

    @property
    def gfx9(self) -> bool:
        return self.arch is not None and self.arch in GFX9_ARCHS

    def policy_arch(self, default: str = DEFAULT_POLICY_ARCH) -> str:
        """The arch to evaluate the ROCm selection policy for (override > detected > default)."""
        return self.arch if self.arch is not None else normalize_arch(default, "default arch")

    def fp8_flavour(self) -> str:
        if self.arch is not None:
            return fp8_flavour(self.arch)
        return fp8_flavour(None, "nvidia" if self.on_cuda else "cpu")

    def describe(self, with_arch: bool = True) -> str:
        if self.on_rocm:
            what = f"ROCm (HIP {self.hip_version})"
        elif self.on_cuda:
            what = "NVIDIA CUDA"
        else:
            what = "CPU only"
        if self.device_name:
            what += f", {self.device_name}"
        if with_arch and self.arch is not None:
            what += f", arch {self.arch} ({self.arch_source})"
        return what


def _probe_torch() -> tuple[str, Optional[str], Optional[str], Optional[str]]:
    """(vendor, gcnArchName or None, hip version, device name) of the current process."""
    import torch

    hip = getattr(torch.version, "hip", None)
    if not torch.cuda.is_available():
        return ("amd" if hip else "cpu"), None, hip, None
    props = torch.cuda.get_device_properties(0)
    if hip:
        return "amd", getattr(props, "gcnArchName", None), hip, props.name
    return "nvidia", None, None, props.name


def detect_platform(arch: Optional[str] = None, env: Optional[Mapping[str, str]] = None,
                    probe=_probe_torch) -> Platform:
    """Detect the machine; ``arch`` (argument) or ``ATTNCHECK_ARCH`` (env) override the arch.

    A ROCm build of torch without a visible GPU counts as "amd" with no arch. An override is
    validated (``PlatformError`` naming the argument or the variable). ``probe`` is injectable
    so the detection logic can be tested without a GPU.
    """
    env = os.environ if env is None else env
    vendor, gcn, hip, name = probe()
    if arch is not None:
        return Platform(vendor, normalize_arch(arch, "--arch"), "argument", hip, name)
    if ARCH_ENV_VAR in env:
        return Platform(vendor, normalize_arch(env[ARCH_ENV_VAR], ARCH_ENV_VAR), ARCH_ENV_VAR,
                        hip, name)
    if vendor == "amd" and gcn:
        return Platform(vendor, normalize_arch(gcn, "gcnArchName of device 0"), "detected",
                        hip, name)
    return Platform(vendor, None, None, hip, name)


def is_rocm() -> bool:
    import torch

    return bool(getattr(torch.version, "hip", None))


def is_cuda() -> bool:
    """A CUDA (NVIDIA) GPU is usable; False on ROCm builds, which also answer torch.cuda."""
    import torch

    return torch.cuda.is_available() and not is_rocm()


def is_interpreter(env: Optional[Mapping[str, str]] = None) -> bool:
    """Triton kernels run in the interpreter (TRITON_INTERPRET=1), i.e. on the CPU."""
    env = os.environ if env is None else env
    return env.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def kernel_target(env: Optional[Mapping[str, str]] = None) -> str:
    """Where Triton kernels launched by this process run: 'interpreter' (TRITON_INTERPRET=1,
    on the CPU), 'rocm', 'cuda', or 'none' (no GPU and no interpreter)."""
    if is_interpreter(env):
        return "interpreter"
    if is_rocm():
        return "rocm"
    if is_cuda():
        return "cuda"
    return "none"


BOTH_FP8 = frozenset({FP8_E4M3FN, FP8_E4M3FNUZ})


def triton_fp8_flavours(env: Optional[Mapping[str, str]] = None) -> frozenset:
    """fp8 KV-cache flavours Triton kernels can read here: both under the interpreter;
    compiled CUDA Triton has no e4m3fnuz; on ROCm the arch's own flavour (fnuz on gfx942)."""
    target = kernel_target(env)
    if target == "interpreter":
        return BOTH_FP8
    if target == "rocm":
        return frozenset({detect_platform(env=env).fp8_flavour()})
    return frozenset({FP8_E4M3FN})
