"""attncheck's pytest plugin: every backend x every golden case of a tier, judged, as pytest tests.

Installed with attncheck (entry point ``pytest11``), so any project can run

    pytest --attncheck-tier smoke --attncheck-backend MY_KERNEL --attncheck-backend-plugin my_backends:BACKEND

``attncheck verify`` is this plugin driven with fixed options. Options (group "attncheck"):
``--attncheck-device auto|cpu|cuda``, ``--attncheck-tier smoke|full|large``,
``--attncheck-backend NAME ...`` (default: every registered backend),
``--attncheck-backend-plugin MODULE:ATTR`` (repeatable), ``--attncheck-case NAME ...``,
``--attncheck-provider vllm|stand-in``, ``--attncheck-json PATH``, ``--attncheck-junit PATH``,
``--attncheck-save-failures DIR`` (repro bundles, docs/debugging.md),
``--attncheck`` (collect the suite with the defaults). Giving any of the tier, backend or case
options, or ``--attncheck``, adds the suite to the run.

The sweep tier (``--attncheck-tier sweep``, docs/sweep.md) draws ``--attncheck-sweep-count N``
configurations from ``--attncheck-sweep-seed S`` (``attncheck.sweep``); a backend gets only the
configurations its capabilities accept. ``--attncheck-case sweep:S:I`` re-runs one of them.
``--attncheck-max-seconds T`` stops any tier cleanly after T seconds (what ran is reported; a
run stopped by its budget exits as if it had finished). ``--attncheck-profile`` prints where
the time went (the JSON always has it: ``attncheck.timing``).

All GPUs: under pytest-xdist each worker is pinned to one GPU before CUDA starts (worker gwN ->
visible GPU N mod count), and ``-n auto`` with a CUDA device means GPUs x
``--attncheck-workers-per-gpu`` workers. With ``--dist loadgroup`` (what ``attncheck verify``
uses) the suite schedules by case (a sweep: by shape class and block of indices,
``sweep.worker_group``): a case's backends run on one worker and its live oracle is built once,
and a sweep's kernel specialisations are compiled by few workers (``pytest_xdist_make_scheduler``).

The items hang from the session, not from a file: ``attncheck::TRITON_ATTN[decode-h8x2-...]``.
A project can add the suite to its own full runs with the ini setting
``attncheck_suite_with_testpaths = true`` (this repository does).
Each runs ``attncheck.harness.run_backend`` and passes, fails (reason and localized report),
skips (the missing capability) or xfails (a declared known issue). Its verdict rides on the
test report as a dict (``report.attncheck_verdict``), through xdist too; the terminal summary
prints the backend x family matrix and every problem.

This module imports no torch at load time: it is loaded by every pytest run in an environment
where attncheck is installed, and does its work only when asked.
"""

from __future__ import annotations

import os
import re
import time

import pytest

from attncheck.options import (DEFAULT_SWEEP_COUNT, TIERS, default_workers_per_gpu, implied_tier,
                               non_negative_int, positive_float, positive_int, visible_gpus)

SUITE_NAME = "attncheck"
TIER_MARKERS = {
    "smoke": "small cases, CPU CI (Triton interpreter)",
    "full": "medium stored goldens, GPU",
    "large": "long contexts generated from a seed, checked live on the GPU",
    "sweep": "configurations drawn from a seed, checked live (GPU; small counts on the CPU)",
}
_SETTINGS = pytest.StashKey()
_COLLECTOR = pytest.StashKey()
_CLOCK = pytest.StashKey()  # {"start": epoch seconds, "deadline": epoch seconds or None}
_SWEEP = pytest.StashKey()  # per-backend collection counts of a sweep


