"""``attncheck select``: which attention backend vLLM on ROCm would select, and why.

    attncheck select --env VLLM_ROCM_USE_AITER=1 --explain
    attncheck select --json --mla --block-size 1 --env VLLM_ROCM_USE_AITER=1

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
from typing import Optional

from impl.platform import DEFAULT_POLICY_ARCH, ROCM_ARCHS, PlatformError, detect_platform
from impl.selection import KV_CACHE_DTYPES, SelectionError, select_backend

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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env", action="append", type=_env_pair, metavar="KEY=VALUE",
                   help="an environment variable to evaluate (repeatable); when given, the "
                        "process environment is not read")
    p.add_argument("--backend", default=None,
                   help="explicit backend (like VLLM_ATTENTION_BACKEND; wins over it)")
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


def run(args, out=None, environ=None, probe=None) -> int:
    """Evaluate the policy for the parsed ``args``; returns the exit code.

    ``environ`` (default ``os.environ``) and ``probe`` (torch platform probe) are injectable
    so tests do not depend on the machine.
    """
    out = sys.stdout if out is None else out
    environ = os.environ if environ is None else environ
    try:
        kw = {} if probe is None else {"probe": probe}
        platform = detect_platform(args.arch, environ, **kw)
    except PlatformError as e:
        return _fail(str(e))
    arch = platform.policy_arch()
    env = dict(args.env) if args.env else dict(environ)
    try:
        sel = select_backend(env, args.backend, arch=arch, kind="MLA" if args.mla else "MHA",
                             block_size=args.block_size, kv_cache_dtype=args.kv_cache_dtype,
                             head_size=args.head_size, dtype=args.dtype)
    except SelectionError as e:
        if args.explain and not args.json:
            for i, line in enumerate(e.rules, 1):
                print(f"  {i}. {line}", file=sys.stderr)
        return _fail(str(e))
    note = _platform_note(platform, arch)
    if args.json:
        obj = sel.to_dict()
        obj["platform"] = {"vendor": platform.vendor, "on_rocm": platform.on_rocm,
                           "arch": arch, "arch_source": platform.arch_source or "default",
                           "note": note}
        print(json.dumps(obj, indent=2), file=out)
        return 0
    _print_text(sel, note, args.explain, out)
    return 0


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
