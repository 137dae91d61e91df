"""The ``attncheck`` command line.

    attncheck verify  [--device cpu|cuda] [--tier smoke|full|large] [--backend NAME ...]
                      [--backend-plugin MODULE:ATTR] [--json PATH] [--junit PATH] [-n WORKERS]
    attncheck cases   [--tier T] [--kind MHA|MLA|MERGE] [--family F] [--json]
    attncheck golden regen [--case NAME ...] [--check]
    attncheck golden verify
    attncheck select  ...   (see `attncheck select --help`)
    attncheck bench   ...   (GPU; see `attncheck bench --help`)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TIERS = ("smoke", "full", "large")


def _default_device() -> str:
    try:
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:
        return "cpu"


def cmd_verify(args) -> int:
    import pytest

    from attncheck import backends, report

    device = args.device or _default_device()
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            print("attncheck verify: --device cuda, but torch sees no CUDA device", file=sys.stderr)
            return 2
    tier = args.tier or ("smoke" if device == "cpu" else "full")
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    for spec in args.backend_plugin:
        try:
            backends.load_plugin(spec)
        except backends.PluginError as e:
            print(f"attncheck verify: {e}", file=sys.stderr)
            return 2
    if args.backend:
        for name in args.backend:
            try:
                backends.get_backend(name)
            except backends.UnknownBackendError as e:
                print(f"attncheck verify: {e}", file=sys.stderr)
                return 2
            except backends.PluginError:
                pass  # reported per case as an error
    suite = REPO / "tests" / "test_backends_golden.py"
    if not suite.exists():
        print(f"attncheck verify: {suite} not found; run from an attncheck checkout (pip install -e .)",
              file=sys.stderr)
        return 2
    pargs = [str(suite), "-p", "no:cacheprovider", "-p", "no:benchmark", "--rootdir", str(REPO), "-q",
             "--device", device, "--tier", tier, "-o", "addopts=", "--tb=no", "-rN"]
    if args.backend:
        pargs += ["--backend", *args.backend]
    for spec in args.backend_plugin:
        pargs += ["--backend-plugin", spec]
    if args.junit:
        pargs += [f"--junitxml={args.junit}"]
    workers = args.workers
    if workers is None:
        workers = 2 if device == "cpu" else 1
    if workers and workers > 1:
        pargs += ["-n", str(workers)]
    collector = report.VerdictCollector()
    print(f"attncheck verify: tier {tier} on {device}; backends: {', '.join(args.backend or backends.names())}")
    rc = pytest.main(pargs, plugins=[collector])
    verdicts = sorted(collector.verdicts, key=lambda v: (v["backend"], v["case"]))
    print()
    print(report.render_matrix(verdicts))
    problems = report.render_problems(verdicts)
    if problems:
        print()
        print(problems)
    unverified = sorted({v["backend"] for v in verdicts if v["status"] == "skip" and not v.get("verified", True)})
    if unverified:
        print(f"\nnot verified on this machine (ROCm-only paths): {', '.join(unverified)}")
    n_bad = sum(v["status"] in ("fail", "error") for v in verdicts)
    if args.json:
        _write_json(args.json, {"device": device, "tier": tier, "verdicts": verdicts,
                                "matrix": json.loads(json.dumps(report.matrix(verdicts))),
                                "environment": _environment()})
    if rc not in (0, 5) or n_bad:
        return 1
    if not verdicts:
        print("attncheck verify: no backend x case pairs were run", file=sys.stderr)
        return 1
    return 0


def _environment() -> dict:
    import platform

    import torch
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "triton_interpret": os.environ.get("TRITON_INTERPRET")}
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    return env


def _write_json(path, obj) -> None:
    from attncheck.golden import _atomic_write
    _atomic_write(Path(path), (json.dumps(obj, indent=1, default=str) + "\n").encode())


def cmd_cases(args) -> int:
    from attncheck import cases
    try:
        rows = cases.select_cases(tier=args.tier, kind=args.kind, family=args.family)
    except ValueError as e:
        print(f"attncheck cases: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{"name": c.name, **c.manifest_params()} for c in rows], indent=1, default=str))
        return 0
    for c in rows:
        if c.kind in ("MHA", "MLA"):
            heads = f"{c.num_heads}x{getattr(c, 'num_kv_heads', 1)}"
            desc = (f"seqs {len(c.seq_lens)} q {sum(c.query_lens)} kv {sum(c.seq_lens)} heads {heads} "
                    f"bs {c.block_size} {c.dtype}")
            if getattr(c, "kv_cache_dtype", "auto") != "auto":
                desc += f" {c.kv_cache_dtype}"
        else:
            desc = f"tokens {c.num_tokens} heads {c.num_heads} d {c.head_size} {c.dtype} {c.lse_pattern}"
        print(f"{c.tier:5} {c.kind:5} {c.family:14} {c.name:58} {desc}")
    print(f"{len(rows)} cases")
    return 0


def cmd_golden(args) -> int:
    from attncheck import golden
    if args.golden_command == "regen":
        try:
            changed = golden.regen(names=args.case or None, check_only=args.check)
        except golden.GoldenError as e:
            print(f"attncheck golden regen: {e}", file=sys.stderr)
            return 2
        print(f"{changed} case(s) new, changed or removed" + (" (check only: nothing written)" if args.check else ""))
        return 1 if (args.check and changed) else 0
    problems = golden.verify()
    if problems:
        for p in problems:
            print(f"golden: {p}", file=sys.stderr)
        print(f"attncheck golden verify: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    manifest = golden.read_manifest()
    size = sum(e["size_bytes"] for e in manifest["cases"].values())
    print(f"golden OK: {len(manifest['cases'])} cases, {size / 2**20:.1f} MiB, hashes and schema verified")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attncheck", description="Reference-and-verification suite for attention backends")
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("verify", help="run backends x golden cases of a tier and print the matrix")
    v.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if present, else cpu")
    v.add_argument("--tier", choices=TIERS, default=None, help="default: smoke on cpu, full on cuda")
    v.add_argument("--backend", nargs="+", default=None, metavar="NAME", help="default: every registered backend")
    v.add_argument("--backend-plugin", action="append", default=[], metavar="MODULE:ATTR")
    v.add_argument("--json", default=None, metavar="PATH", help="write verdicts, matrix and environment as JSON")
    v.add_argument("--junit", default=None, metavar="PATH", help="write a JUnit XML report")
    v.add_argument("-n", "--workers", type=int, default=None, help="pytest-xdist workers (default 2 on cpu, 1 on cuda)")
    v.set_defaults(func=cmd_verify)

    c = sub.add_parser("cases", help="list the case catalogue")
    c.add_argument("--tier", choices=TIERS, default=None)
    c.add_argument("--kind", choices=("MHA", "MLA", "MERGE"), default=None)
    c.add_argument("--family", default=None)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_cases)

    g = sub.add_parser("golden", help="regenerate or verify the golden store")
    gsub = g.add_subparsers(dest="golden_command", required=True)
    r = gsub.add_parser("regen", help="regenerate goldens (single process, twice, atomic)")
    r.add_argument("--case", nargs="+", default=None, metavar="NAME", help="only these cases")
    r.add_argument("--check", action="store_true", help="report the diff, write nothing; exit 1 if anything changed")
    gsub.add_parser("verify", help="check hashes, schema, missing and orphan files")
    g.set_defaults(func=cmd_golden)

    try:
        from attncheck import select_cmd
        select_cmd.register(sub)
    except ImportError as e:  # pragma: no cover - reported, not hidden
        s = sub.add_parser("select", help="(unavailable)")
        s.set_defaults(func=lambda a, e=e: print(f"attncheck select unavailable: {e}", file=sys.stderr) or 2)
    try:
        from attncheck import bench
        bench.register(sub)
    except ImportError:
        pass
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
