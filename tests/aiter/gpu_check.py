"""Manual GPU check of the AITER backends (not collected by pytest): loader, the CUDA-only
strip patch (negative control in a subprocess), smoke/full/large cases, bench rows.

    python tests/aiter/gpu_check.py [smoke,full,large] [bench]
"""
import os
import subprocess
import sys
import time

import torch

from attncheck import cases as catalogue
from attncheck import golden, harness
from impl.aiter import loader

NEG = r"""
import torch
from impl.aiter import triton_kernels as tk
q = torch.randn(4, 8, 64, device="cuda", dtype=torch.float16)
kc = torch.randn(4, 16, 2, 64, device="cuda", dtype=torch.float16); vc = torch.randn_like(kc)
i32 = lambda x: torch.tensor(x, dtype=torch.int32, device="cuda")
try:
    tk.unified_attention(q, kc, vc, torch.empty_like(q), cu_seqlens_q=i32([0, 4]), max_seqlen_q=4,
                         seqused_k=i32([20]), max_seqlen_k=20, block_table=i32([[0, 1]]), scale=0.125)
    torch.cuda.synchronize(); print("NEG: ran without the strip patch")
except Exception as e:
    print("NEG:", type(e).__name__, str(e)[:200])
"""


def main():
    tiers = (sys.argv[1] if len(sys.argv) > 1 else "smoke").split(",")
    head = [f"{loader.load().describe()} | triton {__import__('triton').__version__} | torch {torch.__version__}"
            f" | {torch.cuda.get_device_name()}"]
    env = dict(os.environ, ATTNCHECK_AITER_PATCH_STRIP_AMD_LAUNCH_OPTIONS="0")
    r = subprocess.run([sys.executable, "-c", NEG], env=env, capture_output=True, text=True)
    head.append((r.stdout + r.stderr).strip().splitlines()[-1] if (r.stdout + r.stderr).strip() else "NEG: no output")
    for tier in tiers:
        for name in harness.list_cases(tier=tier, kind="MHA"):
            case = catalogue.get_case(name)
            t0 = time.time()
            tensors = golden.generate(case) if tier != "large" else None
            for be in ("ROCM_AITER_UNIFIED_ATTN", "ROCM_AITER_FA"):
                v = harness.run_backend(be, case, device="cuda", tensors=tensors)
                if v.status == "pass" and tier == "smoke":
                    continue
                print(f"{v.status:5s} {v.worst_ratio or 0.0:8.3f} {v.seconds:5.1f}s {be:24s} {name} {v.reason[:110]}", flush=True)
                if v.status in ("fail", "error"):
                    print("   ", v.report[-900:].replace("\n", "\n    "))
            print(f"   ({time.time() - t0:.1f}s)", flush=True)
    if "bench" in sys.argv:
        from attncheck.bench.rows import aiter_rows
        for row, fn in aiter_rows(device="cuda"):
            fn(); torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(20):
                fn()
            e.record(); torch.cuda.synchronize()
            print(f"bench {row}: {s.elapsed_time(e) / 20:.3f} ms")
    print("\n".join(head))


if __name__ == "__main__":
    main()
