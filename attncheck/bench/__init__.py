"""``attncheck bench``: GPU timings of kernels and backends x shapes with same-run peers.

``shapes`` (shapes, batches, work per shape), ``rows`` (MHA rows, the run, the tables), ``mla``
(MLA decode rows).
"""

from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="GPU: backend x shape timings with same-run SDPA/AITER ratios")
    p.add_argument("--backend", nargs="+", default=None, metavar="NAME",
                   help="backends to time (default: every registered MHA backend)")
    p.add_argument("--no-mla", action="store_true", help="skip the MLA decode rows")
    p.add_argument("--json", default=None, metavar="PATH")
    p.set_defaults(func=run_command)


def run_command(args) -> int:
    import torch

    from attncheck import backends, report
    from attncheck.bench import rows

    if not torch.cuda.is_available():
        print("attncheck bench: needs a CUDA GPU (timings on the Triton interpreter mean nothing)", file=sys.stderr)
        return 2
    try:
        if args.json:
            report.check_writable(args.json, "--json")
        for name in args.backend or ():
            backends.check_name(name)
    except (ValueError, backends.UnknownBackendError) as e:
        print(f"attncheck bench: {e}", file=sys.stderr)
        return 2
    result = rows.run(backends=args.backend, with_mla=not args.no_mla)
    if args.json:
        report.write_atomic(args.json, (json.dumps(result, indent=1, default=str) + "\n").encode())
    return 0
