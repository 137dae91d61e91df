"""Providers: which implementation a backend runs, and what its verdicts say about it.

The preference comes from ATTNCHECK_PROVIDER (auto | vllm | stand-in); ``provider_error`` says
up front whether it can be honoured; every backend object names its provider.
"""

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import impl.vllm as provider_mod
from impl.backend import CaseParams
from impl.backends.flex_attention import FlexAttentionBackend
from impl.backends.rocm_aiter_fa import AiterFABackend
from impl.backends.rocm_aiter_mla import AiterMLABackend
from impl.backends.rocm_aiter_unified_attn import AiterUnifiedAttnBackend
from impl.backends.rocm_attn import RocmAttnBackend
from impl.backends.torch_sdpa import TorchSDPABackend
from impl.backends.triton_attn import TritonAttnBackend
from impl.backends.triton_mla import TritonMLABackend
from impl.vllm import loader

pytestmark = pytest.mark.smoke
VLLM_BACKENDS = (TritonAttnBackend, RocmAttnBackend, TritonMLABackend)

VERSION, NO_SOURCE = None, None
try:
    VERSION = loader.find_source().version
except loader.VllmUnavailable as e:
    NO_SOURCE = str(e)
needs_vllm = pytest.mark.skipif(VERSION is None, reason=f"vLLM's sources are not here: {NO_SOURCE}")


def test_preference_from_env():
    assert provider_mod.preference_from_env({}) == "auto"
    assert provider_mod.preference_from_env({"ATTNCHECK_PROVIDER": " Stand-In "}) == "stand-in"
    assert provider_mod.preference_from_env({"ATTNCHECK_PROVIDER": "vllm"}) == "vllm"
    with pytest.raises(ValueError, match=r"^ATTNCHECK_PROVIDER: expected one of auto, vllm, stand-in, got 'aiter'$"):
        provider_mod.preference_from_env({"ATTNCHECK_PROVIDER": "aiter"})


def test_provider_error_for_preferences_that_need_nothing():
    assert provider_mod.provider_error("auto") is None
    assert provider_mod.provider_error("stand-in") is None
    with pytest.raises(ValueError, match="preference: expected one of"):
        provider_mod.provider_error("VLLM ")


@needs_vllm
def test_vllm_preference_is_honoured_here(device):
    assert provider_mod.provider_error("vllm") is None
    for cls in VLLM_BACKENDS:
        be = cls(provider="vllm")
        assert be.provider == f"vllm=={VERSION}"
        assert be.availability(torch.device(device)).ok


def test_every_backend_names_its_provider():
    torch_provider = f"torch=={torch.__version__}"
    assert TorchSDPABackend().provider == torch_provider and FlexAttentionBackend().provider == torch_provider
    for cls in (AiterFABackend, AiterUnifiedAttnBackend, AiterMLABackend):
        assert cls().provider.startswith("amd-aiter")
    for cls in VLLM_BACKENDS:
        assert cls(provider="stand-in").provider == "attncheck-stand-in"
        assert cls().provider in (f"vllm=={VERSION}", "attncheck-stand-in")


@needs_vllm
def test_auto_means_vllm_where_it_loads_and_the_stand_in_capabilities_differ():
    for cls in VLLM_BACKENDS:
        assert cls(provider="auto").provider == f"vllm=={VERSION}"
    # the stand-ins return an LSE where vLLM's MHA kernels have none
    assert TritonAttnBackend(provider="stand-in").capabilities.returns_lse
    assert not TritonAttnBackend(provider="vllm").capabilities.returns_lse
    assert RocmAttnBackend(provider="vllm").known_issues and not RocmAttnBackend(provider="stand-in").known_issues
    # the stand-in declares nothing; vLLM's kernel its TF32 float32 dot and its linear ALiBi bias
    # (wrong against sinks and without the causal mask)
    from impl.backends.triton_attn import ALIBI_WITH_SINKS, NON_CAUSAL_ALIBI
    assert TritonAttnBackend(provider="stand-in").known_issues == ()
    tf32, *alibi = TritonAttnBackend(provider="vllm").known_issues
    assert tf32.dtypes == {"fp32"} and tf32.platform == "cuda"
    assert alibi == [ALIBI_WITH_SINKS, NON_CAUSAL_ALIBI]


UNLOADABLE = """
import sys, torch
import impl.vllm as p
from impl.backends.triton_attn import TritonAttnBackend
from attncheck import harness
print("ERROR", p.provider_error("vllm"))
auto, forced = TritonAttnBackend(), TritonAttnBackend(provider="vllm")
device = sys.argv[1]
print("AUTO", auto.provider, harness.run_backend(auto, "decode-h8x2-d64-bs16-bf16", device=device).status)
a = forced.availability(torch.device(device))
print("FORCED", forced.provider, a.ok, a.reason)
"""


@pytest.mark.slow
def test_where_vllm_cannot_load_auto_runs_the_stand_in_and_vllm_is_refused(tmp_path, device):
    env = dict(os.environ, ATTNCHECK_VLLM_SRC=str(tmp_path / "nowhere"))
    env.pop("ATTNCHECK_PROVIDER", None)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(UNLOADABLE), device], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert lines["ERROR"].startswith("vLLM's kernels cannot run here: ATTNCHECK_VLLM_SRC=")
    assert "no such folder" in lines["ERROR"] and "\n" not in lines["ERROR"]
    assert lines["AUTO"] == "attncheck-stand-in pass"
    assert lines["FORCED"].startswith("vllm (unavailable) False vLLM's kernels cannot run here: ATTNCHECK_VLLM_SRC=")


