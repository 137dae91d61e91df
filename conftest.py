"""pytest wiring of attncheck's own test suite.

The run settings (device, tier, backend plugins, the Triton interpreter on the CPU) come from
attncheck's pytest plugin (``attncheck/pytest_plugin.py``), which also collects the backends x
golden cases suite (listed in ``testpaths``). Here: the short option names this repository's
commands use (``--device``, ``--tier``, ``--backend``, ``--backend-plugin``, the same settings
as ``--attncheck-*``), the ``device`` and ``tier`` fixtures, and the skip of ``gpu`` tests off a GPU.
"""

import pytest

# Also when the entry point is not installed (a checkout on PYTHONPATH, a stale editable install).
pytest_plugins = ["attncheck.pytest_plugin"]


def pytest_addoption(parser):
    g = parser.getgroup("attncheck")
    g.addoption("--device", dest="attncheck_device", choices=("auto", "cpu", "cuda"),
                help="short for --attncheck-device")
    g.addoption("--tier", dest="attncheck_tier", choices=("smoke", "full", "large", "sweep"),
                help="short for --attncheck-tier")
    g.addoption("--backend", dest="attncheck_backend", nargs="+", metavar="NAME", help="short for --attncheck-backend")
    g.addoption("--backend-plugin", dest="attncheck_backend_plugin", action="append", default=[], metavar="MODULE:ATTR",
                help="short for --attncheck-backend-plugin")


def pytest_configure(config):
    from attncheck import pytest_plugin

    pytest_plugin.setup_run(config)  # every test here runs on the resolved device


@pytest.fixture(scope="session")
def device(pytestconfig) -> str:
    """"cpu" or "cuda": where this run's kernels and backends execute."""
    from attncheck import pytest_plugin

    return pytest_plugin.setup_run(pytestconfig).device


@pytest.fixture(scope="session")
def tier(pytestconfig) -> str:
    from attncheck import pytest_plugin

    return pytest_plugin.setup_run(pytestconfig).tier


def pytest_collection_modifyitems(config, items):
    from attncheck import pytest_plugin

    if pytest_plugin.setup_run(config).device != "cuda":
        skip = pytest.mark.skip(reason="needs a CUDA GPU (run with --device cuda on a GPU machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
