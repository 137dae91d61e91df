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
import pytest

SUITE_NAME = "attncheck"
TIER_MARKERS = {
    "smoke": "small cases, CPU CI (Triton interpreter)",
    "full": "medium stored goldens, GPU",
    "large": "long contexts generated from a seed, checked live on the GPU",
}
_SETTINGS = pytest.StashKey()
_COLLECTOR = pytest.StashKey()


def pytest_addoption(parser):
    g = parser.getgroup("attncheck", "attncheck: backends x golden cases")
    g.addoption("--attncheck", action="store_true", dest="attncheck_run", default=False,
                help="collect the backends x golden cases suite (implied by the tier, backend and case options)")
    g.addoption("--attncheck-device", dest="attncheck_device", default=None, choices=("auto", "cpu", "cuda"),
                help="where backends run (default auto: cuda if present, else cpu)")
    g.addoption("--attncheck-tier", dest="attncheck_tier", default=None, choices=("smoke", "full", "large"),
                help="golden tier (default: smoke on cpu, full on cuda)")
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
    parser.addini("attncheck_suite_with_testpaths", type="bool", default=False,
                  help="attncheck: also collect the backends x golden cases suite when pytest runs the "
                       "testpaths (no paths given on the command line)")


def suite_requested(config) -> bool:
    opt = config.option
    return bool(opt.attncheck_run or opt.attncheck_tier or opt.attncheck_backend or opt.attncheck_case)


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")


def _pin_worker_gpu(config) -> None:
    """One GPU per xdist worker, chosen before CUDA initialises (gwN -> GPU N mod count)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker or "CUDA_VISIBLE_DEVICES" in os.environ or config.option.attncheck_device == "cpu":
        return
    import torch

    n = torch.cuda.device_count()
    if n > 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(int(worker[2:]) % n)


def setup_run(config, suite: bool = False):
    """Resolve device, tier and provider, load backend plugins and check the names and output
    paths asked for (and, when the suite runs, that the golden store can be read); once per
    process. Any problem is a one-line usage error."""
    if _SETTINGS in config.stash:
        return config.stash[_SETTINGS]
    _pin_worker_gpu(config)
    from attncheck import backends, cases, golden, report, runtime

    opt = config.option
    try:
        settings = runtime.resolve(opt.attncheck_device, opt.attncheck_tier, opt.attncheck_provider)
        for spec in opt.attncheck_backend_plugin or ():
            backends.load_plugin(spec)
        for name in opt.attncheck_backend or ():
            backends.check_name(name)
        for name in opt.attncheck_case or ():
            cases.get_case(name)
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


def pytest_configure(config):
    for tier, text in TIER_MARKERS.items():
        config.addinivalue_line("markers", f"{tier}: {text}")
    if config.getini("attncheck_suite_with_testpaths") and config.args_source == pytest.Config.ArgsSource.TESTPATHS:
        config.option.attncheck_run = True  # xdist hands the options on to its workers
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
    so the large tier's live float64 oracle, cached per process, is built once per case)."""

    def collect(self):
        from attncheck import backends, cases

        settings = setup_run(self.config)
        opt = self.config.option
        chosen = list(opt.attncheck_backend or backends.names())
        kinds = {name: backends.kind_of(name) for name in chosen}
        rows = [c for c in cases.select_cases(tier=settings.tier) if c.kind in ("MHA", "MLA")]
        if opt.attncheck_case:
            rows = [c for c in rows if c.name in set(opt.attncheck_case)]
        for case in rows:
            for name in chosen:
                if kinds[name] is not None and kinds[name] != case.kind:
                    continue  # an MHA backend is never paired with an MLA case, and vice versa
                item = BackendCaseItem.from_parent(self, name=f"{name}[{case.name}]", backend=name, case=case.name)
                item.add_marker(getattr(pytest.mark, case.tier))
                yield item


class VerdictFailure(Exception):
    """A backend x case test that did not pass; carries its verdict."""

    def __init__(self, verdict):
        super().__init__(verdict.reason)
        self.verdict = verdict


class BackendCaseItem(pytest.Item):
    def __init__(self, *, backend: str, case: str, **kw):
        super().__init__(**kw)
        self.backend, self.case = backend, case
        self.verdict = None

    def runtest(self):
        from attncheck import harness

        settings = setup_run(self.config)
        save_dir = self.config.option.attncheck_save_failures
        self.verdict = v = harness.run_backend(self.backend, self.case, device=settings.device,
                                               keep_artifacts=bool(save_dir))
        if save_dir and v.status in ("fail", "error"):  # written here, in the worker that has the tensors
            from attncheck.debug import bundle
            bundle.save_verdict(save_dir, v, None, self.case, settings.device)
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
    from attncheck import report

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


def pytest_sessionfinish(session):
    config = session.config
    collector = config.stash.get(_COLLECTOR, None)
    if collector is None or _is_worker(config):
        return
    from attncheck import report, runtime

    verdicts = collector.sorted()
    settings = config.stash[_SETTINGS]
    if config.option.attncheck_json:
        report.write_json(config.option.attncheck_json, verdicts, settings, runtime.environment())
    if config.option.attncheck_junit:
        report.write_atomic(config.option.attncheck_junit, report.junit_xml(verdicts))