@pytest.mark.slow
def test_env_preference_reaches_backends_built_by_the_registry():
    code = ("from attncheck.backends import get_backend; "
            "print(get_backend('TRITON_ATTN').provider, get_backend('ROCM_ATTN').provider)")
    env = dict(os.environ, TRITON_INTERPRET="1", ATTNCHECK_PROVIDER="stand-in")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["attncheck-stand-in", "attncheck-stand-in"]


@pytest.mark.slow
def test_cli_asking_for_vllm_where_it_cannot_load_is_a_one_line_error(tmp_path):
    env = dict(os.environ, ATTNCHECK_VLLM_SRC=str(tmp_path / "nowhere"))
    env.pop("ATTNCHECK_PROVIDER", None)
    report = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "attncheck.cli", "verify", "--device", "cpu", "--provider", "vllm",
                        "--backend", "TRITON_ATTN", "--json", str(report)],
                       env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode != 0
    assert r.stderr.startswith("attncheck verify: provider vllm: vLLM's kernels cannot run here: "
                               "ATTNCHECK_VLLM_SRC="), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert not report.exists() and r.stdout == ""


@needs_vllm
def test_tf32_is_declared_for_vllms_float32_on_cuda_only():
    for cls in VLLM_BACKENDS:
        be = cls(provider="vllm")
        tf32 = [k for k in be.known_issues if "TF32" in k.reason]
        assert len(tf32) == 1 and tf32[0].backend == be.name, cls.name
        params = CaseParams(kind=be.kind, family="decode", tier="smoke", dtype="fp32", kv_cache_dtype="auto",
                            query_lens=(1,), seq_lens=(64,), num_heads=8, num_kv_heads=2, head_size=64,
                            block_size=16)
        assert tf32[0].applies(params, "cuda") and not tf32[0].applies(params, "cpu")
        assert not tf32[0].applies(dataclasses.replace(params, dtype="bf16"), "cuda")
        assert not [k for k in cls(provider="stand-in").known_issues if "TF32" in k.reason], cls.name


def test_matrix_and_json_name_each_backends_provider():
    from types import SimpleNamespace

    from attncheck import report
    from attncheck.harness import Verdict

    verdicts = [Verdict(backend="TRITON_ATTN", case="c1", status="pass", provider="vllm==0.33.0", family="decode",
                        worst_ratio=0.25),
                Verdict(backend="ROCM_ATTN", case="c1", status="pass", provider="attncheck-stand-in",
                        family="decode", worst_ratio=0.5)]
    rows = {line.split()[0]: line.split()[1] for line in report.render_matrix(verdicts).splitlines()
            if line.startswith(("TRITON_ATTN", "ROCM_ATTN"))}
    assert rows == {"TRITON_ATTN": "vllm==0.33.0", "ROCM_ATTN": "attncheck-stand-in"}
    settings = SimpleNamespace(device="cpu", tier="smoke", provider=None)
    assert report.json_report(verdicts, settings, {})["providers"] == rows


def test_a_combination_of_supported_knobs_can_be_unsupported():
    """Capabilities.unsupported_combinations: each knob alone is accepted, the pair is refused
    with the declared reason (the sweep then filters the case by capability, no error)."""
    from impl.backend import Capabilities
    caps = Capabilities(alibi=True, sinks=True, unsupported_combinations=(
        ("ALiBi with sinks: asserts", lambda p: bool(p.get("alibi") and p.get("sinks"))),))
    assert caps.unsupported({"alibi": True}) is None and caps.unsupported({"sinks": True}) is None
    assert caps.unsupported({"alibi": True, "sinks": True}) == "ALiBi with sinks: asserts"


@needs_vllm
def test_vllm_rocm_attn_refuses_what_its_prefill_asserts_on():
    """vLLM 0.33.0's context_attention_fwd asserts on ALiBi with sinks and on non-causal ALiBi;
    the sweep drew such cases and ROCM_ATTN reported an error instead of filtering them."""
    from attncheck import sweep
    vllm_caps = RocmAttnBackend(provider="vllm").capabilities
    stand_in = RocmAttnBackend(provider="stand-in").capabilities
    case = sweep.case_from_name("sweep:3:53", sweep.sizes_for("cpu"))
    assert case.alibi and case.sinks
    assert "Sinks arg is not supported with alibi" in vllm_caps.unsupported(case.params())
    assert stand_in.unsupported(case.params()) is None
    assert "Non-causal" in vllm_caps.unsupported({"alibi": True, "causal": False})
    assert vllm_caps.unsupported({"alibi": True, "causal": True}) is None


@needs_vllm
def test_vllm_rocm_attn_on_nvidia_refuses_the_alibi_prefill_that_does_not_fit(monkeypatch):
    """sweep:0:13 on an H200: vLLM's prefix-prefill ALiBi kernel (float32, head size 256) asked
    Triton for 279552 bytes of shared memory (232448 available). Refused by capability on an
    NVIDIA GPU only: the interpreter has no such limit and ROCm was not measured."""
    import torch

    from impl.vllm import kernels
    fp32_d256 = {"alibi": True, "causal": True, "torch_dtype": torch.float32, "head_size": 256}
    assert not kernels.runs_on_nvidia()  # the CPU interpreter
    assert RocmAttnBackend(provider="vllm").capabilities.unsupported(fp32_d256) is None
    monkeypatch.setattr(kernels, "runs_on_nvidia", lambda: True)
    caps = RocmAttnBackend(provider="vllm").capabilities
    assert "shared memory" in caps.unsupported(fp32_d256)
    for fits in ({**fp32_d256, "head_size": 128}, {**fp32_d256, "torch_dtype": torch.bfloat16},
                 {**fp32_d256, "alibi": False}):
        assert caps.unsupported(fits) is None, fits
    assert RocmAttnBackend(provider="stand-in").capabilities.unsupported(fp32_d256) is None