def pytest_addoption(parser):
    g = parser.getgroup("attncheck", "attncheck: backends x golden cases")
    g.addoption("--attncheck", action="store_true", dest="attncheck_run", default=False,
                help="collect the backends x golden cases suite (implied by the tier, backend and case options)")
    g.addoption("--attncheck-device", dest="attncheck_device", default=None, choices=("auto", "cpu", "cuda"),
                help="where backends run (default auto: cuda if present, else cpu)")
    g.addoption("--attncheck-tier", dest="attncheck_tier", default=None, choices=TIERS,
                help="golden tier (default: smoke on cpu, full on cuda; sweep: configurations drawn from a seed)")
    g.addoption("--attncheck-backend", dest="attncheck_backend", nargs="+", default=None, metavar="NAME",
                help="backends to check (default: every registered backend)")
    g.addoption("--attncheck-backend-plugin", dest="attncheck_backend_plugin", action="append", default=[],
                metavar="MODULE:ATTR", help="register backends from MODULE:ATTR (the current directory is importable)")
    g.addoption("--attncheck-case", dest="attncheck_case", nargs="+", default=None, metavar="NAME",
                help="only these cases of the tier")
    g.addoption("--attncheck-provider", dest="attncheck_provider", default=None, choices=("vllm", "stand-in"),
                help="kernel provider preference (sets ATTNCHECK_PROVIDER for every process)")
    g.addoption("--attncheck-json", dest="attncheck_json", default=None, metavar="PATH",
                help="write verdicts, matrix and environment as JSON")
    g.addoption("--attncheck-junit", dest="attncheck_junit", default=None, metavar="PATH",
                help="write a JUnit XML report of the verdicts (a backend exception is an <error>)")
    g.addoption("--attncheck-save-failures", dest="attncheck_save_failures", default=None, metavar="DIR",
                help="write each failing or erroring verdict as a repro bundle (safetensors) into DIR")
    g.addoption("--attncheck-sweep-count", dest="attncheck_sweep_count", default=None, type=non_negative_int,
                metavar="N", help="sweep tier: configurations to draw (default 20 on cpu, 1000 on cuda)")
    g.addoption("--attncheck-sweep-seed", dest="attncheck_sweep_seed", default=0, type=non_negative_int,
                metavar="S", help="sweep tier: the seed configurations are drawn from (default 0)")
    g.addoption("--attncheck-sweep-size", dest="attncheck_sweep_size", default=None, choices=("small", "large"),
                help="sweep tier: configuration sizes (default small on cpu, large on cuda)")
    g.addoption("--attncheck-sweep-shapes", dest="attncheck_sweep_shapes", default=None, type=positive_int,
                metavar="K", help="sweep tier: MHA shape classes (kernel specialisations) per seed "
                                  "(default 10 small, 16 large; MLA gets K/3)")
    g.addoption("--attncheck-max-seconds", dest="attncheck_max_seconds", default=None, type=positive_float,
                metavar="T", help="stop cleanly after T seconds of wall time and report what ran")
    g.addoption("--attncheck-workers-per-gpu", dest="attncheck_workers_per_gpu", default=None,
                type=positive_int, metavar="W", help="with -n auto on cuda: workers per visible GPU "
                                                      "(default: min(12, 3/4 of the CPU cores / GPUs), at least 1)")
    g.addoption("--attncheck-profile", dest="attncheck_profile", action="store_true", default=False,
                help="print where the time went (phases, compilations, per backend)")
    parser.addini("attncheck_suite_with_testpaths", type="bool", default=False,
                  help="attncheck: also collect the backends x golden cases suite when pytest runs the "
                       "testpaths (no paths given on the command line)")


def suite_requested(config) -> bool:
    opt = config.option
    return bool(opt.attncheck_run or opt.attncheck_tier or opt.attncheck_backend or opt.attncheck_case)


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")


