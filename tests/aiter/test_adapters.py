"""AITER adapters against the float64 reference, LSE normalisation, and the ROCm adapters'
keyword names checked against the installed aiter sources (they cannot run here)."""

import ast
import os

import pytest
import torch

from impl.aiter import rocm_ops, triton_kernels as tk
from impl.platform import is_interpreter
from reference import mha as ref

pytestmark = pytest.mark.smoke
needs_triton = pytest.mark.skipif(not is_interpreter(), reason="needs TRITON_INTERPRET=1 (CPU run of AITER Triton)")


def _i32(x):
    return torch.tensor(x, dtype=torch.int32)


@needs_triton
@pytest.mark.parametrize("causal", [True, False])
def test_triton_mha_varlen_matches_reference_with_normalised_lse(causal):
    g = torch.Generator().manual_seed(1)
    ql, kl = [5, 1, 9], [12, 0, 9]  # sequence 1 sees no key at all
    q = torch.randn(sum(ql), 4, 64, generator=g).half()
    k = torch.randn(sum(kl), 2, 64, generator=g).half()
    v = torch.randn(sum(kl), 2, 64, generator=g).half()
    out, lse = tk.flash_attn_varlen(q, k, v, cu_seqlens_q=_i32([0, 5, 6, 15]), cu_seqlens_k=_i32([0, 12, 12, 21]),
                                    max_seqlen_q=9, max_seqlen_k=12, scale=0.125, causal=causal)
    assert lse.shape == (4, 15) and lse.dtype == torch.float32
    qs, ks = [0, 5, 6, 15], [0, 12, 12, 21]
    for b in range(3):
        r_out, r_lse = ref.attention(q[qs[b]:qs[b + 1]].double(), k[ks[b]:ks[b + 1]].double(),
                                     v[ks[b]:ks[b + 1]].double(), scale=0.125, causal=causal)
        assert (out[qs[b]:qs[b + 1]].double() - r_out).abs().max() < 2e-3
        got = lse[:, qs[b]:qs[b + 1]].double()
        assert torch.equal(torch.isinf(got), torch.isinf(r_lse))
        fin = torch.isfinite(r_lse)
        if fin.any():
            assert (got[fin] - r_lse[fin]).abs().max() < 1e-4
    assert torch.all(lse[:, 5] == float("-inf"))  # AITER writes 0 there; the merge needs -inf


def test_normalize_lse_layout_and_empty_rows():
    raw = torch.tensor([[0.5, 1.0], [0.0, 0.0], [float("inf"), 2.0]])  # [T=3, H=2]
    lse = tk.normalize_lse(raw, empty=[1])
    assert lse.shape == (2, 3)
    assert lse[0, 0] == 0.5 and lse[1, 0] == 1.0
    assert torch.all(lse[:, 1] == float("-inf"))
    assert lse[0, 2] == float("-inf") and lse[1, 2] == 2.0
    assert tk.empty_rows([3, 2, 2], [1, 0, 5], causal=True) == [0, 1, 3, 4]
    assert tk.empty_rows([3, 2], [1, 0], causal=False) == [3, 4]


def test_adapters_name_bad_arguments():
    q = torch.zeros(4, 8, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="k:"):
        tk.flash_attn_varlen(q, torch.zeros(4, 2, 32, dtype=torch.float16), torch.zeros(4, 2, 32, dtype=torch.float16),
                             cu_seqlens_q=_i32([0, 4]), cu_seqlens_k=_i32([0, 4]), max_seqlen_q=4, max_seqlen_k=4,
                             scale=1.0, causal=True)
    kc = torch.zeros(2, 16, 2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="block_table"):
        tk.unified_attention(q, kc, kc, torch.empty_like(q), cu_seqlens_q=_i32([0, 4]), max_seqlen_q=4,
                             seqused_k=_i32([4]), max_seqlen_k=4, block_table=torch.zeros(1, 1), scale=1.0)


def _installed_params(relpath: str, func: str) -> set:
    from impl.aiter import loader

    root = loader._package_dir()
    tree = ast.parse(open(os.path.join(root, relpath)).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == func:
            return {a.arg for a in node.args.args + node.args.kwonlyargs}
    raise AssertionError(f"{func} not found in aiter/{relpath}")


def test_rocm_adapter_keywords_exist_in_the_installed_aiter():
    """The CK/HIP adapters cannot run here; at least every keyword they pass must be a parameter
    of the installed 0.1.7 functions (signatures moved between versions)."""
    assert set(rocm_ops.CK_VARLEN_KWARGS) <= _installed_params("ops/mha.py", "flash_attn_varlen_func")
    assert set(rocm_ops.PA_V1_KWARGS) <= _installed_params("ops/attention.py", "paged_attention_v1")


def test_pa_v1_workspace_size():
    # 2 seqs x 4 heads x 2 partitions (300 keys / 256) x 64 dims x 2 bytes + 2 x (2x4x2) x 4 bytes
    assert rocm_ops.pa_v1_workspace_bytes(2, 4, 64, 300, torch.float16) == 2 * 4 * 2 * 64 * 2 + 2 * 16 * 4
