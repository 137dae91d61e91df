"""CLI subcommands for numerics debugging, registered by ``attncheck.cli``:

    attncheck replay BUNDLE [--backend NAME] [--backend-plugin M:A] [--device D] [--save DIR] [--capture DIR]
    attncheck minimize BUNDLE [--backend NAME] [--backend-plugin M:A] [--device D] [--out PATH]
                       [--max-steps N] [--max-seconds S] [-v]
    attncheck report [--json VERIFY_JSON] [BUNDLE ...] [--out PATH]
    attncheck check-dump FILE [--device D] [--bundle PATH]

and the ``verify`` options ``--save-failures DIR`` and ``--html DIR``. Exit codes follow
``verify``: 0 pass, 1 fail or error (or nothing run), 2 bad input (a one-line message).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


class UsageError(Exception):
    pass


def _prepare(args) -> str:
    """Device (the Triton interpreter on the CPU, before any kernel module loads) and plugins."""
    from attncheck import backends, runtime
    device = runtime.resolve_device(getattr(args, "device", None))
    runtime.use_device(device)
    for spec in getattr(args, "backend_plugin", None) or []:
        backends.load_plugin(spec)
    return device


def _backend(name: str, recorded: str):
    from attncheck import backends
    name = name or recorded
    try:
        return backends.get_backend(name)
    except backends.UnknownBackendError as e:
        hint = "" if name != recorded else " (the bundle's backend; load a plugin with --backend-plugin MODULE:ATTR)"
        raise UsageError(f"--backend: {e}{hint}") from None


def _run(command: str, fn, args) -> int:
    from attncheck.backends import PluginError
    from attncheck.runtime import SetupError
    from attncheck.debug.bundle import BundleError
    from attncheck.debug.dump import DumpError
    from attncheck.debug.minimize import MinimizeError
    try:
        return fn(args)
    except (UsageError, BundleError, DumpError, MinimizeError, PluginError, SetupError) as e:
        print(f"attncheck {command}: {e}", file=sys.stderr)
        return 2


def _exit_code(verdict) -> int:
    return 0 if verdict.status in ("pass", "xfail") else 1


# ---- replay -------------------------------------------------------------------------------------

def cmd_replay(args) -> int:
    from attncheck.debug import bundle as bundle_mod
    from attncheck.debug import replay
    device = _prepare(args)
    b = bundle_mod.read(args.bundle)
    backend = _backend(args.backend, b.backend)
    if backend.kind != b.case.kind:
        raise UsageError(f"--backend: {backend.name} is an {backend.kind} backend; the bundle's case is {b.case.kind}")
    rec = b.verdict
    print(f"bundle {args.bundle}: case {b.case.name}, recorded {rec.get('status', '?').upper()} by {b.backend}"
          f"{' (' + b.meta['provider'] + ')' if b.meta.get('provider') else ''} on {b.meta.get('device', '?')}")
    runner = backend
    if args.capture:
        from attncheck.debug.dump import CapturingBackend
        runner = CapturingBackend(backend, args.capture)
    v = replay.replay(b, runner, device)
    print(v.report if v.report else f"{v.backend} on {v.case}: {v.status.upper()}: {v.reason}")
    if v.status in ("skip", "error", "xfail") and v.reason:
        print(f"  {v.status}: {v.reason}")
    same, line = replay.compare_rows(b, v)
    print(f"rows: {line}")
    if args.capture:
        for p in runner.paths:
            print(f"dump written: {p}")
    if args.save and v.status in ("fail", "error"):
        print(f"bundle written: {bundle_mod.save_verdict(args.save, v, backend, b.case, device, tensors=b.tensors)}")
    if v.status == "skip":
        return 1
    return _exit_code(v)


# ---- minimize -----------------------------------------------------------------------------------

def cmd_minimize(args) -> int:
    from attncheck.debug import bundle as bundle_mod
    from attncheck.debug import minimize
    device = _prepare(args)
    if args.max_steps < 1 or args.max_seconds <= 0:
        raise UsageError("--max-steps must be >= 1 and --max-seconds > 0")
    b = bundle_mod.read(args.bundle)
    backend = _backend(args.backend, b.backend)
    src = Path(args.bundle)
    stem = src.name[:-len(".safetensors")] if src.name.endswith(".safetensors") else src.name
    out = Path(args.out) if args.out else src.with_name(stem + ".min.safetensors")
    if out.resolve() == Path(args.bundle).resolve():
        raise UsageError("--out: must differ from the input bundle")
    log = print if args.verbose else None
    print(f"minimising {b.case.name} on {backend.name} (at most {args.max_steps} runs, {args.max_seconds:g} s)")
    result = minimize.minimize(b, backend, device, max_steps=args.max_steps, max_seconds=args.max_seconds, log=log)
    minimize.write_result(result, out, b, backend, device)
    print(f"original: {result.original.describe()}")
    print(f"after {result.runs} runs, {len(result.accepted)} accepted steps: " + "; ".join(result.accepted))
    if result.stopped_early:
        print(f"stopped early at {result.stopped_early}: the case is smaller but may not be minimal")
    print(result.summary())
    print(f"minimised bundle: {out}")
    return 0


# ---- report -------------------------------------------------------------------------------------

def _verdicts_from_json(path) -> tuple[list, dict]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"--json: {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"--json: {path} is not JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("verdicts"), list):
        raise UsageError(f"--json: {path} is not an `attncheck verify --json` report (no 'verdicts' list)")
    meta = {"device": data.get("device"), "tier": data.get("tier")}
    meta.update({k: v for k, v in (data.get("environment") or {}).items() if k in ("torch", "triton", "cuda")})
    return data["verdicts"], meta


def cmd_report(args) -> int:
    from attncheck.debug import html_report
    if not args.json and not args.bundles:
        raise UsageError("give a verify JSON (--json PATH) and/or bundle files")
    verdicts, meta = _verdicts_from_json(args.json) if args.json else ([], {})
    base = Path(args.json).parent if args.json else Path(".")
    for v in verdicts:  # bundle paths in a verify JSON may be relative to where verify ran
        if v.get("bundle") and not Path(v["bundle"]).exists() and (base / v["bundle"]).exists():
            v["bundle"] = str(base / v["bundle"])
    from_bundles = html_report.verdicts_from_bundles(args.bundles)
    seen = {(v["backend"], v["case"]) for v in from_bundles}
    verdicts = [v for v in verdicts if (v.get("backend"), v.get("case")) not in seen] + from_bundles
    path = html_report.write(args.out, verdicts, meta=meta)
    print(f"report written: {path} ({path.stat().st_size / 1024:.0f} KiB, {len(verdicts)} verdicts)")
    return 0


# ---- check-dump ---------------------------------------------------------------------------------

def cmd_check_dump(args) -> int:
    from attncheck.debug import bundle as bundle_mod
    from attncheck.debug import dump
    device = _prepare(args)
    v, tensors, d = dump.check_dump(args.file, device)
    src = d.meta.get("source") or "unknown source"
    print(f"dump {args.file}: {d.case.kind}, {len(d.case.seq_lens)} sequences, {sum(d.case.query_lens)} query tokens, "
          f"{sum(d.case.seq_lens)} keys, block {d.case.block_size}, {d.case.dtype}, kv {d.case.kv_cache_dtype} ({src})")
    print(v.report if v.report else f"{v.status.upper()}: {v.reason}")
    if args.bundle:
        tensors_out, meta = bundle_mod.from_verdict(v, None, d.case, device, tensors=tensors)
        meta["from_dump"] = {"path": str(args.file), "source": src}
        path = bundle_mod.write(args.bundle, tensors_out, meta)
        print(f"bundle written: {path} (replay it on any backend with `attncheck replay`)")
    return _exit_code(v)


# ---- verify options -----------------------------------------------------------------------------

def add_verify_arguments(parser) -> None:
    parser.add_argument("--save-failures", default=None, metavar="DIR",
                        help="write each failing or erroring verdict as a repro bundle (safetensors) into DIR")
    parser.add_argument("--html", default=None, metavar="DIR",
                        help="write DIR/report.html (matrix, localized rows, error maps); bundles go to "
                             "DIR/bundles unless --save-failures names another folder")


def bundle_dir(args) -> str:
    if args.save_failures:
        return args.save_failures
    if args.html:
        return str(Path(args.html) / "bundles")
    return ""


def check_verify_arguments(args) -> None:
    """Before the run: each output folder must be a directory we can write into (or create)."""
    for path, option in ((args.save_failures, "--save-failures"), (args.html, "--html")):
        if not path:
            continue
        p = Path(path)
        if p.exists() and not p.is_dir():
            raise ValueError(f"{option} {path}: is a file; expected a directory")
        existing = next(q for q in (p, *p.absolute().parents) if q.exists())
        if not os.access(existing, os.W_OK):
            raise ValueError(f"{option} {path}: cannot write into {existing}")


def verify_pytest_args(args) -> list:
    d = bundle_dir(args)
    return ["--attncheck-save-failures", str(Path(d).absolute())] if d else []


def after_verify(args, verdicts: list, meta: dict) -> None:
    """Verdicts (harness.Verdict) of a finished verify run: list the bundles, write the HTML."""
    if not (args.save_failures or args.html):
        return
    from attncheck.debug import bundle
    records = []
    for v in verdicts:
        rec = v.as_dict()
        path = Path(bundle_dir(args)) / bundle.bundle_name(v.backend, v.case)
        if v.status in ("fail", "error") and path.exists():
            rec["bundle"] = str(path)
        records.append(rec)
    print(f"\nrepro bundles: {sum('bundle' in r for r in records)} written to {bundle_dir(args)}")
    if args.html:
        from attncheck.debug import html_report
        path = html_report.write(Path(args.html) / "report.html", records, meta=meta)
        print(f"HTML report: {path}")


# ---- registration -------------------------------------------------------------------------------

def _device_arg(p) -> None:
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if present, else cpu")


def register(sub) -> None:
    r = sub.add_parser("replay", help="re-run a repro bundle on any registered backend")
    r.add_argument("bundle", metavar="BUNDLE")
    r.add_argument("--backend", default=None, metavar="NAME", help="default: the backend that produced the bundle")
    r.add_argument("--backend-plugin", action="append", default=[], metavar="MODULE:ATTR")
    _device_arg(r)
    r.add_argument("--save", default=None, metavar="DIR", help="write the replay's bundle into DIR if it fails")
    r.add_argument("--capture", default=None, metavar="DIR", help="also write a dump of the backend call into DIR")
    r.set_defaults(func=lambda a: _run("replay", cmd_replay, a))

    m = sub.add_parser("minimize", help="shrink a failing bundle while it keeps failing the same way")
    m.add_argument("bundle", metavar="BUNDLE")
    m.add_argument("--backend", default=None, metavar="NAME", help="default: the backend that produced the bundle")
    m.add_argument("--backend-plugin", action="append", default=[], metavar="MODULE:ATTR")
    _device_arg(m)
    m.add_argument("--out", default=None, metavar="PATH", help="default: BUNDLE with the suffix .min.safetensors")
    m.add_argument("--max-steps", type=int, default=400, help="backend runs at most (default 400)")
    m.add_argument("--max-seconds", type=float, default=600.0, help="wall-clock limit (default 600)")
    m.add_argument("-v", "--verbose", action="store_true", help="print every step tried")
    m.set_defaults(func=lambda a: _run("minimize", cmd_minimize, a))

    p = sub.add_parser("report", help="write a self-contained HTML report from a verify JSON and/or bundles")
    p.add_argument("bundles", nargs="*", metavar="BUNDLE")
    p.add_argument("--json", default=None, metavar="PATH", help="an `attncheck verify --json` report")
    p.add_argument("--out", default="attncheck-report.html", metavar="PATH")
    p.set_defaults(func=lambda a: _run("report", cmd_report, a))

    c = sub.add_parser("check-dump", help="check tensors captured from a real attention call")
    c.add_argument("file", metavar="FILE")
    _device_arg(c)
    c.add_argument("--bundle", default=None, metavar="PATH", help="also save the result as a repro bundle")
    c.set_defaults(func=lambda a: _run("check-dump", cmd_check_dump, a))
