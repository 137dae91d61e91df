"""Malformed values, misspelt variables and other inputs: each is an error that names the
problem, or a warning; the policy never reads the process environment."""

from __future__ import annotations

import pytest

from impl.selection import VALID_BACKENDS, SelectionError, select_backend
from tests.selection.helpers import (AITER, AITER_MHA, AITER_MLA, AITER_UNIFIED, BACKEND,
                                     PREFILL_DECODE)

pytestmark = pytest.mark.smoke



@pytest.mark.parametrize("env,backend,fragment", [
    ({AITER: "maybe"}, None, f"{AITER}='maybe' is not a boolean"),
    ({AITER_MHA: ""}, None, f"{AITER_MHA}='' is not a boolean"),
    ({AITER_MLA: "2"}, "TRITON_MLA", f"{AITER_MLA}='2' is not a boolean"),  # even if ignored
    ({BACKEND: ""}, None, "VLLM_ATTENTION_BACKEND is set but empty"),
    ({}, "", "the backend argument is set but empty"),
    ({}, "   ", "is set but empty"),
    ({BACKEND: "TRITON_ATN"}, None, "Closest: TRITON_ATTN"),
    ({}, "NOT_A_BACKEND", "unknown attention backend 'NOT_A_BACKEND'"),
    ({}, "FLASH_ATTN", "AITER's flash attention is ROCM_AITER_FA"),
    ({}, "_VLLM_V1", "unknown attention backend"),
])
def test_malformed_values_are_errors(env, backend, fragment):
    with pytest.raises(SelectionError) as info:
        select_backend(env, backend, kind="MLA" if backend == "TRITON_MLA" else "MHA")
    assert fragment in str(info.value)


def test_unknown_name_error_lists_every_valid_name():
    with pytest.raises(SelectionError) as info:
        select_backend({BACKEND: "rocm_aiter_f"})
    msg = str(info.value)
    assert all(name in msg for name in VALID_BACKENDS)
    assert msg.endswith("Closest: ROCM_AITER_FA")


@pytest.mark.parametrize("word,value", [("1", True), ("TRUE", True), ("Yes", True),
                                        ("on", True), ("0", False), ("False", False),
                                        ("NO", False), ("off", False), (" 1 ", True)])
def test_boolean_words(word, value):
    sel = select_backend({AITER: word})
    assert sel.backend == ("ROCM_AITER_FA" if value else "TRITON_ATTN")


@pytest.mark.parametrize("name,meant", [
    ("VLLM_ATTENTION_BACKND", BACKEND),  # the blog's typo
    ("VLLM_ROCM_USE_AITR", AITER),
    ("VLLM_ROCM_USE_AITER_UNIFIED_ATTN", AITER_UNIFIED),
    ("VLLM_V1_USE_PREFILL_DECODE_ATTN", PREFILL_DECODE),
    ("vllm_rocm_use_aiter", AITER),  # variable names are case-sensitive
])
def test_misspelt_variable_warns_did_you_mean(name, meant):
    sel = select_backend({name: "1"})
    assert sel.backend == "TRITON_ATTN"  # the misspelt variable has no effect
    assert len(sel.warnings) == 1 and f"did you mean {meant}?" in sel.warnings[0]
    assert any(r.startswith("TYPO: ") for r in sel.rules)


@pytest.mark.parametrize("name", ["VLLM_ROCM_USE_AITER_MOE", "VLLM_ROCM_USE_AITER_PAGED_ATTN",
                                  "VLLM_USE_V1", "VLLM_ROCM_USE_AITER_SOMETHING_NEW",
                                  "VLLM_LOGGING_LEVEL", "ATTENTION_BACKND"])
def test_real_or_unrelated_variables_do_not_warn(name):
    assert select_backend({name: "1"}).warnings == ()


def test_legacy_suffix_and_case_are_accepted_with_a_note():
    sel = select_backend({BACKEND: "rocm_attn_vllm_v1"})
    assert sel.backend == "ROCM_ATTN"
    assert sel.warnings == (
        "backend name 'rocm_attn_vllm_v1': the _VLLM_V1 suffix is deprecated; use ROCM_ATTN",
        "vLLM 0.12 itself rejects 'rocm_attn_vllm_v1': it checks VLLM_ATTENTION_BACKEND "
        "against the exact enum names (case and suffix included) before anything else; "
        "attncheck reads it as ROCM_ATTN")
    sel = select_backend({}, "triton_mla", kind="mla")
    assert sel.backend == "TRITON_MLA" and "vLLM 0.12 itself rejects" in sel.warnings[0]
    assert select_backend({}, "TRITON_ATTN").warnings == ()


def test_argument_beats_env_backend_with_a_warning():
    sel = select_backend({BACKEND: "ROCM_ATTN"}, "TRITON_ATTN")
    assert sel.backend == "TRITON_ATTN"
    assert any("VLLM_ATTENTION_BACKEND=ROCM_ATTN ignored" in w for w in sel.warnings)


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(arch="gfx908"), "unknown ROCm arch 'gfx908'"),
    (dict(kind="GQA"), "kind: expected 'MHA' or 'MLA'"),
    (dict(block_size=0), "block_size: expected a positive integer"),
    (dict(kv_cache_dtype="int4"), "kv_cache_dtype: unknown value"),
    (dict(vendor="nvidia"), "ROCm selection policy"),
    (dict(dtype="float64"), "dtype: unknown model dtype"),
    (dict(backend="ROCM_AITER_FA", head_size=80), "ROCM_AITER_FA does not support head size 80"),
    (dict(backend="ROCM_AITER_FA", dtype="float32"), "does not support float32"),
    (dict(backend="FLEX_ATTENTION", kv_cache_dtype="fp8"), "FLEX_ATTENTION does not support"),
    (dict(block_size=8), "multiple of 16"),
])
def test_invalid_inputs_name_the_problem(kwargs, fragment):
    with pytest.raises(SelectionError) as info:
        select_backend({}, **kwargs)
    assert fragment in str(info.value)


def test_fp8_storage_follows_the_arch():
    assert select_backend({}, kv_cache_dtype="fp8", arch="gfx942").kv_cache_storage == \
        "fp8_e4m3fnuz"
    assert select_backend({}, kv_cache_dtype="fp8", arch="gfx950").kv_cache_storage == \
        "fp8_e4m3fn"
    assert select_backend({}).kv_cache_storage is None


def test_policy_does_not_read_the_process_environment(monkeypatch):
    monkeypatch.setenv(AITER, "1")
    monkeypatch.setenv(BACKEND, "ROCM_ATTN")
    assert select_backend({}).backend == "TRITON_ATTN"


