"""The vLLM bench rows (impl/vllm/bench_rows.py, attncheck.bench.rows) time what they say: each callable computes the same thing as the pipeline
it stands for (run once here on the CPU interpreter; ``attncheck bench`` times them on a GPU)."""

import pytest
import torch

from attncheck import golden
from attncheck.cases import MHACase
from attncheck.cases import MLA_MINI_DIMS
from impl.backends.rocm_attn import RocmAttnBackend
from impl.backends.triton_attn import TritonAttnBackend
from impl.vllm import bench_rows, kernels, loader

try:
    VERSION, NO_VLLM = loader.load().version, None
except loader.VllmUnavailable as e:
    VERSION, NO_VLLM = None, str(e)
pytestmark = [pytest.mark.smoke, pytest.mark.skipif(VERSION is None, reason=f"vLLM's kernels cannot load here: {NO_VLLM}")]


def _batch(case, device):
    return golden.case_module(case).batch_from_tensors(case, golden.generate(case), device)


@pytest.mark.parametrize("case", [MHACase("bench-mixed", (40, 20, 9), (1, 6, 9), dtype="fp16", seed=731),
                                  MHACase("bench-decode", (70, 33), (1, 1), seed=732)], ids=lambda c: c.name)
def test_kernel_rows_compute_what_the_vllm_pipelines_compute(case, device):
    batch = _batch(case, device)
    want_triton = TritonAttnBackend(provider="vllm").run(batch).output  # writes the new K/V into batch
    want_rocm = RocmAttnBackend(provider="vllm").run(batch.clone()).output
    rows = dict(bench_rows.kernel_rows(batch))
    unified = next(fn for label, fn in rows.items() if label.startswith(bench_rows.UNIFIED_KERNEL_ROW))
    assert torch.equal(unified(), want_triton)
    assert torch.equal(rows[bench_rows.ROCM_KERNEL_ROW](), want_rocm)


def test_backend_rows_name_their_provider(device):
    batch = _batch(MHACase("bench-prefill", (12,), (12,), seed=733), device)
    from attncheck.bench.rows import provider_backend_rows

    rows = provider_backend_rows(batch)
    labels = [label for label, _ in rows]
    assert labels == [f"TRITON_ATTN [vllm=={VERSION}] backend (write + attend)",
                      "TRITON_ATTN [attncheck-stand-in] backend (write + attend)",
                      f"ROCM_ATTN [vllm=={VERSION}] backend (write + attend, NHD <-> vLLM layout each call)",
                      "ROCM_ATTN [attncheck-stand-in] backend (write + attend)"]
    outs = [fn().output for _, fn in rows]
    for o in outs[1:]:
        assert (o.float() - outs[0].float()).abs().max() < 1e-2  # same attention, four implementations


def test_mla_decode_row_is_vllms_decode_with_vllms_split_count(device):
    g = torch.Generator().manual_seed(734)
    L, R, bs, lens = MLA_MINI_DIMS["kv_lora_rank"], MLA_MINI_DIMS["rope_dim"], 16, (1100, 600)
    nblk = -(-max(lens) // bs)
    cache = torch.randn(2 * nblk, bs, L + R, generator=g).to(device, torch.bfloat16)
    table = torch.randperm(2 * nblk, generator=g).reshape(2, nblk).to(device, torch.int32)
    kv_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    q = torch.randn(2, 16, L + R, generator=g).to(device, torch.bfloat16)
    ((label, fn),) = bench_rows.mla_decode_rows(q, cache, table, kv_lens, scale=0.1, kv_lora_rank=L, max_kv_len=1100)
    splits = kernels.mla_num_kv_splits(1100)
    assert label == f"{bench_rows.MLA_DECODE_ROW}, {splits} splits"
    want, _ = kernels.mla_decode(q, cache, table, kv_lens, scale=0.1, kv_lora_rank=L, num_kv_splits=splits)
    got = fn()
    assert torch.isfinite(got).all() and torch.equal(got, want)


def test_unavailable_row_says_why():
    with pytest.raises(RuntimeError, match="vLLM not loadable: no source"):
        bench_rows.unavailable("no source")()
