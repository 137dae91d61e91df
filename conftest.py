"""pytest wiring for attncheck: options, device, tiers, backend plugins, xdist -> GPU mapping.

Options: --device {auto,cpu,cuda}, --tier {smoke,full,large}, --backend NAME..., and
--backend-plugin module:attr (repeatable). On the CPU the Triton interpreter is switched on
before any kernel module is imported.
"""

import os

import pytest


def pytest_addoption(parser):
    g = parser.getgroup("attncheck")
    g.addoption("--device", default="auto", choices=("auto", "cpu", "cuda"),
                help="where backends run (auto: cuda if present, else cpu)")
    g.addoption("--tier", default=None, choices=("smoke", "full", "large"),
                help="golden tier (default: smoke on cpu, full on cuda)")
    g.addoption("--backend", nargs="+", default=None, metavar="NAME",
                help="backends to check (default: all registered)")
    g.addoption("--backend-plugin", action="append", default=[], metavar="MODULE:ATTR",
                help="register third-party backends from MODULE:ATTR")


def _cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def resolve_device(config) -> str:
    dev = config.getoption("--device")
    if dev == "auto":
        dev = "cuda" if _cuda_available() else "cpu"
    return dev


def pytest_configure(config):
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and "CUDA_VISIBLE_DEVICES" not in os.environ and config.getoption("--device") != "cpu":
        # One GPU per xdist worker, chosen before CUDA initialises (gwN -> GPU N mod count).
        try:
            import torch
            n = torch.cuda.device_count()
        except Exception:
            n = 0
        if n > 1:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(int(worker[2:]) % n)
    device = resolve_device(config)
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    tier = config.getoption("--tier") or ("smoke" if device == "cpu" else "full")
    config.attncheck = {"device": device, "tier": tier}
    for spec in config.getoption("--backend-plugin"):
        from attncheck import backends
        backends.load_plugin(spec)


@pytest.fixture(scope="session")
def device(pytestconfig) -> str:
    return pytestconfig.attncheck["device"]


@pytest.fixture(scope="session")
def tier(pytestconfig) -> str:
    return pytestconfig.attncheck["tier"]


def pytest_collection_modifyitems(config, items):
    if config.attncheck["device"] != "cuda":
        skip = pytest.mark.skip(reason="needs a CUDA GPU (run with --device cuda on a GPU machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
