"""``attncheck verify``: every backend x every golden case of a tier, through the pytest plugin.

The options are checked before anything runs (device, tier, provider, backend names and
plugins, the golden store, output paths): a bad one is a one-line error and exit 2. Then
``attncheck.pytest_plugin`` runs the cases (xdist workers on the CPU), prints progress, the
backend x family matrix and every failure, and writes the JSON and JUnit files. Exit 1 on any
failure or error, or when nothing ran.

``--tier sweep`` runs ``--count N`` configurations drawn from ``--seed S`` (docs/sweep.md);
``--case sweep:S:I`` re-runs one. ``--max-seconds T`` stops cleanly after T seconds and reports
what ran. ``-n auto`` runs one pytest-xdist worker per CPU core on the CPU and GPUs x
``--workers-per-gpu`` on CUDA (each worker pinned to one GPU); with more than one worker the
items of a case stay on one worker (``--dist loadgroup``), so its live oracle is built once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

from attncheck import cases, options, runtime, sweep
from attncheck.debug import commands as debug_commands


def _workers(text: str):
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of workers >= 0, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of workers >= 0, got {n}")
    return n


def register(subparsers) -> None:
    v = subparsers.add_parser("verify", help="run backends x golden cases of a tier and print the matrix")
    v.add_argument("--device", choices=("auto",) + runtime.DEVICES, default=None,
                   help="default: cuda if present, else cpu")
    v.add_argument("--tier", choices=cases.TIERS, default=None, help="default: smoke on cpu, full on cuda")
    v.add_argument("--backend", nargs="+", default=None, metavar="NAME", help="default: every registered backend")
    v.add_argument("--backend-plugin", action="append", default=[], metavar="MODULE:ATTR",
                   help="register backends from MODULE:ATTR (the current directory is importable)")
    v.add_argument("--case", nargs="+", default=None, metavar="NAME", help="only these cases of the tier")
    v.add_argument("--provider", choices=runtime.PROVIDERS, default=None,
                   help="kernel provider: vllm (vLLM's own kernels; an error if they cannot be loaded) or "
                        "stand-in (the project's Triton kernels); default: vLLM's where they load")
    v.add_argument("--json", default=None, metavar="PATH", help="write verdicts, matrix and environment as JSON")
    v.add_argument("--junit", default=None, metavar="PATH", help="write a JUnit XML report")
    v.add_argument("-n", "--workers", type=_workers, default=None,
                   help="pytest-xdist workers, or auto: CPU cores on cpu, GPUs x --workers-per-gpu on cuda "
                        "(default 2 on cpu, 1 on cuda; 0 = in this process)")
    v.add_argument("--workers-per-gpu", type=options.positive_int, default=None, metavar="W",
                   help="with -n auto on cuda: workers sharing each GPU (default min(12, 3/4 of the cores / GPUs))")
    s = v.add_argument_group("sweep tier (--tier sweep, docs/sweep.md)")
    s.add_argument("--count", type=options.non_negative_int, default=None, metavar="N",
                   help="configurations to draw (default 20 on cpu, 1000 on cuda)")
    s.add_argument("--seed", type=options.non_negative_int, default=0, metavar="S",
                   help="seed of the configurations (default 0); a configuration is named sweep:S:I")
    s.add_argument("--sweep-size", choices=("small", "large"), default=None,
                   help="configuration sizes (default small on cpu, large on cuda)")
    s.add_argument("--shapes", type=options.positive_int, default=None, metavar="K",
                   help="MHA shape classes (kernel specialisations) per seed; MLA gets K/3")
    v.add_argument("--max-seconds", type=options.positive_float, default=None, metavar="T",
                   help="stop cleanly after T seconds (wall) and report what ran")
    v.add_argument("--profile", action="store_true", help="print where the time went (the JSON always has it)")
    debug_commands.add_verify_arguments(v)
    v.set_defaults(func=run)


def _fail(message: str) -> int:
    print(f"attncheck verify: {' '.join(message.split())}", file=sys.stderr)
    return 2


def _check(args):
    """Everything that can be wrong before running, as a one-line message (None = fine)."""
    from attncheck import backends, golden, report

    for path, option in ((args.json, "--json"), (args.junit, "--junit")):
        if path:
            report.check_writable(path, option)
    debug_commands.check_verify_arguments(args)
    args.tier = options.implied_tier(args.tier, args.case)
    settings = runtime.resolve(args.device, args.tier, args.provider)
    if settings.tier in cases.STORED_TIERS:
        try:
            golden.read_manifest()
        except golden.GoldenError as e:
            raise ValueError(f"golden store: {e}") from None
    for spec in args.backend_plugin:
        backends.load_plugin(spec)
    for name in args.backend or ():
        backends.check_name(name)
    sweep.check_case_names(args.case or (), settings.tier)
    sweep_only = [flag for flag, value in (("--count", args.count), ("--seed", args.seed or None),
                                           ("--sweep-size", args.sweep_size), ("--shapes", args.shapes))
                  if value is not None]
    if sweep_only and settings.tier != "sweep":
        raise ValueError(f"{', '.join(sweep_only)}: only for the sweep tier (--tier sweep), not {settings.tier}")
    return settings


def worker_count(args, settings) -> int:
    """The number of pytest-xdist workers (0 or 1: in this process)."""
    if args.workers is None:
        return 2 if settings.device == "cpu" else 1
    if args.workers != "auto":
        return args.workers
    if settings.device == "cpu":
        return os.cpu_count() or 1
    gpus = len(options.visible_gpus())
    return gpus * (args.workers_per_gpu or options.default_workers_per_gpu(gpus))


def pytest_args(args, settings, session_dir: str) -> list:
    """Arguments of the pytest run: the plugin's suite alone, in an empty directory with an
    empty ini file, so that nothing around (a project's conftest, ini or tests) takes part.
    Plugin autoloading is off for the run (see ``run``), so the plugins it needs are named here."""
    pargs = [session_dir, "-c", str(Path(session_dir) / "pytest.ini"), "--rootdir", session_dir, "--noconftest",
             "-p", "attncheck.pytest_plugin", "-p", "no:cacheprovider", "-q", "--tb=no", "-rN", "--attncheck",
             "--attncheck-device", settings.device, "--attncheck-tier", settings.tier]
    if settings.provider:
        pargs += ["--attncheck-provider", settings.provider]
    if args.backend:
        pargs += ["--attncheck-backend", *args.backend]
    if args.case:
        pargs += ["--attncheck-case", *args.case]
    for spec in args.backend_plugin:
        pargs += ["--attncheck-backend-plugin", spec]
    for path, option in ((args.json, "--attncheck-json"), (args.junit, "--attncheck-junit")):
        if path:
            pargs += [option, str(Path(path).absolute())]
    pargs += debug_commands.verify_pytest_args(args)
    for option, value in (("--attncheck-sweep-count", args.count), ("--attncheck-sweep-seed", args.seed),
                          ("--attncheck-sweep-size", args.sweep_size), ("--attncheck-sweep-shapes", args.shapes),
                          ("--attncheck-max-seconds", args.max_seconds)):
        if value is not None and (settings.tier == "sweep" or option == "--attncheck-max-seconds"):
            pargs += [option, str(value)]
    if args.profile:
        pargs += ["--attncheck-profile"]
    workers = worker_count(args, settings)
    if workers > 1:
        pargs += ["-p", "xdist.plugin", "-n", str(workers), "--dist", "loadgroup"]
    return pargs


@contextlib.contextmanager
def _no_plugin_autoload():
    """Third-party pytest plugins of the environment stay out of the verify run: they are not
    part of the verdict and some write into the working directory (pytest-benchmark creates
    ``.benchmarks/``) or change the run (reordering, reruns). The variable reaches xdist's
    workers through their environment; it is restored afterwards."""
    old = os.environ.get(_AUTOLOAD)
    os.environ[_AUTOLOAD] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_AUTOLOAD, None)
        else:
            os.environ[_AUTOLOAD] = old


_AUTOLOAD = "PYTEST_DISABLE_PLUGIN_AUTOLOAD"


def run(args) -> int:
    import pytest

    from attncheck import backends, golden, report

    try:
        settings = _check(args)
    except (runtime.SetupError, backends.PluginError, backends.UnknownBackendError, golden.GoldenError,
            ValueError) as e:
        return _fail(str(e))
    except KeyError as e:  # an unknown case name (the message names the closest ones)
        return _fail(str(e.args[0]))
    chosen = args.backend or backends.names()
    what = f"tier {settings.tier}"
    if settings.tier == "sweep":
        what += (f" ({', '.join(args.case)})" if args.case else
                 f" (seed {args.seed}, {args.count if args.count is not None else options.DEFAULT_SWEEP_COUNT[settings.device]} configurations)")
    print(f"attncheck verify: {what} on {settings.device}, {max(1, worker_count(args, settings))} worker(s); "
          f"backends: {', '.join(chosen)}", flush=True)
    collector = report.VerdictCollector()
    with tempfile.TemporaryDirectory(prefix="attncheck-verify-") as session_dir:
        (Path(session_dir) / "pytest.ini").write_text("[pytest]\n")
        with _no_plugin_autoload():
            rc = pytest.main(pytest_args(args, settings, session_dir), plugins=[collector])
    if rc == pytest.ExitCode.USAGE_ERROR:
        return 2
    if not collector.verdicts:
        print("attncheck verify: no backend x case pairs were run", file=sys.stderr)
        return 1
    debug_commands.after_verify(args, collector.sorted(), {"device": settings.device, "tier": settings.tier})
    n = report.counts(collector.verdicts)
    return 1 if (rc not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED) or n["fail"] or n["error"]) else 0
