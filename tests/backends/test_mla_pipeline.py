"""MLA pipeline pieces (impl/backends/triton_mla.py, rocm_aiter_mla.py) and both backends end to end.

Row split, decode-entry expansion and the page-size-1 block-table expansion are checked against
brute force; the ROCm-only ``aiter.mla.mla_decode_fwd`` adapter's keyword names are checked
against the installed AITER source (it cannot run here and says so); and both pipelines run
in-memory MLA cases through the harness (float64 reference, per-row budgets)."""

import ast
import importlib.util
from pathlib import Path

import pytest
import torch

from attncheck import golden, harness
from attncheck.cases import MLA_MINI_DIMS, MLACase
from impl.aiter import loader
from impl.backends import rocm_aiter_mla, triton_mla
from impl.batch import BatchError

pytestmark = [pytest.mark.smoke,
              pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")]


def test_decode_row_split_rules():
    t, a = triton_mla.TritonMLABackend(), rocm_aiter_mla.AiterMLABackend()
    assert t.num_decodes([1, 1, 5, 9]) == 2 and a.num_decodes([1, 1, 5, 9]) == 2
    # spec decode: uniform q_len <= 8 rows are decodes for AITER, prefills for TRITON_MLA
    assert t.num_decodes([4, 4, 4]) == 0 and a.num_decodes([4, 4, 4]) == 3
    assert a.num_decodes([4, 4, 2, 9]) == 2  # uniform: stops at the first different q_len
    assert a.num_decodes([9, 9]) == 0


def test_expand_decode_entries_causal_kv_lens():
    table = torch.tensor([[3, 4, 9], [7, 8, 9]], dtype=torch.int32)
    rows, lens = triton_mla.expand_decode_entries([1, 3], [17, 20], table)
    assert lens.tolist() == [17, 18, 19, 20]
    assert rows.tolist() == [[3, 4, 9], [7, 8, 9], [7, 8, 9], [7, 8, 9]]


@pytest.mark.parametrize("bs", [1, 16, 5])
def test_page_size_one_indices_match_brute_force(bs):
    g = torch.Generator().manual_seed(bs)
    kv_lens = torch.tensor([1, 37, 16, 3], dtype=torch.int32)
    nb = [-(-int(n) // bs) for n in kv_lens]
    table = torch.randperm(200, generator=g)[: 4 * max(nb)].reshape(4, max(nb)).to(torch.int32)
    indptr, idx = rocm_aiter_mla.page_size_one_indices(table, kv_lens, bs)
    want = [int(table[e, p // bs]) * bs + p % bs for e, n in enumerate(kv_lens.tolist()) for p in range(n)]
    assert idx.dtype == torch.int32 and idx.tolist() == want
    assert indptr.tolist() == [0, 1, 38, 54, 57]


def _mla_decode_fwd_params() -> set:
    spec = importlib.util.find_spec("aiter")
    if spec is None or spec.origin is None:
        pytest.skip("amd-aiter is not installed")
    src = Path(spec.origin).parent / "mla.py"
    tree = ast.parse(src.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "mla_decode_fwd":
            return {a.arg for a in node.args.args + node.args.kwonlyargs}
    raise AssertionError(f"mla_decode_fwd not found in {src}")


def test_rocm_adapter_keywords_exist_in_installed_aiter():
    params = _mla_decode_fwd_params()
    missing = set(rocm_aiter_mla.MLA_DECODE_FWD_KWARGS) - params
    assert not missing, f"aiter.mla.mla_decode_fwd has no parameter(s) {sorted(missing)}"


@pytest.mark.skipif(torch.cuda.is_available() and torch.version.hip is not None, reason="runs on ROCm")
def test_rocm_decode_adapter_refuses_off_rocm_and_is_reported_unverified(device):
    q = torch.zeros(1, 16, 576, dtype=torch.bfloat16)
    cache = torch.zeros(1, 16, 576, dtype=torch.bfloat16)
    with pytest.raises(loader.AiterUnavailable):
        rocm_aiter_mla.rocm_mla_decode(q, cache, torch.zeros(1, 1, dtype=torch.int32),
                                       torch.ones(1, dtype=torch.int32), scale=0.1, kv_lora_rank=512, kv_scale=1.0)
    note = rocm_aiter_mla.AiterMLABackend().availability(torch.device(device)).reason
    assert "not verified on this machine" in note


def test_triton_mla_declares_block_size_16_minimum():
    caps = triton_mla.TritonMLABackend().capabilities
    assert not caps.block_sizes.accepts(1) and caps.block_sizes.accepts(16) and caps.block_sizes.accepts(64)
    assert rocm_aiter_mla.AiterMLABackend().capabilities.block_sizes.accepts(1)


def test_unordered_batch_is_rejected_with_batch_error(device):
    case = MLACase("pipe-unordered", (9, 20), (9, 1), num_heads=8, unordered=True, seed=600, **MLA_MINI_DIMS)
    batch = golden.case_module(case).batch_from_tensors(case, golden.generate(case), device)
    for be in (triton_mla.TritonMLABackend(), rocm_aiter_mla.AiterMLABackend()):
        with pytest.raises(BatchError, match="batch order"):
            be.run(batch.clone())


CASES = [
    # fp16, two decodes + an extend whose context needs 3 chunks + a no-context prefill
    MLACase("pipe-chunks-h8-mini-bs16-fp16", (40, 3, 45, 7), (1, 1, 6, 7), num_heads=8, dtype="fp16",
            context_chunk_tokens=16, seed=601, **MLA_MINI_DIMS),
    # spec decode q_len 3 with an explicit (non-YaRN) scale; block size 32
    MLACase("pipe-spec-h16-mini-bs32-bf16", (40, 70), (3, 3), num_heads=16, block_size=32, scale=0.21,
            seed=602, **MLA_MINI_DIMS),
]


@pytest.mark.parametrize("backend", ["TRITON_MLA", "ROCM_AITER_MLA"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_pipelines_pass_in_memory_cases(backend, case, device):
    v = harness.run_backend(backend, case, device=device)
    assert v.status == "pass", v.report
    info = v.info
    if case.context_chunk_tokens:
        assert info["context_chunks"] == 3  # 39 context tokens in chunks of 16
    if case.name.startswith("pipe-spec"):
        assert info["decode_rows"] == (2 if backend == "ROCM_AITER_MLA" else 0)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_aiter_decode_bucketing_pads_entries_without_changing_them(device, fp8):
    """On CUDA AITER's Triton MLA decode runs with its entries padded to a power of two and the
    split count rounded down to one (``bucketed_entries``: both are constexprs, and each new value
    compiled the kernels again). The real entries' outputs are the unpadded ones, bit for bit,
    at the same split count."""
    avail = rocm_aiter_mla.AiterMLABackend().availability(torch.device(device))
    if not avail.ok:
        pytest.skip(f"AITER's Triton kernels cannot run here: {avail.reason}")
    g = torch.Generator().manual_seed(3)
    E, N, L, R, bs = 5, 4, 64, 16, 16
    kv_lens = torch.tensor([1, 17, 40, 9, 33], dtype=torch.int32)
    blocks = -(-int(kv_lens.max()) // bs)
    table = torch.randperm(E * blocks, generator=g).reshape(E, blocks).to(torch.int32)
    cache = torch.randn(E * blocks, bs, L + R, generator=g).to(torch.bfloat16)
    if fp8:
        cache = cache.to(torch.float8_e4m3fn)
    q = torch.randn(E, N, L + R, generator=g).to(torch.bfloat16)
    dev = torch.device(device)
    args = [x.to(dev) for x in (q, cache, table, kv_lens)]
    padded, tables, lens = rocm_aiter_mla.bucketed_entries(*args[:1], *args[2:], pad=True)
    assert padded.shape[0] == 8 and tables.shape[0] == 8 and lens[5:].tolist() == [1, 1, 1]
    kw = dict(scale=0.1, kv_lora_rank=L, kv_scale=1.0, num_splits=2)
    plain = rocm_aiter_mla.aiter_triton_mla_decode(*args, **kw, bucket=False)
    bucketed = rocm_aiter_mla.aiter_triton_mla_decode(*args, **kw, bucket=True)
    assert bucketed.shape == plain.shape and torch.equal(bucketed, plain)
