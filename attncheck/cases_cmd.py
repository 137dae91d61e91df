"""``attncheck cases``: list the case catalogue (text or JSON)."""

from __future__ import annotations

import json
import sys

from attncheck import cases


def register(subparsers) -> None:
    p = subparsers.add_parser("cases", help="list the case catalogue")
    p.add_argument("--tier", choices=cases.TIERS, default=None)
    p.add_argument("--kind", choices=("MHA", "MLA", "MERGE"), default=None)
    p.add_argument("--family", default=None, help="only this family (an unknown one is an error listing the valid ones)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def describe(c) -> str:
    if c.kind in ("MHA", "MLA"):
        heads = f"{c.num_heads}x{getattr(c, 'num_kv_heads', 1)}"
        desc = (f"seqs {len(c.seq_lens)} q {sum(c.query_lens)} kv {sum(c.seq_lens)} heads {heads} "
                f"bs {c.block_size} {c.dtype}")
        if getattr(c, "kv_cache_dtype", "auto") != "auto":
            desc += f" {c.kv_cache_dtype}"
        return desc
    return f"tokens {c.num_tokens} heads {c.num_heads} d {c.head_size} {c.dtype} {c.lse_pattern}"


def run(args) -> int:
    families = sorted({str(getattr(c.family, "value", c.family)) for c in cases.all_cases()})
    if args.family is not None and args.family not in families:
        print(f"attncheck cases: --family {args.family!r}: unknown family; expected one of {', '.join(families)}",
              file=sys.stderr)
        return 2
    rows = cases.select_cases(tier=args.tier, kind=args.kind, family=args.family)
    if args.json:
        print(json.dumps([{"name": c.name, **c.manifest_params()} for c in rows], indent=1, default=str))
        return 0
    for c in rows:
        print(f"{c.tier:5} {c.kind:5} {str(c.family):14} {c.name:58} {describe(c)}")
    print(f"{len(rows)} cases")
    return 0
