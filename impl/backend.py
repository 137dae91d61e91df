"""The backend protocol: what a backend declares and what ``run`` must do.

A backend is an object with a ``name`` (vLLM's enum name), an attention ``kind`` ("MHA" or
"MLA"), ``capabilities`` (what cases it accepts: anything outside them is skipped with the
capability named, never run), ``availability(device)`` (can it run here, and if not why), and
``run(batch)``.

``run`` receives a validated batch on the target device. It must write the new K/V (or the
MLA latent) into the batch's cache tensors in place (the harness checks those writes
bit-exactly) and return a ``BackendOutput``: the attention output ``[T, Hq, Dv]`` in the
model dtype, and the LSE ``[Hq, T]`` (float32, natural log) when its pipeline has one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""  # why not, e.g. "needs ROCm gfx9", "needs CUDA", "needs Triton (interpreter or GPU)"
    verified: bool = True  # False: a ROCm-only adapter that this machine cannot check

    @staticmethod
    def yes(note: str = "") -> "Availability":
        return Availability(True, note)

    @staticmethod
    def no(reason: str, verified: bool = True) -> "Availability":
        return Availability(False, reason, verified)


@dataclass(frozen=True)
class BlockSizes:
    """Accepted block sizes: an explicit set, or any multiple of ``multiple_of`` (>= minimum)."""

    allowed: Optional[frozenset] = None
    multiple_of: int = 1
    minimum: int = 1

    def accepts(self, block_size: int) -> bool:
        if self.allowed is not None:
            return block_size in self.allowed
        return block_size >= self.minimum and block_size % self.multiple_of == 0

    def describe(self) -> str:
        if self.allowed is not None:
            return "block sizes " + "/".join(str(b) for b in sorted(self.allowed))
        return f"block sizes that are multiples of {self.multiple_of} (>= {self.minimum})"


@dataclass(frozen=True)
class Capabilities:
    dtypes: frozenset = frozenset({torch.float16, torch.bfloat16, torch.float32})
    head_sizes: Optional[frozenset] = None  # None = any
    block_sizes: BlockSizes = BlockSizes()
    causal: bool = True
    non_causal: bool = True
    sliding_window: bool = False
    softcap: bool = False
    alibi: bool = False
    sinks: bool = False
    fp8_kv: frozenset = frozenset()  # subset of {"fp8_e4m3fn", "fp8_e4m3fnuz"}
    returns_lse: bool = False
    num_heads: Optional[frozenset] = None  # MLA kernels that only take some head counts
    # knobs a backend takes one by one but not together: (reason, predicate(params) -> True when
    # the case combines them), e.g. ("ALiBi with sinks: the kernel asserts", lambda p: p.get("alibi") and p.get("sinks"))
    unsupported_combinations: tuple = ()
    notes: tuple = ()

    def unsupported(self, params: dict) -> Optional[str]:
        """Name the first capability a case needs and this backend lacks (None = supported).

        ``params`` are the case parameters of the catalogue (dtype, head_size, block_size,
        causal, sliding_window, softcap, alibi, sinks, kv_cache_dtype, num_heads).
        """
        dt = params.get("torch_dtype")
        if dt is not None and dt not in self.dtypes:
            return f"dtype {str(dt).replace('torch.', '')} not supported"
        hs = params.get("head_size")
        if self.head_sizes is not None and hs is not None and hs not in self.head_sizes:
            return f"head size {hs} not supported (supports {sorted(self.head_sizes)})"
        bs = params.get("block_size")
        if bs is not None and not self.block_sizes.accepts(bs):
            return f"block size {bs} not supported (supports {self.block_sizes.describe()})"
        if params.get("causal", True) and not self.causal:
            return "causal attention not supported"
        if not params.get("causal", True) and not self.non_causal:
            return "non-causal attention not supported"
        if params.get("sliding_window") and not self.sliding_window:
            return "sliding window not supported"
        if params.get("softcap") and not self.softcap:
            return "softcap not supported"
        if params.get("alibi") and not self.alibi:
            return "ALiBi not supported"
        if params.get("sinks") and not self.sinks:
            return "attention sinks not supported"
        kvd = params.get("kv_cache_dtype", "auto")
        if kvd != "auto" and kvd not in self.fp8_kv:
            return f"kv cache dtype {kvd} not supported"
        nh = params.get("num_heads")
        if self.num_heads is not None and nh is not None and nh not in self.num_heads:
            return f"{nh} heads not supported (supports {sorted(self.num_heads)})"
        for reason, combined in self.unsupported_combinations:
            if combined(params):
                return reason
        return None


@dataclass
class BackendOutput:
    output: torch.Tensor  # [T, Hq, Dv], model dtype
    lse: Optional[torch.Tensor] = None  # [Hq, T], float32, natural log
    info: dict = field(default_factory=dict)  # free-form: which kernels ran, chunk counts, ...


@dataclass(frozen=True)
class CaseParams:
    """The parameters of a case that a known issue may depend on, typed.

    attncheck builds one from each catalogue case (``case.typed_params()``); impl cannot import
    the catalogue, so ``family`` is the family's string value (``attncheck.cases.Family``).
    MLA cases have one KV "head" of the latent width and no window, softcap, ALiBi or sinks.
    """

    kind: str  # "MHA" | "MLA"
    family: str
    tier: str
    dtype: str  # "bf16" | "fp16" | "fp32"
    kv_cache_dtype: str  # "auto" | "fp8_e4m3fn" | "fp8_e4m3fnuz"
    query_lens: tuple
    seq_lens: tuple
    num_heads: int
    num_kv_heads: int
    head_size: int
    block_size: int
    causal: bool = True
    sliding_window: Optional[int] = None
    softcap: Optional[float] = None
    alibi: bool = False
    sinks: bool = False


PLATFORMS = ("all", "cpu", "cuda")


@dataclass(frozen=True)
class KnownIssue:
    """A declared expected failure of one backend (OpInfo's skip/xfail with a reason).

    It applies to a case when every given condition holds: the device type (``platform``),
    the model dtype, the case family, and ``predicate`` (a typed function of the case's
    parameters, for conditions the fields above cannot state). The harness reports a failing
    case it applies to as an expected failure with the reason and link, and notes it when the
    case passes; it never hides a pass or an error. ``families`` are the string values of
    ``attncheck.cases.Family`` (impl cannot import attncheck); attncheck validates them when it
    loads the backend.
    """

    backend: str  # the backend's name; checked against the backend that declares it
    reason: str  # what goes wrong, with numbers
    link: str  # the issue that tracks it
    platform: str = "all"  # "all", "cpu" or "cuda" (the torch device type)
    dtypes: Optional[frozenset] = None  # model dtypes ("bf16", "fp16", "fp32"); None = any
    families: Optional[frozenset] = None  # case families; None = any
    predicate: Optional[Callable[[CaseParams], bool]] = None  # None = every case

    def __post_init__(self):
        if self.platform not in PLATFORMS:
            raise ValueError(f"KnownIssue({self.backend}).platform: expected one of {PLATFORMS}, got {self.platform!r}")
        for name in ("dtypes", "families"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, frozenset(str(v) for v in value))

    def applies(self, params: CaseParams, device_type: str) -> bool:
        return (self.platform in ("all", device_type)
                and (self.dtypes is None or params.dtype in self.dtypes)
                and (self.families is None or params.family in self.families)
                and (self.predicate is None or bool(self.predicate(params))))


@runtime_checkable
class Backend(Protocol):
    name: str
    kind: str  # "MHA" or "MLA"
    capabilities: Capabilities

    def availability(self, device: torch.device) -> Availability: ...

    def run(self, batch) -> BackendOutput: ...
