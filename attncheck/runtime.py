"""Where a run happens and with what: device, tier, kernel provider, and the platform facts that
follow. The CLI, the pytest plugin, the harness and the tests all ask here, so each question has
one answer.

* device: "auto" (or None) = cuda when torch sees a GPU, else cpu; asking for cuda without one
  is an error. On the CPU, Triton kernels run in the interpreter: ``use_device("cpu")`` sets
  ``TRITON_INTERPRET=1`` and must run before any Triton kernel module is imported (Triton
  reads it when a kernel is decorated).
* tier: smoke on the CPU, full on a GPU, unless asked.
* provider: ``ATTNCHECK_PROVIDER`` = "vllm" (vLLM's own kernels; an error when they cannot be
  loaded) or "stand-in" (the project's Triton kernels); unset = vLLM's where it loads.
* platform facts (kernel target, fp8 flavours): ``impl.platform``, reported by ``environment()``.
"""

from __future__ import annotations

import os
import platform as pyplatform
from dataclasses import dataclass
from typing import Optional

from attncheck.cases import TIERS

DEVICES = ("cpu", "cuda")
DEFAULT_TIER = {"cpu": "smoke", "cuda": "full"}
PROVIDERS = ("vllm", "stand-in")
PROVIDER_ENV = "ATTNCHECK_PROVIDER"


class SetupError(ValueError):
    """A run that cannot start as asked; the message names the setting and what was expected."""


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_device(requested: Optional[str] = None) -> str:
    if requested in (None, "auto"):
        return "cuda" if cuda_available() else "cpu"
    if requested not in DEVICES:
        raise SetupError(f"device: expected auto, {' or '.join(DEVICES)}, got {requested!r}")
    if requested == "cuda" and not cuda_available():
        raise SetupError("device cuda: torch sees no CUDA device (use --device cpu)")
    return requested


def resolve_tier(requested: Optional[str], device: str) -> str:
    if requested is None:
        return DEFAULT_TIER[device]
    if requested not in TIERS:
        raise SetupError(f"tier: expected one of {', '.join(TIERS)}, got {requested!r}")
    return requested


def use_device(device: str) -> None:
    """What a device needs before kernels are imported: the Triton interpreter on the CPU."""
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")


def torch_device(device):
    """``device`` (str or torch.device) as a torch.device that exists on this machine."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and not cuda_available():
        raise RuntimeError("device cuda requested but torch sees no CUDA device")
    return dev


SHARED_GPU_CACHE_BYTES = 4 << 30  # what one worker's allocator may keep cached between checks


def release_cached_memory(device) -> None:
    """Several workers share a GPU: memory a check's allocator keeps cached (a large live oracle,
    an Inductor graph's buffers) is handed back once it passes SHARED_GPU_CACHE_BYTES, so that a
    neighbour does not run out of memory (12 workers on one H200, each keeping its peak: 21
    checks failed with CUDA out of memory, one worker holding 22 GiB)."""
    import torch

    if torch.device(device).type == "cuda" and torch.cuda.memory_reserved() > SHARED_GPU_CACHE_BYTES:
        torch.cuda.empty_cache()


def use_provider(preference: Optional[str]) -> None:
    """Export the kernel-provider preference to this process and every worker it starts, and
    fail now (not per case) when the preferred provider cannot be loaded."""
    if preference is None:
        return
    if preference not in PROVIDERS:
        raise SetupError(f"provider: expected one of {', '.join(PROVIDERS)}, got {preference!r}")
    os.environ[PROVIDER_ENV] = preference
    try:
        from impl.vllm import provider_error
    except ImportError:  # no vLLM provider module in this tree: nothing more to check
        return
    try:
        problem = provider_error(preference)
    except Exception as e:  # a loader that raises is reported the same way
        problem = f"{type(e).__name__}: {e}"
    if problem:
        raise SetupError(f"provider {preference}: {problem}")


@dataclass(frozen=True)
class RunSettings:
    device: str
    tier: str
    provider: Optional[str] = None


def resolve(device: Optional[str] = None, tier: Optional[str] = None,
            provider: Optional[str] = None) -> RunSettings:
    """Resolve and apply the settings of a run (raises SetupError with a one-line message)."""
    dev = resolve_device(device)
    settings = RunSettings(dev, resolve_tier(tier, dev), provider)
    use_device(dev)
    use_provider(provider)
    return settings


def environment() -> dict:
    """Versions and platform facts recorded beside every report."""
    import torch

    from impl import platform

    env = {"python": pyplatform.python_version(), "torch": torch.__version__,
           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "triton_interpret": os.environ.get("TRITON_INTERPRET"),
           "provider": os.environ.get(PROVIDER_ENV),
           "kernel_target": platform.kernel_target(),
           "fp8_flavours": sorted(platform.triton_fp8_flavours())}
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    return env
