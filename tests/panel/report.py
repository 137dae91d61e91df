"""Each panel member's worst error / budget ratios, member x check and member x case (issue 9).

    python -m tests.panel.report [--device cpu|cuda] [--tier smoke full] [--member NAME ...]
                                 [--out FILE] [--json FILE]

Every (member, case) pair runs through ``attncheck.harness.run_backend``, the same path the
tests use; its status is the verdict's. The first table has one line per member: the worst
output ratio (per-row error / budget, and mean error / mean budget), the worst LSE ratio
(finite rows, from ``attncheck.rule.lse_row_ratios``) with the case where each occurs, the
LSE rows over budget summed over cases, and the cache writes (bit-exact checks: the number of
cases written wrongly). The second has one line per member x case. A ratio above 1 fails;
the exit status is 1 when any pair fails. ``--json`` writes both as data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
from tabulate import tabulate

from attncheck import golden, harness
from attncheck.report import write_atomic
from attncheck.cases import get_case
from attncheck.rule import lse_row_ratios
from tests.panel.members import MEMBERS


@dataclass
class Row:
    member: str
    case: str
    tier: str
    status: str
    row_ratio: Optional[float]  # None: the rows could not be compared (e.g. a wrong output shape)
    mean_ratio: Optional[float]
    lse_ratio: Optional[float]
    lse_rows_over: int
    cache_ok: bool
    lse_check_failed: bool
    reason: str = ""
    failed_checks: list = field(default_factory=list)


def measure(member, case_name: str, device: str = "cpu") -> Row:
    case = get_case(case_name)
    tensors = harness.golden_tensors(case, device)
    v = harness.run_backend(member, case, device=device, tensors=tensors, keep_artifacts=True)
    lse = (v.artifacts or {}).get("lse")
    lse_ratio, over = None, 0
    if lse is not None and "expected.lse" in tensors:
        k = golden.case_module(case).rule_factors(case)["k_row"]
        r = lse_row_ratios(lse.to("cpu", torch.float64), {n: t.cpu() for n, t in tensors.items()}, k)
        lse_ratio, over = float(r.max()), int((r > 1.0).sum())
    failed = [c.name for c in v.checks if not c.passed]
    return Row(member=member.name, case=case.name, tier=case.tier, status=v.status, row_ratio=v.worst_ratio,
               mean_ratio=v.mean_ratio, lse_ratio=lse_ratio, lse_rows_over=over,
               cache_ok=not any(c.endswith("write") for c in failed), lse_check_failed="lse" in failed,
               reason=v.reason, failed_checks=failed)


def collect(members, tiers, device="cpu") -> list:
    rows = []
    for m in members:
        for tier in tiers:
            for case in harness.list_cases(tier=tier, kind=m.kind):
                rows.append(measure(m, case, device))
    return rows


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3f}"


def format_table(rows: list) -> str:
    head = ("member", "case", "status", "row", "mean", "lse", "lse>1", "cache")
    body = [(r.member, r.case, r.status, _fmt(r.row_ratio), _fmt(r.mean_ratio),
             _fmt(r.lse_ratio), str(r.lse_rows_over), "ok" if r.cache_ok else "FAIL") for r in rows]
    return tabulate(body, headers=head, tablefmt="simple", disable_numparse=True)


def _worst(rows: list, attr: str):
    """The row with the largest value of attr (None counts as the smallest), or None."""
    with_value = [r for r in rows if getattr(r, attr) is not None]
    return max(with_value, key=lambda r: getattr(r, attr)) if with_value else None


def summarise(rows: list) -> list:
    """One dict per member, member x check: worst output (per-row and mean), LSE and cache
    results over all its cases, with the case where each worst occurs."""
    out = []
    for name in dict.fromkeys(r.member for r in rows):
        mine = [r for r in rows if r.member == name]
        row, mean, lse = _worst(mine, "row_ratio"), _worst(mine, "mean_ratio"), _worst(mine, "lse_ratio")
        out.append({
            "member": name, "cases": len(mine), "failed": sum(r.status != "pass" for r in mine),
            "output_row": row and row.row_ratio, "output_row_case": row and row.case,
            "output_mean": mean and mean.mean_ratio, "output_mean_case": mean and mean.case,
            "lse": lse and lse.lse_ratio, "lse_case": lse and lse.case,
            "lse_rows_over": sum(r.lse_rows_over for r in mine),
            "cache_wrong": [r.case for r in mine if not r.cache_ok],
        })
    return out


def format_summary(rows: list) -> str:
    """Per member x check: worst error / budget over all its cases (> 1 fails). Cache writes are
    checked bit-exactly, so their column counts the cases with a wrong write."""
    head = ("member", "cases", "failed", "output row", "(case)", "output mean", "lse", "(case)", "lse rows>1",
            "cache")
    body = [(s["member"], str(s["cases"]), str(s["failed"]), _fmt(s["output_row"]), s["output_row_case"] or "-",
             _fmt(s["output_mean"]), _fmt(s["lse"]), s["lse_case"] or "-", str(s["lse_rows_over"]),
             f"{len(s['cache_wrong'])} wrong" if s["cache_wrong"] else "exact")
            for s in summarise(rows)]
    return tabulate(body, headers=head, tablefmt="simple", disable_numparse=True)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        print(f"{self.prog}: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv=None) -> int:
    ap = _Parser(prog="python -m tests.panel.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--tier", nargs="+", default=["smoke", "full"], choices=("smoke", "full"))
    ap.add_argument("--member", nargs="+", default=None, metavar="NAME", help="panel members (default: all)")
    ap.add_argument("--out", default=None, help="also write the tables to this file")
    ap.add_argument("--json", default=None, help="write every row as JSON to this file")
    args = ap.parse_args(argv)
    if args.device not in ("cpu", "cuda"):
        print(f"--device: expected cpu or cuda, got {args.device!r}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device: cuda requested but torch sees no CUDA device", file=sys.stderr)
        return 2
    unknown = [n for n in args.member or [] if n not in MEMBERS]
    if unknown:
        print(f"--member: unknown {', '.join(unknown)}; expected one of {', '.join(MEMBERS)}", file=sys.stderr)
        return 2
    for opt, path in (("--out", args.out), ("--json", args.json)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            print(f"{opt}: the folder of {path} does not exist", file=sys.stderr)
            return 2
    members = [MEMBERS[n] for n in args.member] if args.member else list(MEMBERS.values())
    torch.set_num_threads(1)  # tiny tensors: more CPU threads only spin (tests/panel/conftest.py)
    rows = collect(members, args.tier, args.device)
    text = (f"panel on {args.device}, tiers {' '.join(args.tier)}\n\n" + format_summary(rows)
            + "\n\n" + format_table(rows) + "\n")
    print(text, end="")
    if args.out:
        write_atomic(args.out, text.encode())
    if args.json:
        write_atomic(args.json, json.dumps({"device": args.device, "tiers": args.tier, "summary": summarise(rows),
                                      "rows": [r.__dict__ for r in rows]}, indent=1).encode())
    return 1 if any(r.status not in ("pass", "skip") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
