"""``attncheck bench``: kernels and backends x shapes on a CUDA GPU, with same-run peers.

Every time is the median of ``triton.testing.do_bench``. Throughput is TFLOP/s for prefill and
extend (4 * Hq * D * visible (query, key) pairs) and GB/s of KV read for decode; each row is
also given as a ratio to torch SDPA (flash / cuDNN on contiguous KV) and to AITER's Triton
unified attention measured in the same run, and the device's copy bandwidth (bytes read +
written by a device-to-device copy) is reported so decode rows can be read against it.
"""

from __future__ import annotations

import sys

import torch

from impl.aiter.bench_rows import BenchShape, make_batch, unified_kernel_callable


def phase(shape) -> str:
    """decode (every q_len 1), prefill (no context) or extend."""
    if all(q == 1 for q in shape.query_lens):
        return "decode"
    return "prefill" if all(q == s for q, s in zip(shape.query_lens, shape.seq_lens)) else "extend"


# bf16, 32 query / 8 KV heads, head dim 128, block 16 (BenchShape's defaults)
MHA_SHAPES = (
    BenchShape("prefill 8192 causal", (8192,), (8192,)),
    BenchShape("extend 3616 over 20000", (23616,), (3616,)),
    BenchShape("decode 64 x 4096", (4096,) * 64, (1,) * 64),
    BenchShape("decode 256 x 1024", (1024,) * 256, (1,) * 256),
)
MHA_BACKENDS = ("TRITON_ATTN", "ROCM_ATTN", "FLEX_ATTENTION", "ROCM_AITER_UNIFIED_ATTN", "ROCM_AITER_FA")


def visible_pairs(shape) -> int:
    n = 0
    for s, q in zip(shape.seq_lens, shape.query_lens):
        ctx = s - q
        n += q * ctx + q * (q + 1) // 2  # causal: query i sees ctx + i + 1 keys
    return n


def work(shape) -> tuple:
    """(amount, unit): FLOPs for prefill/extend, bytes of K+V read for decode."""
    if phase(shape) == "decode":
        elem = torch.tensor([], dtype=shape.dtype).element_size()
        return 2 * sum(shape.seq_lens) * shape.num_kv_heads * shape.head_size * elem, "GB/s"
    return 4 * shape.num_heads * shape.head_size * visible_pairs(shape), "TFLOP/s"


def rate(amount: float, unit: str, ms: float) -> float:
    return amount / (ms * 1e-3) / (1e12 if unit == "TFLOP/s" else 1e9)


def copy_bandwidth(device) -> float:
    from triton.testing import do_bench
    x = torch.empty(2 ** 29, dtype=torch.uint8, device=device)  # 512 MiB
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    return 2 * x.numel() / (ms * 1e-3) / 1e9


def _sdpa_callable(shape, device):
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


def _own_unified_callable(shape, device):
    from impl.triton import unified_attention as ua
    b = make_batch(shape, device)
    out = torch.empty_like(b.query)
    mq, ms = max(b.query_lens()), int(b.seq_lens.max())
    return lambda: ua.unified_attention(b.query, b.key_cache, b.value_cache, out, query_start_loc=b.query_start_loc,
                                        seq_lens=b.seq_lens, block_table=b.block_table, scale=b.scale,
                                        max_query_len=mq, max_seq_len=ms, split_kv=None)


def _backend_callable(name: str, shape, device):
    from attncheck.backends import get_backend
    be = get_backend(name)
    b = make_batch(shape, device)
    return lambda: be.run(b)


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
    chosen = list(backends) if backends else list(MHA_BACKENDS)
    for shape in shapes:
        amount, unit = work(shape)
        entries = [("torch SDPA (contiguous KV)", lambda s=shape: _sdpa_callable(s, device)),
                   ("AITER Triton unified_attention (kernel)", lambda s=shape: unified_kernel_callable(s, device)),
                   ("own Triton unified_attention (kernel)", lambda s=shape: _own_unified_callable(s, device))]
        entries += [(f"{n} backend (write + attend)", lambda s=shape, n=n: _backend_callable(n, s, device)) for n in chosen]
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
                sdpa = ref.get("torch SDPA (contiguous KV)")
                aiter = ref.get("AITER Triton unified_attention (kernel)")
                r["vs_sdpa"] = sdpa / r["ms"] if sdpa else None
                r["vs_aiter"] = aiter / r["ms"] if aiter else None
                if unit == "GB/s":
                    r["vs_copy_bw"] = r["rate"] / bw
        rows += shape_rows
        _print_rows(shape_rows, out)
    if with_mla:
        rows += _mla_rows(device, bw, out)
    return rows


def _mla_rows(device, bw, out) -> list:
    try:
        from impl.backends import mla_bench
    except ImportError as e:
        print(f"MLA rows: unavailable ({e})", file=out)
        return []
    rows = []
    for label, fn, nbytes in mla_bench.rows(device):
        try:
            ms = _time(fn)
            rows.append({"shape": "MLA decode 64 x 4096, 16 heads", "row": label, "ms": ms, "unit": "GB/s",
                         "rate": nbytes / (ms * 1e-3) / 1e9, "vs_copy_bw": nbytes / (ms * 1e-3) / 1e9 / bw})
        except Exception as e:
            rows.append({"shape": "MLA decode 64 x 4096, 16 heads", "row": label, "error": f"{type(e).__name__}: {e}"})
    ref = {r["row"]: r["ms"] for r in rows if "ms" in r}
    aiter = next((ms for k, ms in ref.items() if "AITER" in k), None)
    for r in rows:
        if "ms" in r and aiter:
            r["vs_aiter"] = aiter / r["ms"]
    _print_rows(rows, out)
    return rows


def _print_rows(rows, out) -> None:
    if not rows:
        return
    print(f"\n{rows[0]['shape']}", file=out)
    for r in rows:
        if "error" in r:
            print(f"  {r['row']:44} ERROR {r['error']}", file=out)
            continue
        extra = []
        for key, label in (("vs_sdpa", "x SDPA"), ("vs_aiter", "x AITER"), ("vs_copy_bw", "of copy BW")):
            if r.get(key):
                extra.append(f"{r[key]:.2f} {label}")
        print(f"  {r['row']:44} {r['ms']:9.3f} ms  {r['rate']:8.1f} {r['unit']:7}  " + ", ".join(extra), file=out)


def cmd_bench(args) -> int:
    if not torch.cuda.is_available():
        print("attncheck bench: needs a CUDA GPU (timings on the Triton interpreter mean nothing)", file=sys.stderr)
        return 2
    rows = run(backends=args.backend, with_mla=not args.no_mla)
    if args.json:
        import json

        from attncheck.report import write_atomic
        write_atomic(args.json, (json.dumps(rows, indent=1, default=str) + "\n").encode())
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="GPU: backend x shape timings with same-run SDPA/AITER ratios")
    p.add_argument("--backend", nargs="+", default=None, metavar="NAME",
                   help=f"backends to time (default: {' '.join(MHA_BACKENDS)})")
    p.add_argument("--no-mla", action="store_true", help="skip the MLA decode rows")
    p.add_argument("--json", default=None, metavar="PATH")
    p.set_defaults(func=cmd_bench)
