"""``attncheck golden regen|verify``: the golden store's commands (the store itself is
``attncheck.golden``)."""

from __future__ import annotations

import sys

from attncheck import golden


def register(subparsers) -> None:
    g = subparsers.add_parser("golden", help="regenerate or verify the golden store")
    gsub = g.add_subparsers(dest="golden_command", required=True)
    r = gsub.add_parser("regen", help="regenerate goldens (single process, twice, atomic)")
    r.add_argument("--case", nargs="+", default=None, metavar="NAME", help="only these cases")
    r.add_argument("--check", action="store_true", help="report the diff, write nothing; exit 1 if anything changed")
    r.add_argument("--prune", action="store_true",
                   help="delete stale case files and orphans (without it regen only lists them)")
    r.set_defaults(func=regen)
    v = gsub.add_parser("verify", help="check hashes, schema, missing and orphan files")
    v.set_defaults(func=verify)


def regen(args) -> int:
    try:
        changed = golden.regen(names=args.case or None, check_only=args.check, prune=args.prune)
    except golden.GoldenError as e:
        print(f"attncheck golden regen: {e}", file=sys.stderr)
        return 2
    print(f"{changed} case(s) new, changed or removed" + (" (check only: nothing written)" if args.check else ""))
    return 1 if (args.check and changed) else 0


def verify(args) -> int:
    try:
        for action in golden.recover():
            print(f"golden: {action}")
    except golden.GoldenError as e:
        print(f"attncheck golden verify: {e}", file=sys.stderr)
        return 1
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
