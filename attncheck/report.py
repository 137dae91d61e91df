"""Verdicts of a run: gathered from pytest (xdist workers included) as data, and rendered as the
backend x family matrix, the list of problems, JSON and JUnit XML.

The pytest plugin attaches each verdict to its test report as a plain dict
(``report.attncheck_verdict``); xdist carries report attributes from the workers to the
controller, where ``VerdictCollector`` turns them back into ``Verdict`` objects.
"""

from __future__ import annotations

import json
import os
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

from tabulate import tabulate

from attncheck.harness import STATUSES, Verdict, json_safe

REPORT_ATTRIBUTE = "attncheck_verdict"
CELL_TAGS = (("pass", "P"), ("fail", "F"), ("xfail", "X"), ("error", "E"), ("skip", "S"))
LEGEND = ("P pass, F fail, X expected failure (declared known issue), E error, S skip; number = worst "
          "per-row error/budget ratio (fails above 1.00); n/a = a failure with no per-row ratio "
          "(wrong output shape or dtype, a rejected batch)")
REPORT_LINES = 20  # lines of each problem's report in the text listing (the JSON has all of it)


class VerdictCollector:
    """A pytest plugin object that gathers the verdict of every backend x case test."""

    def __init__(self):
        self.verdicts: list = []
        self._seen: set = set()

    def pytest_runtest_logreport(self, report):
        data = getattr(report, REPORT_ATTRIBUTE, None)
        if data is None:
            return
        key = (data["backend"], data["case"])
        if key not in self._seen:
            self._seen.add(key)
            self.verdicts.append(Verdict.from_dict(data))

    def sorted(self) -> list:
        return sorted(self.verdicts, key=lambda v: (v.backend, v.case))


def matrix(verdicts: list) -> dict:
    """{backend: {family: {"pass": n, ..., "worst": ratio or None, "unrated_failures": n}}},
    with an "ALL" column."""
    def new_cell():
        return {s: 0 for s in STATUSES} | {"worst": None, "unrated_failures": 0}
    out: dict = defaultdict(lambda: defaultdict(new_cell))
    for v in verdicts:
        for fam in (v.family or "-", "ALL"):
            cell = out[v.backend][fam]
            cell[v.status] += 1
            if v.status not in ("pass", "fail", "xfail"):
                continue
            if v.worst_ratio is None:
                cell["unrated_failures"] += v.status != "pass"
            else:
                cell["worst"] = max(cell["worst"] or 0.0, float(v.worst_ratio))
    return {b: dict(fams) for b, fams in out.items()}


def providers(verdicts: list) -> dict:
    """{backend: the provider(s) its verdicts ran, e.g. "vllm==0.33.0"} (a comma-separated list
    if a run mixed providers)."""
    seen: dict = defaultdict(set)
    for v in verdicts:
        seen[v.backend].add(v.provider or "?")
    return {b: ", ".join(sorted(p)) for b, p in seen.items()}


def _cell_text(c: dict) -> str:
    text = " ".join(f"{c[s]}{tag}" for s, tag in CELL_TAGS if c[s]) or "-"
    if c["unrated_failures"]:
        text += " n/a"
    elif c["worst"] is not None:
        text += f" {c['worst']:.2f}"
    return text


def render_matrix(verdicts: list) -> str:
    m = matrix(verdicts)
    if not m:
        return "(no results)"
    fams = sorted({f for b in m.values() for f in b if f != "ALL"}) + ["ALL"]
    prov = providers(verdicts)
    rows = [[b, prov[b]] + [_cell_text(m[b][f]) if f in m[b] else "" for f in fams] for b in sorted(m)]
    return tabulate(rows, headers=["backend", "provider"] + fams, tablefmt="simple") + "\n\n" + LEGEND


def _indented_report(v: Verdict) -> list:
    lines = (v.report or "").strip().splitlines()
    shown = ["    " + ln for ln in lines[:REPORT_LINES]]
    if len(lines) > REPORT_LINES:
        shown.append(f"    ... {len(lines) - REPORT_LINES} more lines (the JSON report has them all)")
    return shown


def render_problems(verdicts: list) -> str:
    """Every failure and error (each with the head of its report), skips grouped by reason,
    expected failures with their declared issue."""
    lines = []
    bad = [v for v in verdicts if v.status in ("fail", "error")]
    if bad:
        lines.append(f"{len(bad)} failure(s) and error(s):")
    for v in bad:
        lines.append(f"{v.status.upper()} {v.backend} :: {v.case}: {v.reason}")
        lines += _indented_report(v)
    skips: dict = defaultdict(int)
    for v in verdicts:
        if v.status == "skip":
            skips[(v.backend, v.reason)] += 1
    if skips:
        lines.append("skipped (backend: reason x cases):")
        lines += [f"  {b}: {r} x{n}" for (b, r), n in sorted(skips.items())]
    xfails = [v for v in verdicts if v.status == "xfail"]
    if xfails:
        lines.append("expected failures:")
        lines += [f"  {v.backend} :: {v.case}: {v.reason}" for v in xfails]
    return "\n".join(lines)


def counts(verdicts: list) -> dict:
    return {s: sum(v.status == s for v in verdicts) for s in STATUSES}


# ---- files --------------------------------------------------------------------------------------