def _pin_worker_gpu(config) -> None:
    """One GPU per xdist worker, chosen before CUDA starts: worker gwN gets visible GPU
    N mod count (a CUDA_VISIBLE_DEVICES list set for the run is honoured)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker or config.option.attncheck_device == "cpu" or "ATTNCHECK_PINNED_GPU" in os.environ:
        return
    import torch

    if torch.cuda.is_initialized():  # too late to choose a device for this process
        return
    ids = visible_gpus()
    if not ids:
        return
    mine = ids[int(worker[2:]) % len(ids)]
    os.environ["CUDA_VISIBLE_DEVICES"] = mine
    os.environ["ATTNCHECK_PINNED_GPU"] = mine
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))  # CPU work of the workers: no oversubscription


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """``-n auto`` with a CUDA device: GPUs x workers per GPU (None: xdist's CPU count)."""
    device = config.option.attncheck_device
    if device == "cpu":
        return None
    try:
        gpus = len(visible_gpus())
    except Exception:  # no usable torch/NVML: let xdist decide
        return None
    if not gpus:
        return None
    return gpus * (config.option.attncheck_workers_per_gpu or default_workers_per_gpu(gpus))


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """Hand the run's deadline (absolute) to every xdist worker."""
    clock = node.config.stash.get(_CLOCK, None)
    if clock and clock.get("deadline"):
        node.workerinput["attncheck_deadline"] = clock["deadline"]


_ITEM_CASE = re.compile(r"(?:^|::)attncheck::[^\[]+\[(.+)\](?:@.*)?$")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup``: xdist's scheduling with this suite's groups, so a case's backends run
    on one worker (its live oracle is built once) and a sweep's group (``sweep.worker_group``) on one
    worker, assigned by ``next_group`` so that few workers compile each class. The groups come from
    the node ids, not from ``xdist_group`` marks: xdist 3.8 marks a group by rewriting an item's
    node id, which pytest 9 ignores. Other tests keep xdist's own grouping."""
    if not suite_requested(config) or config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    group_of = case_group(config)

    class CaseGroupScheduling(LoadGroupScheduling):
        def __init__(self, config, log=None):
            super().__init__(config, log)
            self.started, self.ran = set(), {}  # classes given to any worker; per worker

        def _split_scope(self, nodeid: str) -> str:
            match = _ITEM_CASE.search(nodeid)
            return group_of(match.group(1)) if match else super()._split_scope(nodeid)

        def _assign_work_unit(self, node) -> None:  # xdist pops the first group of its queue
            mine = self.ran.setdefault(node, set())
            scope = next_group(list(self.workqueue), self.started, mine)
            self.workqueue.move_to_end(scope, last=False)
            self.started.add(group_class(scope))
            mine.add(group_class(scope))
            super()._assign_work_unit(node)

    return CaseGroupScheduling(config, log)


def group_class(group: str) -> str:
    """The shape class of a sweep worker group (``CLASS#BLOCK``); any other group is its own."""
    return group.split("#", 1)[0]


def next_group(queue: list, started: set, mine: set) -> str:
    """The group a free worker takes next: the first queued group of a class no worker has
    started (a time-capped sweep reaches every class), else the first of a class this worker has
    run (its kernels are compiled here already), else the first in the queue."""
    for wanted in (lambda c: c not in started, lambda c: c in mine):
        for group in queue:
            if wanted(group_class(group)):
                return group
    return queue[0]


def case_group(config):
    """case name -> the worker group of its items (the case; a sweep configuration: ``sweep.worker_group``)."""
    from attncheck import sweep

    if setup_run(config).tier != "sweep":
        return lambda name: name
    _, _, sizes, shapes, _ = sweep_plan(config)
    return lambda name: sweep.worker_group(sweep.case_from_name(name, sizes, shapes))


def setup_run(config, suite: bool = False):
    """Resolve device, tier and provider, load backend plugins and check the names and output
    paths asked for (and, when the suite runs, that the golden store can be read); once per
    process. Any problem is a one-line usage error."""
    if _SETTINGS in config.stash:
        return config.stash[_SETTINGS]
    _pin_worker_gpu(config)
    from attncheck import backends, cases, golden, report, runtime, sweep

    opt = config.option
    opt.attncheck_tier = implied_tier(opt.attncheck_tier, opt.attncheck_case)
    try:
        settings = runtime.resolve(opt.attncheck_device, opt.attncheck_tier, opt.attncheck_provider)
        for spec in opt.attncheck_backend_plugin or ():
            backends.load_plugin(spec)
        for name in opt.attncheck_backend or ():
            backends.check_name(name)
        sweep.check_case_names(opt.attncheck_case or (), settings.tier)
        if not _is_worker(config):
            for path, option in ((opt.attncheck_json, "--attncheck-json"), (opt.attncheck_junit, "--attncheck-junit")):
                if path:
                    report.check_writable(path, option)
            if suite and settings.tier in cases.STORED_TIERS:
                golden.read_manifest()
    except (runtime.SetupError, backends.PluginError, backends.UnknownBackendError, golden.GoldenError,
            ValueError, KeyError) as e:
        raise pytest.UsageError(f"attncheck: {_one_line(e)}") from None
    config.stash[_SETTINGS] = settings
    return settings


def _one_line(e: Exception) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(text.split())


def sweep_plan(config):
    """(seed, count, sizes, shapes, names) of this run's sweep."""
    from attncheck import sweep

    opt = config.option
    settings = setup_run(config)
    sizes = sweep.sizes_for(settings.device, opt.attncheck_sweep_size)
    count = opt.attncheck_sweep_count
    if count is None:
        count = DEFAULT_SWEEP_COUNT[settings.device]
    names = list(opt.attncheck_case or ())
    seed = opt.attncheck_sweep_seed
    named_seeds = {sweep.parse_name(n)[0] for n in names if sweep.is_sweep_name(n)}
    if len(named_seeds) == 1:  # `--case sweep:S:I`: the report describes seed S, not the default seed
        seed = named_seeds.pop()
    return seed, count, sizes, opt.attncheck_sweep_shapes, names


def sweep_cases(config) -> list:
    """The configurations of this run: the names given, else the first ``count`` of the seed."""
    from attncheck import sweep

    seed, count, sizes, shapes, names = sweep_plan(config)
    if names:
        return [sweep.case_from_name(n, sizes, shapes) for n in dict.fromkeys(names)]
    return sweep.configs(seed, count, sizes, shapes)


def _deadline(config):
    clock = config.stash.get(_CLOCK, None)
    return clock.get("deadline") if clock else None


def budget_reached(config) -> bool:
    deadline = _deadline(config)
    return deadline is not None and time.time() >= deadline


def pytest_configure(config):
    for tier, text in TIER_MARKERS.items():
        config.addinivalue_line("markers", f"{tier}: {text}")
    if config.getini("attncheck_suite_with_testpaths") and config.args_source == pytest.Config.ArgsSource.TESTPATHS:
        config.option.attncheck_run = True  # xdist hands the options on to its workers
    if _is_worker(config):
        config.stash[_CLOCK] = {"start": time.time(), "deadline": config.workerinput.get("attncheck_deadline")}
    else:
        start = time.time()
        budget = config.option.attncheck_max_seconds
        config.stash[_CLOCK] = {"start": start, "deadline": start + budget if budget else None}
    if not (suite_requested(config) or config.option.attncheck_backend_plugin):
        return
    setup_run(config, suite=suite_requested(config))
    if not _is_worker(config):
        from attncheck import report

        collector = next((p for p in config.pluginmanager.get_plugins() if isinstance(p, report.VerdictCollector)),
                         None)
        if collector is None:
            collector = report.VerdictCollector()
            config.pluginmanager.register(collector, "attncheck-verdicts")
        config.stash[_COLLECTOR] = collector


@pytest.hookimpl(tryfirst=True)  # before -k / -m deselect
def pytest_collection_modifyitems(session, config, items):
    """The suite hangs from the session (node ids ``attncheck::BACKEND[case]``), not from a
    file: nothing of the project around it (conftests, ini patterns) changes what it collects."""
    if suite_requested(config):
        items.extend(session.genitems(GoldenSuite.from_parent(session, name=SUITE_NAME)))


class GoldenSuite(pytest.Collector):
    """The backend x case items of the run's tier, case-major (consecutive items share a case,
    so a live tier's float64 oracle, cached per process, is built once per case). A sweep
    pairs a backend only with the configurations its capabilities accept."""

    def collect(self):
        from attncheck import backends, cases

        settings = setup_run(self.config)
        opt = self.config.option
        chosen = list(opt.attncheck_backend or backends.names())
        if settings.tier == "sweep":
            pairs, self.config.stash[_SWEEP] = sweep_pairs(sweep_cases(self.config), chosen)
        else:
            rows = [c for c in cases.select_cases(tier=settings.tier) if c.kind in ("MHA", "MLA")]
            if opt.attncheck_case:
                rows = [c for c in rows if c.name in set(opt.attncheck_case)]
            kinds = {name: backends.kind_of(name) for name in chosen}
            # an MHA backend is never paired with an MLA case, and vice versa
            pairs = [(case, name) for case in rows for name in chosen if kinds[name] in (None, case.kind)]
        for case, name in pairs:
            item = BackendCaseItem.from_parent(self, name=f"{name}[{case.name}]", backend=name, case=case.name,
                                               case_obj=case if settings.tier == "sweep" else None)
            item.add_marker(getattr(pytest.mark, case.tier))
            yield item


def sweep_pairs(rows: list, chosen: list) -> tuple:
    """(case, backend) pairs of a sweep, case-major, each backend only with the configurations
    its capabilities accept; and per backend how many configurations of its kind there were,
    how many it accepted and why the others were filtered."""
    from attncheck import backends

    kinds = {name: backends.kind_of(name) for name in chosen}
    caps = {name: backends.get_backend(name).capabilities for name in chosen if kinds[name]}
    counts = {name: {"configurations_of_its_kind": 0, "accepted": 0, "filtered_by_capability": {}}
              for name in chosen}
    pairs = []
    for case in rows:
        params = case.params()
        for name in chosen:
            if kinds[name] not in (None, case.kind):
                continue
            c = counts[name]
            c["configurations_of_its_kind"] += 1
            if kinds[name] is None:  # a backend that does not load: its error once, not per configuration
                if not c["accepted"]:
                    c["accepted"] += 1
                    pairs.append((case, name))
                continue
            why = caps[name].unsupported(params)
            if why:
                c["filtered_by_capability"][why] = c["filtered_by_capability"].get(why, 0) + 1
                continue
            c["accepted"] += 1
            pairs.append((case, name))
    return pairs, counts


class VerdictFailure(Exception):
    """A backend x case test that did not pass; carries its verdict."""

    def __init__(self, verdict):
        super().__init__(verdict.reason)
        self.verdict = verdict


class BackendCaseItem(pytest.Item):
    def __init__(self, *, backend: str, case: str, case_obj=None, **kw):
        super().__init__(**kw)
        self.backend, self.case = backend, case
        self.case_obj = case_obj  # sweep configurations are not catalogue rows: the item holds the case
        self.verdict = None

    def runtest(self):
        from attncheck import harness, runtime

        settings = setup_run(self.config)
        save_dir = self.config.option.attncheck_save_failures
        case = self.case_obj or self.case
        self.verdict = v = harness.run_backend(self.backend, case, device=settings.device,
                                               keep_artifacts=bool(save_dir))
        runtime.release_cached_memory(settings.device)
        if budget_reached(self.config):  # this check is reported; the run stops after it
            self.session.shouldstop = f"attncheck: time budget of {self.config.option.attncheck_max_seconds:g} s reached"
        if save_dir and v.status in ("fail", "error"):  # written here, in the worker that has the tensors
            from attncheck.debug import bundle
            tensors = harness.golden_tensors(case, settings.device) if self.case_obj is not None else None
            bundle.save_verdict(save_dir, v, None, case, settings.device, tensors=tensors)
        v.artifacts = None
        if v.status == "skip":
            pytest.skip(v.reason)
        if v.status == "xfail":
            pytest.xfail(v.reason)
        if v.status != "pass":
            raise VerdictFailure(v)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, VerdictFailure):
            v = excinfo.value.verdict
            return f"{v.status.upper()}: {v.reason}\n{v.report}"
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, f"{self.backend} on {self.case}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if isinstance(item, BackendCaseItem) and call.when == "call" and item.verdict is not None:
        from attncheck import report

        setattr(rep, report.REPORT_ATTRIBUTE, item.verdict.as_dict())
    return rep


