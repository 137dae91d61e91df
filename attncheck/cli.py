"""The ``attncheck`` command line (also ``python -m attncheck``).

    attncheck verify  [--device cpu|cuda] [--tier smoke|full|large] [--backend NAME ...]
                      [--backend-plugin MODULE:ATTR] [--provider vllm|stand-in]
                      [--json PATH] [--junit PATH] [-n WORKERS]
    attncheck cases   [--tier T] [--kind MHA|MLA|MERGE] [--family F] [--json]
    attncheck golden regen [--case NAME ...] [--check] [--prune]
    attncheck golden verify
    attncheck select  ...   (see `attncheck select --help`)
    attncheck bench   ...   (GPU; see `attncheck bench --help`)
    attncheck replay | minimize | report | check-dump   (numerics debugging: docs/debugging.md)

Each sub-command lives in its own module with ``register(subparsers)``, which adds its parser
and sets ``func`` (parsed args -> exit code). A new command is one module and one line below.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = (
    "attncheck.verify_cmd",
    "attncheck.cases_cmd",
    "attncheck.golden_cmd",
    "attncheck.select_cmd",
    "attncheck.bench",
    "attncheck.debug.commands",
    "attncheck.spot.command",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attncheck", description="Reference-and-verification suite for attention backends")
    sub = p.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        importlib.import_module(module).register(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
