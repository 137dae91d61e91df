"""``attncheck bench`` rows on a CUDA GPU: kernels and backends x shapes, with same-run peers.

Every time is the median of ``triton.testing.do_bench``. Each row is also given as a ratio to
torch SDPA (flash / cuDNN on contiguous KV) and to AITER's Triton unified attention measured in
the same run, and the device's copy bandwidth (bytes read + written by a device-to-device copy)
is reported so decode rows can be read against it. The backends timed are the registered MHA
backends (``attncheck.backends``), unless named.
"""

from __future__ import annotations

import sys

import torch
from tabulate import tabulate

from attncheck import backends as registry
from attncheck.bench.shapes import AITER_SHAPES, MHA_SHAPES, make_batch, rate, work

SDPA_ROW = "torch SDPA (contiguous KV)"
AITER_KERNEL_ROW = "AITER Triton unified_attention (kernel)"
OWN_KERNEL_ROW = "own Triton unified_attention (kernel)"
MLA_SHAPE = "MLA decode 64 x 4096, 16 heads"


def mha_backend_names() -> list:
    return [n for n in registry.names() if registry.kind_of(n) == "MHA"]


def copy_bandwidth(device) -> float:
    from triton.testing import do_bench
    x = torch.empty(2 ** 29, dtype=torch.uint8, device=device)  # 512 MiB
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    return 2 * x.numel() / (ms * 1e-3) / 1e9


def sdpa_callable(shape, device):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
    g = torch.Generator(device="cpu").manual_seed(0)
    B = len(shape.seq_lens)
    S, Q = shape.seq_lens[0], shape.query_lens[0]
    if any(s != S for s in shape.seq_lens) or any(q != Q for q in shape.query_lens):
        raise ValueError("the SDPA peer needs equal lengths per shape")
    H, D = shape.num_heads, shape.head_size
    q = torch.randn(B, H, Q, D, generator=g).to(device, shape.dtype)
    k = torch.randn(B, H, S, D, generator=g).to(device, shape.dtype)  # KV heads expanded: contiguous
    v = torch.randn(B, H, S, D, generator=g).to(device, shape.dtype)
    if Q == 1:
        kw = {}
    elif Q == S:
        kw = {"is_causal": True}
    else:
        kw = {"attn_mask": causal_lower_right(Q, S)}

    def call():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, **kw)
    return call


def aiter_unified_callable(shape, device):
    """AITER's Triton ``unified_attention`` alone (cache already written)."""
    from impl.aiter import triton_kernels

    b = make_batch(shape, device)
    out = torch.empty_like(b.query)
    qlens = b.query_lens()
    kw = dict(cu_seqlens_q=b.query_start_loc, max_seqlen_q=max(qlens), seqused_k=b.seq_lens,
              max_seqlen_k=int(b.seq_lens.max()), block_table=b.block_table, scale=b.scale)
    return lambda: triton_kernels.unified_attention(b.query, b.key_cache, b.value_cache, out, **kw)


def own_unified_callable(shape, device):
    from impl.triton import unified_attention as ua
    b = make_batch(shape, device)
    out = torch.empty_like(b.query)
    mq, ms = max(b.query_lens()), int(b.seq_lens.max())
    return lambda: ua.unified_attention(b.query, b.key_cache, b.value_cache, out, query_start_loc=b.query_start_loc,
                                        seq_lens=b.seq_lens, block_table=b.block_table, scale=b.scale,
                                        max_query_len=mq, max_seq_len=ms, split_kv=None)


def backend_callable(name: str, shape, device):
    """One ``run(batch)`` of a registered backend (cache write included, as in vLLM's forward);
    the caches are rewritten at the same slots each call, so repeated calls are identical."""
    be = registry.get_backend(name)
    b = make_batch(shape, device)
    return lambda: be.run(b)


def vllm_entries(shape, device, chosen) -> list:
    """Last in each shape: vLLM's kernels alone, and TRITON_ATTN / ROCM_ATTN under the provider
    the registry rows did not time (a row that cannot be built says why in the table)."""
    from impl.vllm import bench_rows, loader

    try:
        loader.load()
    except loader.VllmUnavailable as e:
        return [(bench_rows.UNIFIED_KERNEL_ROW, lambda e=e: bench_rows.unavailable(e))]
    batch = make_batch(shape, device)
    names = [n for n in ("TRITON_ATTN", "ROCM_ATTN") if n in chosen]
    other = {n: "stand-in" if registry.get_backend(n).provider.startswith("vllm") else "vllm" for n in names}
    rows = [(label, lambda fn=fn: fn) for label, fn in bench_rows.kernel_rows(batch)]
    for n in names:
        rows += [(label, lambda fn=fn: fn) for label, fn in provider_backend_rows(batch, (n,), (other[n],))]
    return rows


