"""What the AITER MHA backends share: can they run on a device, and which fp8 KV flavours."""

from __future__ import annotations

import torch

from impl import platform
from impl.aiter import loader
from impl.backend import Availability

BOTH_FP8 = frozenset({"fp8_e4m3fn", "fp8_e4m3fnuz"})


def availability(device: torch.device) -> Availability:
    """AITER's Triton kernels run under the CPU interpreter or on a CUDA/ROCm GPU."""
    try:
        loader.aiter_version()
    except loader.AiterUnavailable as e:
        return Availability.no(str(e))
    device = torch.device(device)
    if device.type == "cpu":
        if not platform.is_interpreter():
            return Availability.no("AITER's Triton kernels on the CPU need TRITON_INTERPRET=1")
        return Availability.yes("Triton interpreter")
    if device.type == "cuda":
        if platform.is_interpreter():
            return Availability.no("TRITON_INTERPRET=1 runs kernels on the CPU; use --device cpu")
        return Availability.yes("ROCm" if platform.is_rocm() else "CUDA")
    return Availability.no(f"device {device}: AITER needs the CPU interpreter or a GPU")


def where() -> str:
    """Where kernels would run in this process: 'interpreter', 'cuda', 'rocm' or 'none'."""
    if platform.is_interpreter():
        return "interpreter"
    if platform.is_rocm():
        return "rocm"
    if platform.is_cuda():
        return "cuda"
    return "none"


def fp8_kv_flavours() -> frozenset:
    """fp8 KV flavours the kernels can read here: both under the interpreter; CUDA Triton has no
    fnuz; on ROCm the arch's own flavour (fnuz on gfx942, OCP e4m3fn elsewhere)."""
    w = where()
    if w == "cuda":
        return frozenset({"fp8_e4m3fn"})
    if w == "rocm":
        return frozenset({platform.detect_platform().fp8_flavour()})
    return BOTH_FP8


def describe_loader() -> str:
    try:
        return loader.load().describe()
    except loader.AiterUnavailable as e:
        return str(e)
