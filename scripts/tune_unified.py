"""Time (and optionally sweep tile configs of) impl.triton.unified_attention on a CUDA GPU.

Workloads of the issue (bf16, 32 query / 8 KV heads, head dim 128, block 16):
  prefill  8192 causal                      -> TFLOP/s (causal pairs only)
  extend   3616 new tokens over 20000 context -> TFLOP/s
  decode   64 x 4096 and 256 x 1024         -> GB/s of KV read, against a device copy's bandwidth
Also times torch SDPA (flash) on the prefill for scale, and checks each run against SDPA / the
2-D path so a fast wrong config is never reported.

    python scripts/tune_unified.py [--sweep] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys

import torch
import triton
import triton.testing

from impl.triton import unified_attention as ua

HQ, HKV, D, BS = 32, 8, 128, 16
DT = torch.bfloat16


def make(seq_lens, query_lens, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    B = len(seq_lens)
    blocks = [-(-s // BS) for s in seq_lens]
    nb = sum(blocks)
    perm = torch.randperm(nb, device="cuda", generator=g).to(torch.int32)
    bt = torch.zeros(B, max(blocks), dtype=torch.int32, device="cuda")
    o = 0
    for b, n in enumerate(blocks):
        bt[b, :n] = perm[o:o + n]
        o += n
    kc = torch.randn(nb, BS, HKV, D, device="cuda", dtype=DT, generator=g)
    vc = torch.randn(nb, BS, HKV, D, device="cuda", dtype=DT, generator=g)
    T = sum(query_lens)
    q = torch.randn(T, HQ, D, device="cuda", dtype=DT, generator=g)
    qsl = torch.tensor([0] + list(itertools.accumulate(query_lens)), dtype=torch.int32, device="cuda")
    sl = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    return dict(q=q, kc=kc, vc=vc, bt=bt, qsl=qsl, sl=sl, mq=max(query_lens), ms=max(seq_lens))


def call(w, out, config=None, split=None):
    return ua.unified_attention(w["q"], w["kc"], w["vc"], out, query_start_loc=w["qsl"], seq_lens=w["sl"],
                                block_table=w["bt"], scale=1 / math.sqrt(D), causal=True,
                                max_query_len=w["mq"], max_seq_len=w["ms"], split_kv=split, config=config)


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100)


def causal_pairs(seq_lens, query_lens):
    return sum(q * (s - q) + q * (q + 1) // 2 for s, q in zip(seq_lens, query_lens))


def copy_bandwidth(nbytes):
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * nbytes / ms / 1e6  # GB/s (read + write)


def sdpa_prefill(n):
    q = torch.randn(1, HQ, n, D, device="cuda", dtype=DT)
    k = torch.randn(1, HKV, n, D, device="cuda", dtype=DT)
    v = torch.randn(1, HKV, n, D, device="cuda", dtype=DT)
    f = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        try:
            return bench(f)
        except RuntimeError:
            return None


def check_prefill(w, out):
    # seq_len == q_len, so top-left and bottom-right causal coincide: SDPA is a valid check here.
    q = w["q"].transpose(0, 1)[None]
    n = w["q"].shape[0]
    bt = w["bt"][0]
    pos = torch.arange(n, device="cuda")
    blk = bt[pos // BS].long()
    k = w["kc"][blk, pos % BS].transpose(0, 1)[None]
    v = w["vc"][blk, pos % BS].transpose(0, 1)[None]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return float((out.transpose(0, 1)[None].float() - ref.float()).abs().max())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "torch": torch.__version__}

    pre = make([8192], [8192])
    ext = make([23616], [3616])
    flops_pre = 4 * D * HQ * causal_pairs([8192], [8192])
    flops_ext = 4 * D * HQ * causal_pairs([23616], [3616])
    out_pre = torch.empty_like(pre["q"])
    out_ext = torch.empty_like(ext["q"])

    def prefill_extend(cfg):
        call(pre, out_pre, cfg)
        err = check_prefill(pre, out_pre)
        t_pre = bench(lambda: call(pre, out_pre, cfg))
        t_ext = bench(lambda: call(ext, out_ext, cfg))
        return {"prefill_tflops": flops_pre / t_pre / 1e9, "extend_tflops": flops_ext / t_ext / 1e9,
                "prefill_ms": t_pre, "extend_ms": t_ext, "max_abs_err_vs_sdpa": err}

    res["default_prefill_extend"] = prefill_extend(None)
    t_sdpa = sdpa_prefill(8192)
    res["sdpa_flash_prefill_tflops"] = flops_pre / t_sdpa / 1e9 if t_sdpa else None
    print(json.dumps(res, indent=1), flush=True)

    decodes = {"64x4096": make([4096] * 64, [1] * 64), "256x1024": make([1024] * 256, [1] * 256)}
    kv_bytes = {k: 2 * sum(w["sl"].tolist()) * HKV * D * 2 for k, w in decodes.items()}
    res["copy_GBps"] = copy_bandwidth(1 << 30)

    def decode(cfg, split):
        r = {}
        for name, w in decodes.items():
            out = torch.empty_like(w["q"])
            ref = torch.empty_like(w["q"])
            call(w, ref, None, split=False)
            call(w, out, cfg, split=split)
            t = bench(lambda: call(w, out, cfg, split=split))
            r[name] = {"ms": t, "GBps": kv_bytes[name] / t / 1e6,
                       "err_vs_2d": float((out.float() - ref.float()).abs().max())}
        return r

    res["default_decode"] = decode(None, None)
    res["decode_2d"] = decode(None, False)
    print(json.dumps(res, indent=1), flush=True)

    if args.sweep:
        sweep = []
        for bm, bn, nw, ns in [(128, 64, 4, 3), (128, 64, 4, 4), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 4, 3),
                               (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 4)]:
            cfg = ua.TileConfig(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns)
            try:
                r = prefill_extend(cfg)
            except Exception as e:  # out of shared memory etc.
                r = {"error": str(e)[:120]}
            r["cfg"] = [bm, bn, nw, ns]
            sweep.append(r)
            print(r, flush=True)
        res["prefill_sweep"] = sweep
        dsweep = []
        for bn, nw, ns, seg in [(128, 4, 4, 4), (128, 4, 3, 4), (64, 4, 3, 4), (128, 4, 4, 2), (128, 8, 4, 4), (64, 4, 4, 2)]:
            cfg = ua.TileConfig(block_m=16, block_n=bn, num_warps=nw, num_stages=ns, num_segments=seg)
            try:
                r = decode(cfg, True)
            except Exception as e:
                r = {"error": str(e)[:120]}
            r["cfg"] = [bn, nw, ns, seg]
            dsweep.append(r)
            print(r, flush=True)
        res["decode_sweep"] = dsweep
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