def pytest_terminal_summary(terminalreporter, config):
    collector = config.stash.get(_COLLECTOR, None)
    if collector is None or not collector.verdicts:
        return
    from attncheck import report, timing

    verdicts = collector.sorted()
    tr = terminalreporter
    tr.section("attncheck: backend x case family")
    tr.write_line(report.render_matrix(verdicts))
    problems = report.render_problems(verdicts)
    if problems:
        tr.write_line("")
        tr.write_line(problems)
    unverified = sorted({v.backend for v in verdicts if v.status == "skip" and not v.verified})
    if unverified:
        tr.write_line(f"\nnot verified on this machine (ROCm-only paths): {', '.join(unverified)}")
    extra = run_summary(config, verdicts)
    if "sweep" in extra:
        tr.section("attncheck: sweep")
        tr.write_line(report.render_sweep(extra["sweep"]))
    if config.option.attncheck_profile:
        tr.section("attncheck: where the time went")
        tr.write_line(timing.render(extra["timing"]))


def _workers(config) -> int:
    return len(getattr(config.option, "tx", None) or ()) if getattr(config.option, "dist", "no") != "no" else 1


def run_summary(config, verdicts: list) -> dict:
    """Timing totals (attncheck.timing) and, for a sweep, what it covered; in the controller."""
    from attncheck import report, timing

    clock = config.stash.get(_CLOCK, {"start": time.time()})
    wall = time.time() - clock["start"]
    out = {"timing": timing.summary(verdicts, wall, _workers(config), started=clock["start"])}
    settings = config.stash.get(_SETTINGS, None)
    if settings is not None and settings.tier == "sweep":
        from attncheck import backends

        seed, count, sizes, shapes, names = sweep_plan(config)
        counts = config.stash.get(_SWEEP, None)
        if counts is None:  # an xdist controller collects nothing: count the pairs here
            counts = sweep_pairs(sweep_cases(config), list(config.option.attncheck_backend or backends.names()))[1]
        out["sweep"] = report.sweep_report(verdicts, counts, seed=seed, count=count, sizes=sizes, shapes=shapes,
                                           names=names, wall=wall, budget=config.option.attncheck_max_seconds,
                                           budget_reached=budget_reached(config))
    return out


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    config = session.config
    collector = config.stash.get(_COLLECTOR, None)
    if collector is None or _is_worker(config):
        return
    from attncheck import report, runtime

    verdicts = collector.sorted()
    if exitstatus == pytest.ExitCode.INTERRUPTED and budget_reached(config):
        # stopped by --attncheck-max-seconds, as asked: judge what ran
        bad = any(v.status in ("fail", "error") for v in verdicts)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED if bad else pytest.ExitCode.OK
    settings = config.stash[_SETTINGS]
    if config.option.attncheck_json:
        report.write_json(config.option.attncheck_json, verdicts, settings, runtime.environment(),
                          extra=run_summary(config, verdicts))
    if config.option.attncheck_junit:
        report.write_atomic(config.option.attncheck_junit, report.junit_xml(verdicts))