def check_writable(path, option: str) -> Path:
    """Fail before a run, not after it: ``path`` must name a file we can create or replace.
    Raises ValueError naming ``option``; leaves nothing behind."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{option} {path}: is a directory; expected a file path")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"{option} {path}: directory {parent} does not exist")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{p.name}.", suffix=".probe")
    except OSError as e:
        raise ValueError(f"{option} {path}: cannot write there ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)
    return p


def write_atomic(path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and one rename (never half-written)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def json_report(verdicts: list, settings, environment: dict, extra: dict | None = None) -> dict:
    """The run as JSON; ``extra`` adds sections (``timing``: attncheck.timing.summary;
    ``sweep``: ``sweep_report``)."""
    return json_safe({"device": settings.device, "tier": settings.tier, "provider": settings.provider,
                      "counts": counts(verdicts), "verdicts": [v.as_dict() for v in verdicts],
                      "matrix": matrix(verdicts), "providers": providers(verdicts), "environment": environment,
                      **(extra or {})})


def write_json(path, verdicts: list, settings, environment: dict, extra: dict | None = None) -> None:
    text = json.dumps(json_report(verdicts, settings, environment, extra), indent=1, allow_nan=False)
    write_atomic(path, (text + "\n").encode())


# ---- sweep ----------------------------------------------------------------------------------------

def sweep_report(verdicts: list, pair_counts: dict, *, seed: int, count: int, sizes, shapes, names: list,
                 wall: float, budget, budget_reached: bool) -> dict:
    """What a sweep ran: per backend how many configurations of its kind there were, how many
    its capabilities accepted and how many it ran (and how they ended), which configurations
    ran, the axis values they covered, throughput and the time budget."""
    from attncheck import sweep

    ran = [v for v in verdicts if v.status != "skip"]
    per_backend = {}
    for b, c in sorted(pair_counts.items()):
        mine = [v for v in verdicts if v.backend == b]
        per_backend[b] = dict(c, ran=sum(v.status != "skip" for v in mine),
                              **{s: sum(v.status == s for v in mine) for s in STATUSES})
    run_names = sorted({v.case for v in ran}, key=lambda n: sweep.parse_name(n)[1])
    run_cases = [sweep.case_from_name(n, sizes, shapes) for n in run_names]
    drawn = len(names) if names else count
    return {
        "seed": seed, "sizes": sizes.name, "shape_classes": sweep.class_table(seed, sizes, shapes),
        "configurations_drawn": drawn, "configurations_run": len(run_names),
        "configurations_run_names": run_names if len(run_names) <= 50 else run_names[:50] + ["..."],
        "checks": len(ran), "failures": sum(v.status in ("fail", "error") for v in ran),
        "expected_failures": sum(v.status == "xfail" for v in ran),
        "per_backend": per_backend, "coverage": sweep.coverage(run_cases, sizes),
        "wall_seconds": round(wall, 3), "checks_per_second": round(len(ran) / wall, 3) if wall > 0 else None,
        "time_budget_seconds": budget, "time_budget_reached": budget_reached,
    }


def render_sweep(r: dict) -> str:
    classes = r["shape_classes"]
    n_mha = sum(c["kind"] == "MHA" for c in classes)
    head = (f"sweep seed {r['seed']} ({r['sizes']} sizes, {n_mha} MHA + {len(classes) - n_mha} MLA shape classes): "
            f"{r['configurations_run']} of {r['configurations_drawn']} configurations run, {r['checks']} checks in "
            f"{r['wall_seconds']:.1f} s ({r['checks_per_second'] or 0:.2f} checks/s), failures: {r['failures']}, "
            f"expected failures: {r['expected_failures']}")
    if r["time_budget_seconds"]:
        head += (f"; time budget {r['time_budget_seconds']:g} s "
                 + ("reached: the run stopped there" if r["time_budget_reached"] else "not reached"))
    rows = []
    for b, c in r["per_backend"].items():
        filtered = ", ".join(f"{why} x{n}" for why, n in sorted(c["filtered_by_capability"].items(),
                                                                    key=lambda kv: -kv[1])[:3])
        rows.append([b, c["configurations_of_its_kind"], c["accepted"], c["ran"], c["pass"], c["fail"], c["xfail"],
                     c["error"], filtered])
    table = tabulate(rows, headers=["backend", "of its kind", "accepted", "ran", "pass", "fail", "xfail", "error",
                                    "filtered by capability (top reasons)"], tablefmt="simple")
    return head + "\n" + table


def junit_xml(verdicts: list, suite: str = "attncheck") -> bytes:
    """JUnit XML: a fail is a <failure>, an error (the backend raised) an <error>, a skip
    <skipped>; an expected failure (declared known issue) is not a skip: it counts among the
    tests, carries the property attncheck.status=xfail, and the suite's ``xfailed`` attribute."""
    n = counts(verdicts)
    root = ET.Element("testsuites")
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(verdicts)), failures=str(n["fail"]),
                       errors=str(n["error"]), skipped=str(n["skip"]), xfailed=str(n["xfail"]),
                       time=f"{sum(v.seconds for v in verdicts):.3f}")
    for v in verdicts:
        tc = ET.SubElement(ts, "testcase", classname=f"attncheck.{v.backend}", name=v.case, time=f"{v.seconds:.3f}")
        props = ET.SubElement(tc, "properties")
        for key in ("status", "provider", "family", "tier", "device", "worst_ratio"):
            ET.SubElement(props, "property", name=f"attncheck.{key}", value=str(getattr(v, key)))
        if v.status == "fail":
            ET.SubElement(tc, "failure", message=v.reason).text = v.report
        elif v.status == "error":
            ET.SubElement(tc, "error", message=v.reason).text = v.report
        elif v.status == "skip":
            ET.SubElement(tc, "skipped", message=v.reason)
        elif v.status == "xfail":
            ET.SubElement(tc, "system-out").text = f"expected failure: {v.reason}\n{v.report}"
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"
