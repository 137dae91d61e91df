"""``attncheck spot``: whole models through each backend, lm-eval-style tables against the reference.

    attncheck spot --device cpu --backend TORCH_SDPA TRITON_ATTN
    attncheck spot --model retrieval --limit 500 --max-len 4096 --json spot.json
    attncheck spot --model /path/to/llama --task gsm8k.jsonl --backend TRITON_ATTN ROCM_ATTN

For every model (default: the retrieval and the addition model) the float64 reference attention
and then each backend answer the same items; each backend gets a table, its delta to the
reference, the fraction of flipped answers and the first flipped token. Exit 0 when every
backend that ran passes (the gate is in attncheck/spot/report.py and docs/spot.md), 1 when one
fails or errors (or none ran), 2 for bad arguments.
"""

from __future__ import annotations

import json
import os
import sys

EXIT_BAD_ARGS = 2


def register(subparsers) -> None:
    s = subparsers.add_parser("spot", help="accuracy spot checks: whole models through each backend vs the reference")
    s.add_argument("--backend", nargs="+", default=None, metavar="NAME", help="default: every registered backend")
    s.add_argument("--backend-plugin", action="append", default=[], metavar="MODULE:ATTR")
    s.add_argument("--model", nargs="+", default=["retrieval", "addition"], metavar="retrieval|addition|DIR")
    s.add_argument("--task", default=None, metavar="T",
                   help="for a checkpoint folder: 'passkey' (default) or a GSM8K-style .jsonl file")
    s.add_argument("--limit", type=int, default=None, metavar="N", help="items per task (default 32 on cpu, 500 on cuda)")
    s.add_argument("--max-len", type=int, default=None, metavar="TOKENS",
                   help="longest prompt of the retrieval and passkey tasks (default 512 on cpu, 4096 on cuda)")
    s.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if present, else cpu")
    s.add_argument("--provider", choices=("vllm", "stand-in"), default=None,
                   help="kernel provider, as for attncheck verify (default: vLLM's kernels where they load)")
    s.add_argument("--block-size", type=int, default=None, help="default: 16, or the smallest the backend takes")
    s.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    s.add_argument("--max-batch-tokens", type=int, default=None, metavar="N",
                   help="tokens per engine step (chunked prefill budget; default 1024 on cpu, 16384 on cuda)")
    s.add_argument("--max-seqs", type=int, default=None, metavar="N",
                   help="sequences in flight at once (default 256 on cpu, 1024 on cuda)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", default=None, metavar="PATH", help="write every result as JSON")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_spot)


def _fail(msg: str) -> int:
    print(f"attncheck spot: {msg}", file=sys.stderr)
    return EXIT_BAD_ARGS


def cmd_spot(args) -> int:
    import torch

    from attncheck import runtime
    try:
        device = runtime.resolve_device(args.device)
        runtime.use_device(device)  # the Triton interpreter on the CPU, before any kernel module is imported
        runtime.use_provider(args.provider)
    except runtime.SetupError as e:
        return _fail(str(e))
    for name, value in (("--limit", args.limit), ("--max-len", args.max_len), ("--block-size", args.block_size),
                        ("--max-batch-tokens", args.max_batch_tokens), ("--max-seqs", args.max_seqs)):
        if value is not None and value < 1:
            return _fail(f"{name}: expected a positive integer, got {value}")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        return _fail(f"--json {args.json}: its folder does not exist")
    if args.max_len is not None and args.max_len < 32:
        return _fail(f"--max-len: expected at least 32 tokens, got {args.max_len}")

    from attncheck import backends
    from attncheck.spot import report, tasks
    from attncheck.spot.attention import REFERENCE
    from attncheck.spot.model import CheckpointError

    if args.backend_plugin and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # a plugin module beside the user, as `python -m` would find it
    for spec in args.backend_plugin:
        try:
            backends.load_plugin(spec)
        except backends.PluginError as e:
            return _fail(str(e))
    try:
        chosen = [backends.get_backend(n) for n in (args.backend or backends.names())]
    except (backends.UnknownBackendError, backends.PluginError) as e:
        return _fail(f"--backend: {e}")
    limit = args.limit or (32 if device == "cpu" else 500)
    max_len = args.max_len or (512 if device == "cpu" else 4096)
    engine_kwargs = {"max_batch_tokens": args.max_batch_tokens or (1024 if device == "cpu" else 16384),
                     "max_seqs": args.max_seqs or (256 if device == "cpu" else 1024),
                     "cache_tokens": 1 << 16 if device == "cpu" else 1 << 22}
    dtype = getattr(torch, args.dtype)
    progress = not args.no_progress
    print(f"attncheck spot: {device}, {args.dtype}; models: {', '.join(args.model)}; "
          f"backends: {', '.join(b.name for b in chosen)}")

    results = []
    for spec in args.model:
        try:
            model, tokenizer = tasks.load_model(spec, dtype=dtype, device=device)
            task = tasks.make_task(spec, args.task, tokenizer, max_len=max_len, seed=args.seed)
            items = task.items(limit)
        except (CheckpointError, ValueError) as e:
            return _fail(str(e))
        ref = report.run_task(model, task, items, REFERENCE, device=device, engine_kwargs=engine_kwargs,
                              progress=progress)
        if ref.status != "ok":
            print(f"attncheck spot: the reference run failed on {spec}: {ref.reason}", file=sys.stderr)
            print(ref.detail, file=sys.stderr)
            return 1
        print()
        print(report.render_reference(task, items, ref), flush=True)
        runs = []
        for backend in chosen:  # each section as soon as it is known (long GPU runs stream their log)
            run = report.run_task(model, task, items, backend, device=device, block_size=args.block_size,
                                  engine_kwargs=engine_kwargs, progress=progress)
            runs.append((run, report.compare(ref, run, items, task)))
            print(report.render_backend(task, items, *runs[-1]), flush=True)
        ran = sum(c["verdict"] in ("PASS", "FAIL", "XFAIL") for _, c in runs)
        results.append({"model": spec, "task": task.name, "items": len(items), "reference_value": ref.value,
                        "reference_stderr": report.stderr(ref.scores), "backends": [c for _, c in runs],
                        "ran": ran})
        del model
    failing = sorted({c["backend"] for r in results for c in r["backends"] if c["verdict"] in ("FAIL", "ERROR")})
    if args.json:
        from attncheck.report import write_atomic
        obj = {"device": device, "dtype": args.dtype, "limit": limit, "max_len": max_len,
               "gate": {"drop_stderrs": report.DROP_STDERRS, "drop_floor": report.DROP_FLOOR},
               "results": results, "environment": runtime.environment()}
        write_atomic(args.json, (json.dumps(obj, indent=1, default=str) + "\n").encode())
    if failing:
        print(f"attncheck spot: FAILED: {', '.join(failing)}")
        return 1
    if not any(r["ran"] for r in results):
        print("attncheck spot: no backend ran (all skipped)", file=sys.stderr)
        return 1
    xfail = sorted({c["backend"] for r in results for c in r["backends"] if c["verdict"] == "XFAIL"})
    note = f" (expected failures, declared known issues: {', '.join(xfail)})" if xfail else ""
    print(f"attncheck spot: no backend is significantly worse than the reference{note}")
    return 0
