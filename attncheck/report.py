"""Collect verdicts from a pytest run (xdist included) and render the backend x family matrix."""

from __future__ import annotations

import json
from collections import defaultdict

STATUSES = ("pass", "fail", "xfail", "skip", "error")


class VerdictCollector:
    """A pytest plugin object: gathers the verdict each test records (also from xdist workers,
    whose reports reach the controller with their user_properties)."""

    def __init__(self, progress=None):
        self.verdicts: list = []
        self.progress = progress

    def pytest_runtest_logreport(self, report):
        for key, value in getattr(report, "user_properties", ()):
            if key == "attncheck" and report.when == "call" or (key == "attncheck" and report.skipped):
                v = json.loads(value)
                if not any(x["backend"] == v["backend"] and x["case"] == v["case"] for x in self.verdicts):
                    self.verdicts.append(v)


def matrix(verdicts: list) -> dict:
    """{backend: {family: {"pass": n, ..., "worst": ratio}}} plus an "ALL" column."""
    out: dict = defaultdict(lambda: defaultdict(lambda: {s: 0 for s in STATUSES} | {"worst": 0.0}))
    for v in verdicts:
        for fam in (v.get("family") or "-", "ALL"):
            cell = out[v["backend"]][fam]
            cell[v["status"]] += 1
            if v["status"] in ("pass", "fail", "xfail"):
                cell["worst"] = max(cell["worst"], float(v.get("worst_ratio") or 0.0))
    return out


def _cell_text(c: dict) -> str:
    parts = []
    for s, tag in (("pass", "P"), ("fail", "F"), ("xfail", "X"), ("error", "E"), ("skip", "S")):
        if c[s]:
            parts.append(f"{c[s]}{tag}")
    text = " ".join(parts) or "-"
    if c["pass"] + c["fail"] + c["xfail"]:
        text += f" {c['worst']:.2f}"
    return text


def render_matrix(verdicts: list) -> str:
    m = matrix(verdicts)
    if not m:
        return "(no results)"
    fams = sorted({f for b in m.values() for f in b if f != "ALL"}) + ["ALL"]
    rows = [["backend"] + fams]
    for b in sorted(m):
        rows.append([b] + [_cell_text(m[b][f]) if f in m[b] else "" for f in fams])
    widths = [max(len(r[i]) for r in rows) for i in range(len(fams) + 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("P pass, F fail, X expected failure (declared known issue), E error, S skip; "
                 "number = worst per-row error/budget ratio (fails above 1.00)")
    return "\n".join(lines)


def render_problems(verdicts: list, limit: int = 20) -> str:
    lines = []
    bad = [v for v in verdicts if v["status"] in ("fail", "error")]
    for v in bad[:limit]:
        lines.append(f"{v['status'].upper()} {v['backend']} :: {v['case']}: {v.get('reason', '')}")
        rep = (v.get("report") or "").strip()
        if rep:
            lines += ["    " + ln for ln in rep.splitlines()[:14]]
    if len(bad) > limit:
        lines.append(f"... and {len(bad) - limit} more")
    skips = defaultdict(int)
    for v in verdicts:
        if v["status"] == "skip":
            skips[(v["backend"], v.get("reason", ""))] += 1
    if skips:
        lines.append("skipped (backend: reason x cases):")
        for (b, r), n in sorted(skips.items()):
            lines.append(f"  {b}: {r} x{n}")
    xf = [v for v in verdicts if v["status"] == "xfail"]
    if xf:
        lines.append("expected failures:")
        for v in xf:
            lines.append(f"  {v['backend']} :: {v['case']}: {v.get('reason', '')}")
    return "\n".join(lines)
