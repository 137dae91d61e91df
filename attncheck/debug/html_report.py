"""A self-contained HTML page of a verify run and/or bundles: the backend x family matrix, each
failure's localized rows, and its error maps (PNG, embedded as base64: the page needs no other
file and no network)."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Optional

from attncheck import report
from attncheck.debug import bundle as bundle_mod
from attncheck.debug import errormap, replay

CSS = """
body { font-family: sans-serif; margin: 24px; color: #1d1d1d; max-width: 1500px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
h3 { font-size: 15px; margin: 22px 0 6px; padding: 6px 8px; background: #f3f3f3; border-left: 5px solid #c62828; }
h3.error { border-left-color: #6a1b9a; }
.meta { color: #555; font-size: 13px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #eee; }
td.pass { background: #e3f4e1; } td.fail { background: #fbdada; } td.error { background: #ecdcf2; }
td.xfail { background: #fff1cc; } td.skip { background: #f4f4f4; color: #777; }
td.num { text-align: right; font-family: monospace; }
pre { background: #fafafa; border: 1px solid #ddd; padding: 8px; font-size: 12px; overflow-x: auto; }
figure { margin: 10px 0; } figcaption { font-size: 12px; color: #444; margin-bottom: 4px; }
img { max-width: 100%; border: 1px solid #ddd; }
code { background: #f2f2f2; padding: 1px 4px; }
"""


def _esc(x) -> str:
    return html.escape(str(x))


def _cell(c: dict) -> tuple[str, str]:
    cls = next((s for s in ("error", "fail", "xfail", "pass", "skip") if c.get(s)), "skip")
    return report._cell_text(c), cls


def matrix_html(verdicts: list) -> str:
    from attncheck.harness import Verdict
    m = report.matrix([Verdict.from_dict(v) for v in verdicts])
    if not m:
        return "<p>(no results)</p>"
    fams = sorted({f for b in m.values() for f in b if f != "ALL"}) + ["ALL"]
    out = ["<table><tr><th>backend</th>" + "".join(f"<th>{_esc(f)}</th>" for f in fams) + "</tr>"]
    for b in sorted(m):
        cells = []
        for f in fams:
            if f in m[b]:
                text, cls = _cell(m[b][f])
                cells.append(f'<td class="{cls}">{_esc(text)}</td>')
            else:
                cells.append("<td></td>")
        out.append(f"<tr><th>{_esc(b)}</th>{''.join(cells)}</tr>")
    out.append("</table><p class=meta>P pass, F fail, X expected failure (declared known issue), E error, "
               "S skip; the number is the worst per-row error/budget ratio (fails above 1.00; n/a: a failure "
               "with no ratio, such as a wrong shape).</p>")
    return "\n".join(out)


def _num(x, fmt: str) -> str:
    """A row's number (JSON may carry non-finite ones as "nan"/"inf" strings); "-" when unknown."""
    try:
        value = float(x)
    except (TypeError, ValueError):
        return "-"
    return "-" if value != value else format(value, fmt)


def rows_html(rows: list) -> str:
    if not rows:
        return ""
    out = ["<table><tr><th>check</th><th>where</th><th>error</th><th>budget</th><th>ratio</th></tr>"]
    for r in rows:
        out.append(f"<tr><td>{_esc(r.get('check', ''))}</td><td>{_esc(r.get('where', ''))}</td>"
                   f"<td class=num>{_num(r.get('error'), '.3e')}</td><td class=num>{_num(r.get('budget'), '.3e')}</td>"
                   f"<td class=num>{_num(r.get('ratio'), '.2f')}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def _img(png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><figcaption>{_esc(caption)}</figcaption><img alt="{_esc(caption)}" src="data:image/png;base64,{data}"></figure>'


def bundle_maps_html(path) -> str:
    try:
        b = bundle_mod.read(path)
        maps = replay.recorded_maps(b)
        figs = errormap.maps_pngs(b.case, b.tensors, b.actual, maps, f"{b.backend} on {b.case.name}")
    except Exception as e:  # a broken bundle must not take the whole page down: say so in place
        return f"<p><b>error map unavailable</b>: {_esc(type(e).__name__)}: {_esc(e)}</p>"
    if not figs:
        return "<p>(no output to map: the backend raised before returning one)</p>"
    return "\n".join(_img(png, cap) for cap, png in figs)


def _recorded_rows(path) -> list:
    if not path:
        return []
    try:
        return bundle_mod.read_raw(path)[1].get("verdict", {}).get("failing_rows", [])
    except Exception:  # the maps section reports an unreadable bundle
        return []


def failure_html(v: dict) -> str:
    status = v.get("status", "")
    parts = [f'<h3 class="{_esc(status)}">{_esc(status.upper())} {_esc(v.get("backend"))} :: {_esc(v.get("case"))}</h3>']
    if v.get("reason"):
        parts.append(f"<p class=meta>{_esc(v['reason'])}</p>")
    parts.append(rows_html(v.get("failing_rows") or _recorded_rows(v.get("bundle"))))
    path = v.get("bundle")
    if path:
        parts.append(f"<pre># repro bundle: {_esc(path)}\n"
                     f"attncheck replay {_esc(path)} --backend {_esc(v.get('backend'))}\n"
                     f"attncheck minimize {_esc(path)} --backend {_esc(v.get('backend'))}</pre>")
        parts.append(bundle_maps_html(path))
    if v.get("report"):
        parts.append(f"<details><summary>full report</summary><pre>{_esc(v['report'])}</pre></details>")
    return "\n".join(p for p in parts if p)


def verdicts_from_bundles(paths: list) -> list:
    out = []
    for p in paths:
        b = bundle_mod.read(p)
        v = dict(b.verdict)
        v.setdefault("family", b.case.family)
        v["bundle"] = str(p)
        out.append(v)
    return out


def build(verdicts: list, title: str = "attncheck report", meta: Optional[dict] = None) -> str:
    verdicts = sorted(verdicts, key=lambda v: (v.get("backend", ""), v.get("case", "")))
    bad = [v for v in verdicts if v.get("status") in ("fail", "error")]
    xfail = [v for v in verdicts if v.get("status") == "xfail"]
    skips = [v for v in verdicts if v.get("status") == "skip"]
    head = ", ".join(f"{k} {v}" for k, v in (meta or {}).items() if v is not None)
    body = [f"<h1>{_esc(title)}</h1>", f"<p class=meta>{_esc(head)}</p>" if head else "",
            "<h2>Backend x family</h2>", matrix_html(verdicts),
            f"<h2>Failures and errors ({len(bad)})</h2>",
            "<p class=meta>Per failure: its worst rows (where, error, budget, ratio), then the error maps: "
            "error/budget per query token x head on a log scale (green within budget, red over; solid lines "
            "separate sequences, dotted lines mark a query token that starts a new KV block; crosses: NaN/Inf), "
            "and for decode-heavy batches one row per sequence and one column per KV block, coloured by how "
            "well the error matches that block being dropped (+1) or over-weighted (-1).</p>"]
    body += [failure_html(v) for v in bad] or ["<p>none</p>"]
    if xfail:
        body.append(f"<h2>Expected failures ({len(xfail)})</h2><ul>" + "".join(
            f"<li>{_esc(v['backend'])} :: {_esc(v['case'])}: {_esc(v.get('reason', ''))}</li>" for v in xfail) + "</ul>")
    if skips:
        body.append(f"<details><summary>Skipped pairs ({len(skips)})</summary><ul>" + "".join(
            f"<li>{_esc(v['backend'])} :: {_esc(v['case'])}: {_esc(v.get('reason', ''))}</li>" for v in skips)
            + "</ul></details>")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>" + _esc(title) + "</title><style>" + CSS
            + "</style></head><body>\n" + "\n".join(b for b in body if b) + "\n</body></html>\n")


def write(path, verdicts: list, title: str = "attncheck report", meta: Optional[dict] = None) -> Path:
    from attncheck.golden import _atomic_write
    path = Path(path)
    _atomic_write(path, build(verdicts, title, meta).encode("utf-8"))
    return path