def provider_backend_rows(batch, names=("TRITON_ATTN", "ROCM_ATTN"), providers=("vllm", "stand-in")) -> list:
    """One ``run(batch)`` per backend and provider, labelled with the provider (cache write
    included; ROCM_ATTN's vLLM pipeline also converts the NHD cache to vLLM's layout and back on
    every call, which the label says)."""
    rows = []
    for name in names:
        cls = type(registry.get_backend(name))
        for preference in providers:
            be = cls(provider=preference)
            extra = ", NHD <-> vLLM layout each call" if name == "ROCM_ATTN" and preference == "vllm" else ""
            rows.append((f"{name} [{be.provider}] backend (write + attend{extra})", lambda be=be: be.run(batch)))
    return rows


def aiter_rows(shapes=AITER_SHAPES, device="cuda") -> list:
    """[(row name, callable)]: AITER's unified kernel and both AITER backends per shape."""
    out = []
    for s in shapes:
        out.append((f"aiter.unified_attention kernel / {s.name}", aiter_unified_callable(s, device)))
        for name in ("ROCM_AITER_UNIFIED_ATTN", "ROCM_AITER_FA"):
            out.append((f"{name} / {s.name}", backend_callable(name, s, device)))
    return out


def _time(fn) -> float:
    from triton.testing import do_bench
    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def run(backends=None, shapes=MHA_SHAPES, device="cuda", with_mla=True, out=sys.stdout) -> list:
    device = torch.device(device)
    rows = []
    bw = copy_bandwidth(device)
    print(f"device: {torch.cuda.get_device_name(device)}; copy bandwidth {bw:.0f} GB/s (read + write)", file=out)
    chosen = list(backends) if backends else mha_backend_names()
    for shape in shapes:
        amount, unit = work(shape)
        entries = [(SDPA_ROW, lambda s=shape: sdpa_callable(s, device)),
                   (AITER_KERNEL_ROW, lambda s=shape: aiter_unified_callable(s, device)),
                   (OWN_KERNEL_ROW, lambda s=shape: own_unified_callable(s, device))]
        entries += [(f"{n} [{registry.get_backend(n).provider}] backend (write + attend)",
                     lambda s=shape, n=n: backend_callable(n, s, device)) for n in chosen]
        entries += vllm_entries(shape, device, chosen)
        shape_rows = []
        for label, make in entries:
            try:
                ms = _time(make())
                shape_rows.append({"shape": shape.name, "row": label, "ms": ms, "unit": unit,
                                   "rate": rate(amount, unit, ms)})
            except Exception as e:  # reported in the table, never silently dropped
                shape_rows.append({"shape": shape.name, "row": label, "error": f"{type(e).__name__}: {str(e)[:120]}"})
            torch.cuda.empty_cache()
        ref = {r["row"]: r["ms"] for r in shape_rows if "ms" in r}
        for r in shape_rows:
            if "ms" in r:
                r["vs_sdpa"] = ref[SDPA_ROW] / r["ms"] if SDPA_ROW in ref else None
                r["vs_aiter"] = ref[AITER_KERNEL_ROW] / r["ms"] if AITER_KERNEL_ROW in ref else None
                if unit == "GB/s":
                    r["vs_copy_bw"] = r["rate"] / bw
        rows += shape_rows
        print_rows(shape_rows, out)
    if with_mla:
        rows += mla_rows(device, bw, out)
    return rows


def mla_rows(device, bw, out) -> list:
    from attncheck.bench import mla

    rows = []
    for label, fn, nbytes in mla.rows(device):
        try:
            ms = _time(fn)
            gbs = nbytes / (ms * 1e-3) / 1e9
            rows.append({"shape": MLA_SHAPE, "row": label, "ms": ms, "unit": "GB/s", "rate": gbs,
                         "vs_copy_bw": gbs / bw})
        except Exception as e:
            rows.append({"shape": MLA_SHAPE, "row": label, "error": f"{type(e).__name__}: {e}"})
    aiter = next((r["ms"] for r in rows if "ms" in r and "AITER" in r["row"]), None)
    for r in rows:
        if "ms" in r and aiter:
            r["vs_aiter"] = aiter / r["ms"]
    print_rows(rows, out)
    return rows


def table(rows) -> str:
    """One shape's rows as a table (time, throughput, ratios; errors in place)."""
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["row"], "ERROR", r["error"], "", "", ""])
            continue
        ratios = [f"{r[k]:.2f}" if r.get(k) else "" for k in ("vs_sdpa", "vs_aiter", "vs_copy_bw")]
        body.append([r["row"], f"{r['ms']:.3f}", f"{r['rate']:.1f} {r['unit']}", *ratios])
    return tabulate(body, headers=["row", "ms", "throughput", "x SDPA", "x AITER", "of copy BW"],
                    tablefmt="simple", disable_numparse=True)


def print_rows(rows, out) -> None:
    if rows:
        print(f"\n{rows[0]['shape']}\n{table(rows)}", file=out)
