"""What the AITER backends share: can they run on a device. (Where kernels run and which fp8 KV
flavours they read are platform facts: ``impl.platform.kernel_target`` / ``triton_fp8_flavours``.)"""

from __future__ import annotations

import torch

from impl import platform
from impl.aiter import loader
from impl.backend import Availability

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


def provider() -> str:
    """The provider string AITER backends' verdicts carry, e.g. 'amd-aiter==0.1.7'."""
    try:
        return f"{loader.DIST_NAME}=={loader.aiter_version()}"
    except loader.AiterUnavailable:
        return f"{loader.DIST_NAME} (not installed)"


def describe_loader() -> str:
    try:
        return loader.load().describe()
    except loader.AiterUnavailable as e:
        return str(e)
