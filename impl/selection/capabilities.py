"""What each modelled backend accepts, as the policies check it.

The facts come from attncheck's own backends (``impl/backends/*.py``, their ``Capabilities``):
model dtypes, head sizes, KV-cache dtypes, kernel block sizes. A vLLM line enforces some facts
differently from our stand-in kernels; each such fact is stated once, in ``VLLM_FACTS``, with
the reason ours differs. ``tests/selection/test_differential.py`` checks the result against
each line's vLLM wheel.

Adding a built-in backend that is a vLLM ROCm backend: add its class to ``BUILTIN``.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional

from impl.backend import BlockSizes
from impl.backends.flex_attention import FlexAttentionBackend
from impl.backends.rocm_aiter_fa import AiterFABackend
from impl.backends.rocm_aiter_mla import AiterMLABackend
from impl.backends.rocm_aiter_unified_attn import AiterUnifiedAttnBackend
from impl.backends.rocm_attn import RocmAttnBackend
from impl.backends.triton_attn import TritonAttnBackend
from impl.backends.triton_mla import TritonMLABackend

# attncheck's backends that are vLLM ROCm backends, in the order names are listed to users.
# (TORCH_SDPA, impl/backends/torch_sdpa.py, is attncheck's baseline, not a vLLM backend.)
BUILTIN = (TritonAttnBackend, RocmAttnBackend, AiterFABackend, AiterUnifiedAttnBackend,
           FlexAttentionBackend, TritonMLABackend, AiterMLABackend)
MHA_BACKENDS = tuple(b.name for b in BUILTIN if b.kind == "MHA")
MLA_BACKENDS = tuple(b.name for b in BUILTIN if b.kind == "MLA")
VALID_BACKENDS = MHA_BACKENDS + MLA_BACKENDS

UNQUANTISED_KV = frozenset({"auto", "float16", "bfloat16"})  # a cache in a 16-bit dtype
FP8_KV = frozenset({"fp8", "fp8_e4m3", "fp8_e5m2"})


@dataclass(frozen=True)
class HeadSizes:
    allowed: Optional[frozenset] = None  # None = any size >= minimum
    minimum: int = 1

    def accepts(self, head_size: int) -> bool:
        if self.allowed is not None:
            return head_size in self.allowed
        return head_size >= self.minimum

    def describe(self) -> str:
        if self.allowed is not None:
            return ", ".join(map(str, sorted(self.allowed)))
        return f">= {self.minimum}" if self.minimum > 1 else "any"


@dataclass(frozen=True)
class Facts:
    dtypes: frozenset  # model dtype names ("float16", ...)
    head_sizes: HeadSizes
    kv_cache_dtypes: frozenset  # vLLM's kv_cache_dtype names
    block_sizes: BlockSizes  # KV-cache block sizes the kernels take

    def supports_fp8(self) -> bool:
        return bool(self.kv_cache_dtypes & FP8_KV)


def _ours(backend_cls) -> Facts:
    caps = backend_cls().capabilities
    # Our backends store an fp8 cache as the platform's e4m3 flavour: vLLM's "fp8" and
    # "fp8_e4m3". Whether the set is empty does not depend on the platform (only which
    # flavour), so the policy's answers do not either.
    kv = UNQUANTISED_KV | (frozenset({"fp8", "fp8_e4m3"}) if caps.fp8_kv else frozenset())
    return Facts(dtypes=frozenset(str(d).replace("torch.", "") for d in caps.dtypes),
                 head_sizes=HeadSizes(caps.head_sizes), kv_cache_dtypes=kv,
                 block_sizes=caps.block_sizes)


@dataclass(frozen=True)
class VllmFact:
    value: object
    why: str  # why attncheck's backend differs


_ROCM_ATTN_HEADS_2025 = frozenset({32, 64, 96, 128, 160, 192, 224, 256})
_ALL_KV = UNQUANTISED_KV | FP8_KV
_E5M2 = "vLLM also stores an fp8_e5m2 cache; attncheck's kernels store e4m3 only"

# line -> backend -> field of Facts -> vLLM's fact. Only where vLLM differs from ours.
VLLM_FACTS = {
    "0.12": {
        "TRITON_ATTN": {"head_sizes": VllmFact(HeadSizes(minimum=32), (
            "vLLM's kernel takes any head size >= 32; ours pads to a power of two and keeps "
            "tiles within 256 (multiples of 8 from 32 to 256)"))},
        "ROCM_ATTN": {"head_sizes": VllmFact(_ROCM_ATTN_HEADS_2025, (
            "vLLM 0.12's ROCM_ATTN checks this list (80 came in 2026); ours runs 80 too"))},
        "ROCM_AITER_UNIFIED_ATTN": {"head_sizes": VllmFact(_ROCM_ATTN_HEADS_2025, (
            "vLLM 0.12's AITER unified attention is built on ROCM_ATTN's implementation and "
            "checks its head sizes; AITER's Triton kernel here takes any"))},
        "ROCM_AITER_FA": {"head_sizes": VllmFact(frozenset({64, 128, 256}), (
            "vLLM runs AITER's CK/ASM kernels, built for these head sizes; attncheck runs "
            "AITER's Triton kernels, which take any"))},
        "TRITON_MLA": {
            "kv_cache_dtypes": VllmFact(frozenset({"auto"}), (
                "vLLM 0.12's TRITON_MLA raises NotImplementedError for an fp8 cache; "
                "attncheck's Triton MLA reads fp8")),
            "head_sizes": VllmFact(frozenset({576}), (
                "vLLM's MLA takes only the 576-wide latent (kv_lora_rank 512 + rope 64); "
                "attncheck's MLA batch carries the widths itself"))},
        "ROCM_AITER_MLA": {"head_sizes": VllmFact(frozenset({576}), (
            "vLLM's MLA takes only the 576-wide latent (kv_lora_rank 512 + rope 64); "
            "attncheck's MLA batch carries the widths itself"))},
    },
    "0.33": {
        "TRITON_ATTN": {
            "head_sizes": VllmFact(HeadSizes(minimum=32), (
                "vLLM's kernel takes any head size >= 32; ours pads to a power of two and "
                "keeps tiles within 256 (multiples of 8 from 32 to 256)")),
            "kv_cache_dtypes": VllmFact(_ALL_KV, _E5M2)},
        "ROCM_ATTN": {"kv_cache_dtypes": VllmFact(_ALL_KV, _E5M2)},
        "ROCM_AITER_FA": {
            "head_sizes": VllmFact(frozenset({64, 128, 256}), (
                "vLLM runs AITER's CK/ASM kernels, built for these head sizes; attncheck runs "
                "AITER's Triton kernels, which take any")),
            "kv_cache_dtypes": VllmFact(_ALL_KV, _E5M2),
            "block_sizes": VllmFact(BlockSizes(multiple_of=16, minimum=16), (
                "vLLM's kernels take blocks of 16 or 32 and any multiple through hybrid "
                "blocks; AITER's Triton kernels here take powers of two from 16 to 256"))},
        "ROCM_AITER_UNIFIED_ATTN": {
            "head_sizes": VllmFact(HeadSizes(minimum=32), (
                "vLLM 0.33 accepts any head size >= 32; AITER's Triton kernel here takes "
                "any")),
            "kv_cache_dtypes": VllmFact(_ALL_KV, _E5M2),
            "block_sizes": VllmFact(BlockSizes(multiple_of=16, minimum=16), (
                "vLLM 0.33 takes any multiple of 16; AITER's Triton kernel here takes powers "
                "of two from 16 to 256"))},
        "ROCM_AITER_MLA": {"kv_cache_dtypes": VllmFact(_ALL_KV, _E5M2)},
    },
}


def _as_field(field: str, value):
    if field == "head_sizes" and not isinstance(value, HeadSizes):
        return HeadSizes(frozenset(value))
    return value


@functools.lru_cache(maxsize=None)
def facts(line: str, backend: str) -> Facts:
    """What ``backend`` accepts in vLLM line ``line`` (ours, with vLLM's facts applied)."""
    base = _ours(next(b for b in BUILTIN if b.name == backend))
    changes = {f: _as_field(f, v.value) for f, v in VLLM_FACTS.get(line, {}).get(
        backend, {}).items()}
    return dataclasses.replace(base, **changes)


def ours(backend: str) -> Facts:
    """What attncheck's own backend accepts (no vLLM facts applied)."""
    return _ours(next(b for b in BUILTIN if b.name == backend))


def why_vllm_differs(line: str, backend: str, field: str) -> Optional[str]:
    fact = VLLM_FACTS.get(line, {}).get(backend, {}).get(field)
    return None if fact is None else fact.why
