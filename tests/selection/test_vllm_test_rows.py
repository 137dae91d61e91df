"""The rows of vLLM's own ROCm selection test (research/vllm-backends.md 2.1, version A:
commit 64deead71, the code of the seeds' release) through the policy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest

from impl.selection import SelectionError, select_backend
from tests.selection.helpers import AITER, AITER_MHA, AITER_UNIFIED, PREFILL_DECODE

pytestmark = pytest.mark.smoke



@dataclass(frozen=True)
class VllmRow:
    id: str
    env: dict
    backend: Optional[str]
    expect: str  # backend name, or "error:<rule>"
    kind: str = "MHA"
    block_size: int = 16
    arch: str = "gfx942"  # the upstream test patches on_gfx9 -> True
    note: str = ""


VLLM_ROWS = [
    VllmRow("std-flex", {}, "FLEX_ATTENTION", "FLEX_ATTENTION"),
    VllmRow("std-1", {}, None, "TRITON_ATTN"),
    VllmRow("std-2", {}, "TRITON_ATTN", "TRITON_ATTN"),
    VllmRow("std-3", {}, "ROCM_ATTN", "ROCM_ATTN"),
    VllmRow("std-4", {}, "ROCM_AITER_FA", "ROCM_AITER_FA"),
    VllmRow("std-5", {}, "ROCM_AITER_UNIFIED_ATTN", "ROCM_AITER_UNIFIED_ATTN"),
    VllmRow("std-6", {AITER: "1"}, None, "ROCM_AITER_FA"),
    VllmRow("std-7", {AITER: "1", AITER_MHA: "1"}, None, "ROCM_AITER_FA"),
    VllmRow("std-8", {AITER: "1", AITER_UNIFIED: "1"}, None, "ROCM_AITER_UNIFIED_ATTN"),
    VllmRow("std-9", {PREFILL_DECODE: "1"}, None, "ROCM_ATTN"),
    VllmRow("std-10", {AITER: "1"}, "TRITON_ATTN", "TRITON_ATTN"),
    VllmRow("std-11", {AITER: "1", AITER_MHA: "0"}, None, "TRITON_ATTN"),
    VllmRow("std-12", {AITER: "1"}, "ROCM_ATTN", "ROCM_ATTN"),
    VllmRow("mla-1", {}, "TRITON_MLA", "TRITON_MLA", "MLA", 16),
    VllmRow("mla-2", {}, "TRITON_MLA", "error:BLOCK", "MLA", 1),
    VllmRow("mla-3", {}, "ROCM_AITER_MLA", "ROCM_AITER_MLA", "MLA", 1),
    VllmRow("mla-4", {}, "ROCM_AITER_MLA", "ROCM_AITER_MLA", "MLA", 16),
    VllmRow("mla-5", {AITER: "1"}, None, "ROCM_AITER_MLA", "MLA", 1),
    VllmRow("mla-6", {AITER: "1"}, None, "ROCM_AITER_MLA", "MLA", 16),
    VllmRow("mla-7", {AITER: "1"}, "TRITON_MLA", "TRITON_MLA", "MLA", 16),
    VllmRow("mla-8", {}, "ROCM_AITER_TRITON_MLA", "error:E-NAME", "MLA", 16,
            note="deliberate deviation: vLLM selects ROCM_AITER_TRITON_MLA; attncheck does not "
                 "model that backend (no seed uses it) and says so"),
    VllmRow("aiter-fa-requires-gfx9", {}, "ROCM_AITER_FA", "error:E-ARCH", arch="gfx1100",
            note="upstream patches on_gfx9 -> False; gfx1100 is our non-gfx9 arch"),
    # test_sparse_not_supported has no counterpart: sparse MLA is not an input of this policy.
]


@pytest.mark.parametrize("row", VLLM_ROWS, ids=lambda r: r.id)
def test_vllm_selection_test_rows(row):
    kw = dict(arch=row.arch, kind=row.kind, block_size=row.block_size, head_size=128
              if row.kind == "MHA" else None, dtype="float16", kv_cache_dtype="auto")
    if row.expect.startswith("error:"):
        with pytest.raises(SelectionError) as info:
            select_backend(row.env, row.backend, **kw)
        assert info.value.rule == row.expect.split(":", 1)[1], str(info.value)
        if row.id == "aiter-fa-requires-gfx9":
            assert "only supported on gfx9" in str(info.value)
        if row.id == "mla-2":  # the error points to what works for block size 1
            assert "ROCM_AITER_MLA" in str(info.value)
    else:
        sel = select_backend(row.env, row.backend, **kw)
        assert sel.backend == row.expect, "\n".join(sel.rules)


