"""The stand-ins stay verified where vLLM's kernels are the default.

The golden suite (attncheck's pytest plugin) runs every backend with its default provider: vLLM's kernels
for TRITON_ATTN, ROCM_ATTN and TRITON_MLA wherever they load. This file runs the same cases of
the selected tier through the project's own kernels (provider ``stand-in``), so a regression in
a stand-in cannot hide behind the vLLM default. Where vLLM does not load, the golden suite
already runs the stand-ins and this file skips.
"""

import pytest

from attncheck import cases, harness
from impl.backends.rocm_attn import RocmAttnBackend
from impl.backends.triton_attn import TritonAttnBackend
from impl.backends.triton_mla import TritonMLABackend
from impl.vllm import ProviderChoice

BACKENDS = {"TRITON_ATTN": TritonAttnBackend, "ROCM_ATTN": RocmAttnBackend, "TRITON_MLA": TritonMLABackend}
_DEFAULT = ProviderChoice("auto")


def pytest_generate_tests(metafunc):
    if "name_case" not in metafunc.fixturenames:
        return
    from attncheck import pytest_plugin

    tier = pytest_plugin.setup_run(metafunc.config).tier
    params = []
    for case in cases.select_cases(tier=tier):
        for name, cls in BACKENDS.items():
            if case.kind == cls.kind:
                params.append(pytest.param((name, case.name), id=f"{name}::{case.name}",
                                           marks=[getattr(pytest.mark, tier)]))
    metafunc.parametrize("name_case", params)


_INSTANCES = {}


def test_stand_in_on_golden(name_case, device):
    if not _DEFAULT.uses_vllm:
        pytest.skip(f"the golden suite runs the stand-ins here ({_DEFAULT.note})")
    name, case = name_case
    backend = _INSTANCES.setdefault(name, BACKENDS[name](provider="stand-in"))
    assert backend.provider == "attncheck-stand-in"
    v = harness.run_backend(backend, case, device=device)
    if v.status == "skip":
        pytest.skip(v.reason)
    if v.status == "xfail":
        pytest.xfail(v.reason)
    assert v.status == "pass", f"{v.reason}\n{v.report}"
