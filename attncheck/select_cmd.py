"""``attncheck select``: which attention backend vLLM on ROCm would select, and why.

    attncheck select --env VLLM_ROCM_USE_AITER=1 --explain
    attncheck select --json --mla --block-size 1 --env VLLM_ROCM_USE_AITER=1
    attncheck select --vllm-version 0.33.0 --attention-backend ROCM_AITER_FA --explain
    attncheck select --compare-versions

The vLLM line is ``--vllm-version``, else the installed vLLM's version (read from its package
metadata; vLLM is not imported), else the seeds' line (0.12); the output says which.

Without ``--env`` the process environment is evaluated; with one or more ``--env K=V`` only
those variables are (so a result never depends on what happens to be exported). The arch is
``--arch``, else ``ATTNCHECK_ARCH``, else the detected ROCm GPU, else gfx942 (off ROCm the
policy is evaluated for that arch and the output says so).

Exit codes: 0 = selected; 2 = invalid configuration (or bad arguments), message on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import metadata
from typing import Callable, Optional

from attncheck import seed_examples
from impl.platform import DEFAULT_POLICY_ARCH, ROCM_ARCHS, PlatformError, detect_platform
from impl.selection import (KV_CACHE_DTYPES, LINES, SEEDS_LINE, SelectionError, resolve_line,
                            select_backend)

EXIT_INVALID = 2


def _env_pair(text: str) -> tuple:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--env: expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    if not key.strip():
        raise argparse.ArgumentTypeError(f"--env: empty variable name in {text!r}")
    return key.strip(), value


def _block_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--block-size: expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"--block-size: expected a positive integer, got {value}")
    return value


def _attention_config(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(
            f"--attention-config: expected a JSON object such as '{{\"backend\": "
            f"\"ROCM_ATTN\"}}', got {text!r} ({e.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"--attention-config: expected a JSON object, got {text!r}")
    return value


def installed_vllm_version() -> Optional[str]:
    """The installed vLLM's version from its package metadata (vLLM is not imported)."""
    try:
        return metadata.version("vllm")
    except metadata.PackageNotFoundError:
        return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env", action="append", type=_env_pair, metavar="KEY=VALUE",
                   help="an environment variable to evaluate (repeatable); when given, the "
                        "process environment is not read")
    p.add_argument("--backend", "--attention-backend", dest="backend", default=None,
                   help="explicit backend: vLLM 0.33's --attention-backend; for the seeds' "
                        "line like VLLM_ATTENTION_BACKEND (and wins over it)")
    p.add_argument("--attention-config", type=_attention_config, default=None,
                   metavar="JSON", help="vLLM 0.33's --attention-config (its \"backend\" key)")
    p.add_argument("--vllm-version", default=None, metavar="X",
                   help="the vLLM version whose policy to evaluate (modelled: "
                        + ", ".join(f"{line.name}.x" for line in LINES)
                        + "); default: the installed vLLM, else the seeds' line")
    p.add_argument("--arch", default=None,
                   help=f"ROCm arch to evaluate for ({', '.join(ROCM_ARCHS)}); default: "
                        f"ATTNCHECK_ARCH, else the detected GPU, else {DEFAULT_POLICY_ARCH}")
    p.add_argument("--mla", action="store_true",
                   help="the model uses MLA (DeepSeek-V3/R1); default: MHA (Llama, Qwen)")
    p.add_argument("--block-size", type=_block_size, default=None,
                   help="KV cache block size (default: chosen by the policy)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="KV cache dtype, vLLM spelling (default auto)")
    p.add_argument("--dtype", default=None, help="model dtype (float16, bfloat16, float32)")
    p.add_argument("--head-size", type=int, default=None, help="attention head size")
    p.add_argument("--explain", action="store_true", help="print the chain of rules that fired")
    p.add_argument("--compare-versions", action="store_true",
                   help="show each seed example that selects differently in the newest "
                        "modelled line than in the seeds' line, side by side")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (backend, block_size, rules, warnings, ...)")


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``select`` sub-command to ``parser.add_subparsers(...)``."""
    p = subparsers.add_parser(
        "select", help="show which attention backend vLLM on ROCm selects, and why",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def _platform_note(platform, arch: str) -> Optional[str]:
    """A line saying the policy is evaluated for an arch that is not this machine's GPU."""
    if platform.on_rocm and platform.arch_source == "detected":
        return None
    if platform.arch_source in ("argument", "ATTNCHECK_ARCH"):
        if platform.on_rocm:
            return f"evaluating for {arch} ({platform.arch_source}), not the detected GPU"
        origin = "--arch" if platform.arch_source == "argument" else "ATTNCHECK_ARCH"
        return (f"not on ROCm ({platform.describe(with_arch=False)}): evaluating vLLM's ROCm "
                f"policy for {arch} (from {origin})")
    return (f"not on ROCm ({platform.describe(with_arch=False)}): evaluating vLLM's ROCm "
            f"policy for {arch} (the default; pass --arch to choose another)")


def _fail(message: str) -> int:
    print(f"attncheck select: invalid configuration: {message}", file=sys.stderr)
    return EXIT_INVALID


def _version(args, installed: Callable[[], Optional[str]]) -> tuple:
    """(vLLM version to evaluate, where it came from); raises SelectionError if unmodelled."""
    if args.vllm_version is not None:
        line, version = resolve_line(args.vllm_version)
        return version, line, "--vllm-version"
    found = installed()
    if found is None:
        return SEEDS_LINE.reference, SEEDS_LINE, "the seeds' line; no vLLM installed"
    try:
        line, version = resolve_line(found)
    except SelectionError as e:
        raise SelectionError(f"installed vLLM {found}: {e} with --vllm-version",
                             e.rule) from None
    return version, line, "the installed vLLM"


def run(args, out=None, environ=None, probe=None, installed=installed_vllm_version) -> int:
    """Evaluate the policy for the parsed ``args``; returns the exit code.

    ``environ`` (default ``os.environ``), ``probe`` (torch platform probe) and ``installed``
    (the installed vLLM's version, or None) are injectable so tests do not depend on the
    machine.
    """
    out = sys.stdout if out is None else out
    if args.compare_versions:
        return _compare_versions(args, out)
    environ = os.environ if environ is None else environ
    try:
        kw = {} if probe is None else {"probe": probe}
        platform = detect_platform(args.arch, environ, **kw)
        version, line, version_source = _version(args, installed)
    except (PlatformError, SelectionError) as e:
        return _fail(str(e))
    arch = platform.policy_arch()
    env = dict(args.env) if args.env else dict(environ)
    try:
        sel = select_backend(env, args.backend, arch=arch, kind="MLA" if args.mla else "MHA",
                             block_size=args.block_size, kv_cache_dtype=args.kv_cache_dtype,
                             head_size=args.head_size, dtype=args.dtype,
                             vllm_version=version, attention_config=args.attention_config)
    except SelectionError as e:
        if args.explain and not args.json:
            for i, text in enumerate(e.rules, 1):
                print(f"  {i}. {text}", file=sys.stderr)
        return _fail(str(e))
    note = _platform_note(platform, arch)
    if args.json:
        obj = sel.to_dict()
        obj["platform"] = {"vendor": platform.vendor, "on_rocm": platform.on_rocm,
                           "arch": arch, "arch_source": platform.arch_source or "default",
                           "note": note}
        obj["vllm"] = {"version": version, "line": line.name, "source": version_source}
        print(json.dumps(obj, indent=2), file=out)
        return 0
    print(f"vllm: {version} (line {line.name}; {version_source})", file=out)
    _print_text(sel, note, args.explain, out)
    return 0


def _outcome(example, version: str):
    """(short result, warnings, rule chain) of one seed example under one vLLM version."""
    try:
        sel = select_backend(**example.inputs(), vllm_version=version)
    except SelectionError as e:
        return f"error ({e.rule}): {e}", (), e.rules
    how = "explicit" if sel.explicit else f"automatic, rule {sel.decided_by}"
    return f"{sel.backend}, block {sel.block_size} ({how})", sel.warnings, sel.rules


def _differing_examples() -> list:
    """(example, seeds' outcome, newest line's outcome) where the backend or block differs."""
    old, new = SEEDS_LINE.reference, LINES[-1].reference
    rows = []
    for example in seed_examples.load():
        a, b = _outcome(example, old), _outcome(example, new)
        if a[0].split(" (")[0] != b[0].split(" (")[0]:
            rows.append((example, a, b))
    return rows


def _compare_versions(args, out) -> int:
    old, new = SEEDS_LINE.reference, LINES[-1].reference
    rows = _differing_examples()
    if args.json:
        print(json.dumps([{"example": ex.id, "command": ex.command,
                           old: {"result": a[0], "warnings": list(a[1])},
                           new: {"result": b[0], "warnings": list(b[1])}}
                          for ex, a, b in rows], indent=2), file=out)
        return 0
    total = len(seed_examples.load())
    print(f"{len(rows)} of {total} seed examples select differently in vLLM {new} than in "
          f"vLLM {old} (the seeds' line), evaluated for {seed_examples.SEED_ARCH}:", file=out)
    width = max(len(a[0]) for _, a, _ in rows) + 2 if rows else 20
    for example, a, b in rows:
        print(f"\n{example.id}: {' '.join(example.command.split())}", file=out)
        print(f"  {'vLLM ' + old:<{width}}| vLLM {new}", file=out)
        print(f"  {a[0]:<{width}}| {b[0]}", file=out)
        for w_old, w_new in _zip_longest(a[1], b[1]):
            print(f"  {_cell('warning: ' + w_old if w_old else '', width)}| "
                  f"{'warning: ' + w_new if w_new else ''}".rstrip(), file=out)
        if args.explain:
            for r_old, r_new in _zip_longest(a[2], b[2]):
                print(f"  {_cell(r_old or '', width)}| {r_new or ''}".rstrip(), file=out)
    return 0


def _zip_longest(a, b):
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else None, b[i] if i < len(b) else None) for i in range(n)]


def _cell(text: str, width: int) -> str:
    return (text[: width - 4] + "... " if len(text) > width - 1 else text).ljust(width)


def _print_text(sel, note: Optional[str], explain: bool, out) -> None:
    if note:
        print(f"note: {note}", file=out)
    how = "explicit" if sel.explicit else f"automatic, rule {sel.decided_by}"
    print(f"backend: {sel.backend} ({how})", file=out)
    print(f"block size: {sel.block_size} ({sel.block_size_source})", file=out)
    if sel.kv_cache_storage:
        print(f"kv cache: {sel.kv_cache_dtype} -> {sel.kv_cache_storage} on {sel.arch}",
              file=out)
    for w in sel.warnings:
        print(f"warning: {w}", file=out)
    if explain:
        print("rules:", file=out)
        for i, line in enumerate(sel.rules, 1):
            print(f"  {i}. {line}", file=out)


def main(argv=None) -> int:
    """Stand-alone entry (``python -m attncheck.select_cmd``) until the main CLI wires it."""
    parser = argparse.ArgumentParser(prog="attncheck")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
