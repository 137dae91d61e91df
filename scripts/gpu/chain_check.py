"""sweep:0:79 (large sizes) on the GPU through ROCM_AITER_MLA, as the last H200 sweep drew it (a
946-chunk context of 13 tokens; it failed one row at ratio 1.27 under the budgets of the time)
and as the sweep draws it now (at most sweep.MAX_CONTEXT_CHUNKS chunks). Prints each run's
verdict, its worst rows, and the row that failed (token 671, head 2): the kernel's error and
the budget's terms, the merge-chain bound (pipeline_row) among them.

    PYTHONPATH=.gpu/site:. python3 scripts/gpu/chain_check.py [DEVICE [SIZES [INDEX]]]

DEVICE cuda (default) or cpu; SIZES large (default) or small; INDEX of seed 0 (default 79). A CPU
dry run: ``TRITON_INTERPRET=1 python3 scripts/gpu/chain_check.py cpu small 243`` (the row shown
is then the batch's last, head 0).
"""

import dataclasses
import sys
import time

import torch

from attncheck import golden, harness, rule, sweep

args = sys.argv[1:] + ["cuda", "large", "79"][len(sys.argv) - 1:]
device, sizes, index = args[0], args[1], int(args[2])
drawn = sweep.config(0, index, sweep.SIZES[sizes])
failed_row = (671, 2) if (sizes, index) == ("large", 79) else None  # last session's failing row
for chunk in (13, drawn.context_chunk_tokens):
    case = dataclasses.replace(drawn, context_chunk_tokens=chunk)
    t0 = time.perf_counter()
    module = golden.case_module(case)
    tensors = module.build_live(case, device)
    oracle = time.perf_counter() - t0
    v = harness.run_backend("ROCM_AITER_MLA", case, device, tensors=tensors, keep_artifacts=True)
    print(f"== chunk {chunk} (context chunks {-(-max(s - q for q, s in zip(case.query_lens, case.seq_lens)) // chunk)}): "
          f"{v.status}, worst ratio {v.worst_ratio}, mean ratio {v.mean_ratio}; oracle {oracle:.1f} s, "
          f"check {v.seconds:.1f} s; {v.reason[:160]}")
    out = v.artifacts.get("output") if v.artifacts else None
    if out is None:
        continue
    k = module.rule_factors(case)["k_row"]
    err = (out.double() - tensors["expected.output"].double()).abs().amax(dim=-1)
    budget = rule.row_budget(tensors, k)
    ratio = err / budget
    top = torch.topk(ratio.flatten(), 5)
    H = ratio.shape[1]
    for r, i in zip(top.values.tolist(), top.indices.tolist()):
        t, h = divmod(i, H)
        print(f"   row token {t} head {h}: error {err[t, h]:.3e} budget {budget[t, h]:.3e} ratio {r:.3f}")
    t, h = failed_row or (int(err.shape[0]) - 1, 0)
    terms = {n: float(tensors[n][t, h]) for n in ("budget.pt_err_row", "budget.round_row", "budget.pipeline_row")}
    print(f"   token {t} head {h}: error {err[t, h]:.3e}, budget {budget[t, h]:.3e} (k={k}: {terms}), "
          f"|expected| max {tensors['expected.output'][t, h].abs().max():.3e}")
