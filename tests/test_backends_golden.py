"""Every backend x every golden case of the selected tier, judged by attncheck.rule.

Parametrized from golden/MANIFEST.json (sorted), so xdist workers collect the same list.
Unsupported pairs are skipped with the capability named; a declared known issue is an xfail
with its reason; anything else that is not a pass fails with the localized report.
"""

import json

import pytest

from attncheck import backends, cases, golden, harness


def _cases(tier: str) -> list:
    """(name, kind) of the tier's cases: from the manifest for stored tiers."""
    if tier in cases.STORED_TIERS:
        manifest = json.loads((golden.golden_dir() / golden.MANIFEST_NAME).read_text())
        return [(n, e["kind"]) for n, e in manifest["cases"].items()
                if e["tier"] == tier and e["kind"] in ("MHA", "MLA")]
    return [(c.name, c.kind) for c in cases.select_cases(tier=tier) if c.kind in ("MHA", "MLA")]


def _kind(name: str):
    """The backend's attention kind, or None when it cannot even be loaded (then every case
    is collected, so that the load error is reported per case instead of vanishing)."""
    try:
        return backends.get_backend(name).kind
    except (backends.UnknownBackendError, backends.PluginError):
        return None


def pytest_generate_tests(metafunc):
    if "backend_case" not in metafunc.fixturenames:
        return
    cfg = metafunc.config
    tier = cfg.attncheck["tier"]
    chosen = cfg.getoption("--backend") or backends.names()
    params = []
    kinds = {name: _kind(name) for name in chosen}
    # case-major order: consecutive tests share one case, so the large tier's live float64
    # oracle (cached per process) is computed once per case, not once per backend
    for case, case_kind in sorted(_cases(tier)):
        for name in chosen:
            if kinds[name] is not None and case_kind != kinds[name]:
                continue  # an MHA backend is never paired with an MLA case, and vice versa
            params.append(pytest.param((name, case), id=f"{name}::{case}",
                                       marks=[getattr(pytest.mark, tier)]))
    metafunc.parametrize("backend_case", params)


def test_backend_on_golden(backend_case, device, record_property):
    name, case = backend_case
    try:
        backend = backends.get_backend(name)
    except (backends.UnknownBackendError, backends.PluginError) as e:
        record_property("attncheck", json.dumps({"backend": name, "case": case, "status": "error",
                                                 "reason": str(e), "family": cases.get_case(case).family}))
        pytest.fail(f"backend {name} could not be loaded: {e}")
    v = harness.run_backend(backend, case, device=device)
    record_property("attncheck", json.dumps(v.as_dict()))
    if v.status == "skip":
        pytest.skip(v.reason)
    if v.status == "xfail":
        pytest.xfail(v.reason)
    if v.status != "pass":
        pytest.fail(f"{v.reason}\n{v.report}", pytrace=False)
