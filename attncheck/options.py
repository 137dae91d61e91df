"""Run options shared by ``attncheck verify`` and the pytest plugin, without torch at import
(the plugin is loaded by every pytest run and must stay light; and verify must not import the
plugin module itself, or pytest could not rewrite its asserts)."""

from __future__ import annotations

import argparse
import math
import os

TIERS = ("smoke", "full", "large", "sweep")  # attncheck.cases.TIERS (cases imports torch)
DEFAULT_SWEEP_COUNT = {"cpu": 20, "cuda": 1000}


def non_negative_int(text: str) -> int:
    return _number(text, int, 0, "an integer >= 0")


def positive_int(text: str) -> int:
    return _number(text, int, 1, "an integer >= 1")


def positive_float(text: str) -> float:
    return _number(text, float, 0.0, "a number of seconds > 0", strict=True)


def _number(text, kind, least, what, strict=False):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value) or value < least or (strict and value == least):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def visible_gpus() -> list:
    """Ids of the GPUs this process may use (CUDA_VISIBLE_DEVICES, else all that NVML counts),
    found without starting CUDA."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [x.strip() for x in visible.split(",") if x.strip() and x.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]  # NVML: no CUDA context


def default_workers_per_gpu(gpus: int) -> int:
    """Several workers share a GPU: a check is small kernel launches, Python and (once per
    shape) a compilation, so one process leaves the GPU idle most of the time. Three quarters
    of the CPU cores, at most 12 per GPU (H200, 16 cores: the smoke tier took 101 s with 4
    workers, 64 s with 12)."""
    return max(1, min(12, (os.cpu_count() or 1) * 3 // 4 // max(gpus, 1)))


def implied_tier(tier, case_names):
    """``--case sweep:S:I`` alone implies the sweep tier."""
    if tier is None and case_names and all(str(n).startswith("sweep:") for n in case_names):
        return "sweep"
    return tier
