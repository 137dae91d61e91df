"""impl/selection/capabilities.py: the policy's facts come from our backends, and vLLM's own
facts are stated only where they differ."""

from __future__ import annotations

import types

import pytest

from impl import platform
from impl.selection import capabilities as caps

pytestmark = pytest.mark.smoke


def test_names_come_from_the_backend_classes():
    assert caps.VALID_BACKENDS == ("TRITON_ATTN", "ROCM_ATTN", "ROCM_AITER_FA",
                                   "ROCM_AITER_UNIFIED_ATTN", "FLEX_ATTENTION", "TRITON_MLA",
                                   "ROCM_AITER_MLA")
    assert all(b.kind in ("MHA", "MLA") for b in caps.BUILTIN)


@pytest.mark.parametrize("where", ["interpreter", "rocm", "cuda", "none"])
def test_facts_do_not_depend_on_the_machine(where, monkeypatch):
    """Our backends' fp8 flavours depend on the platform; the facts the policy reads do not."""
    base = {b.name: caps._ours(b) for b in caps.BUILTIN}
    monkeypatch.setattr(platform, "is_interpreter", lambda env=None: where == "interpreter")
    monkeypatch.setattr(platform, "is_rocm", lambda: where == "rocm")
    monkeypatch.setattr(platform, "is_cuda", lambda: where == "cuda")
    monkeypatch.setattr(platform, "detect_platform", lambda *a, **k: types.SimpleNamespace(
        fp8_flavour=lambda: "fp8_e4m3fnuz"))
    assert {b.name: caps._ours(b) for b in caps.BUILTIN} == base


def test_every_vllm_fact_differs_from_ours():
    """A vLLM fact equal to our backend's would restate it: derive it instead."""
    stale = []
    for line, table in caps.VLLM_FACTS.items():
        for backend, fields in table.items():
            for field, fact in fields.items():
                if getattr(caps.ours(backend), field) == caps._as_field(field, fact.value):
                    stale.append(f"{line} {backend}.{field}")
                assert fact.why, f"{line} {backend}.{field} has no reason"
    assert not stale, f"vLLM facts equal to ours (derive them): {stale}"


def test_policy_reads_our_facts_where_vllm_agrees(monkeypatch):
    """Change our backend's dtypes: the seeds' line follows (it states no dtype of its own)."""
    from impl.selection import SelectionError, select_backend

    assert select_backend({}, "ROCM_ATTN", dtype="float32").backend == "ROCM_ATTN"
    real = caps._ours

    def no_fp32(backend_cls):
        facts = real(backend_cls)
        return facts.__class__(facts.dtypes - {"float32"}, facts.head_sizes,
                               facts.kv_cache_dtypes, facts.block_sizes)

    monkeypatch.setattr(caps, "_ours", no_fp32)
    caps.facts.cache_clear()
    try:
        with pytest.raises(SelectionError, match="ROCM_ATTN does not support float32"):
            select_backend({}, "ROCM_ATTN", dtype="float32")
    finally:
        caps.facts.cache_clear()
