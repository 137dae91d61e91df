"""The AITER loader: every patch is named, switchable, and shown to be needed.

Each "without it" test runs a fresh interpreter (the loading is process-wide) with the
patch's switch set to 0 and checks the failure the patch exists for.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from impl.aiter import loader

pytestmark = pytest.mark.smoke
# a fresh interpreter per patch (the loading is process-wide): ~4 s of CPU each
def slow_fresh(fn):
    return pytest.mark.slow(pytest.mark.usefixtures("_prefetch")(fn))


_CACHE = {}


def _start(code: str, **env) -> subprocess.Popen:
    full_env = dict(os.environ, TRITON_INTERPRET="1", **env)
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(code: str, **env) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter; results of the prefetched runs are reused."""
    key = (textwrap.dedent(code), tuple(sorted(env.items())))
    proc = _CACHE.pop(key, None) or _start(code, **env)
    out, err = proc.communicate(timeout=180)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


IMPORT_UA = """
    from impl.aiter import loader
    loader.triton_module("unified_attention")
"""
IMPORT_MHA = """
    from impl.aiter import loader
    loader.triton_module("mha")
"""
FP8_PROBE = """
    from impl.aiter import loader
    ua = loader.triton_module("unified_attention")
    import aiter.ops.triton._triton_kernels.unified_attention as k
    print(k.e4m3_dtype, k.float8_info.max)
"""


@pytest.fixture(scope="module")
def _prefetch():
    """Start every fresh-interpreter run at once (each imports torch, triton and aiter)."""
    runs = [("""
        from impl.aiter import loader
        s = loader.load()
        loader.triton_module("unified_attention"); loader.triton_module("mha")
        print(s.describe())
    """, {}), (IMPORT_UA, _off("stub_package")), (IMPORT_UA, _off("arch_answers")),
            (FP8_PROBE, _off("fp8_dtypes")), (FP8_PROBE, {}), (FP8_PROBE, {"ATTNCHECK_ARCH": "gfx942"}),
            (IMPORT_MHA, _off("autotune_keys")), (IMPORT_MHA, _off("fa_amd_utils")), ("import aiter", {})]
    for code, env in runs:
        _CACHE[(textwrap.dedent(code), tuple(sorted(env.items())))] = _start(code, **env)
    yield
    for proc in _CACHE.values():
        proc.kill()
        proc.communicate()
    _CACHE.clear()


def _off(name: str) -> dict:
    return {loader.PATCHES[name].env: "0"}

_CPU_ONLY = pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="shows the failure on a CPU without a Triton driver (Triton 3.9 interpreter); on CUDA with "
           "Triton 3.6 these imports fail differently (AITER 0.1.7's int-in-str TypeError) or not at all")



def test_every_patch_is_named_explained_and_switchable():
    assert set(loader.PATCHES) == {"stub_package", "arch_answers", "fp8_dtypes", "autotune_keys",
                                   "fa_amd_utils", "strip_amd_launch_options"}
    for name, p in loader.PATCHES.items():
        assert p.name == name and len(p.why) > 20
        assert p.env == "ATTNCHECK_AITER_PATCH_" + name.upper()


@slow_fresh
def test_loads_and_reports_version_and_patches():
    r = _run("""
        from impl.aiter import loader
        s = loader.load()
        loader.triton_module("unified_attention"); loader.triton_module("mha")
        print(s.describe())
    """)
    assert r.returncode == 0, r.stderr
    assert "amd-aiter 0.1.7" in r.stdout and "interpreter" in r.stdout
    for name in ("stub_package", "arch_answers", "fp8_dtypes", "autotune_keys", "fa_amd_utils"):
        assert name in r.stdout
    assert "strip_amd_launch_options" not in r.stdout  # CUDA only


@slow_fresh
def test_plain_import_aiter_fails_without_rocm():
    """Why stub_package: aiter/__init__.py needs a ROCm install."""
    r = _run("import aiter")
    assert r.returncode != 0
    assert "ROCm" in r.stderr or "hipconfig" in r.stderr


@slow_fresh
def test_without_stub_package_nothing_imports():
    r = _run(IMPORT_UA, **_off("stub_package"))
    assert r.returncode != 0 and "ROCm" in r.stderr


@slow_fresh
@_CPU_ONLY
def test_without_arch_answers_unified_attention_cannot_import():
    """arch_info.get_arch asks the active Triton driver (none on the CPU), then jax."""
    r = _run(IMPORT_UA, **_off("arch_answers"))
    assert r.returncode != 0
    assert "jax" in r.stderr or "active drivers" in r.stderr


@slow_fresh
def test_without_fp8_dtypes_off_gfx942_gets_fnuz():
    """types.py picks fnuz unless the arch string is gfx950: wrong on NVIDIA/CPU (and gfx90a)."""
    code = FP8_PROBE
    off = _run(code, **_off("fp8_dtypes"))
    on = _run(code)
    assert off.returncode == 0 and on.returncode == 0, off.stderr + on.stderr
    assert "float8_e4m3fnuz 240" in off.stdout  # fp8 output clamp of the wrong format
    assert "float8_e4m3fn 448" in on.stdout
    gfx942 = _run(code, ATTNCHECK_ARCH="gfx942")
    assert "float8_e4m3fnuz 240" in gfx942.stdout


def test_types_membership_test_is_a_type_error_for_an_int_arch():
    """CUDA's Triton target reports arch 90 (an int); types.py's `in ("gfx950")` is a str test."""
    with pytest.raises(TypeError):
        90 in ("gfx950")  # noqa: B015 - the exact expression of aiter 0.1.7 utils/types.py


@slow_fresh
@_CPU_ONLY
def test_without_autotune_keys_mha_cannot_import():
    r = _run(IMPORT_MHA, **_off("autotune_keys"))
    assert r.returncode != 0
    assert "not kernel arguments" in r.stderr


@slow_fresh
@_CPU_ONLY
def test_without_fa_amd_utils_mha_cannot_import():
    r = _run(IMPORT_MHA, **_off("fa_amd_utils"))
    assert r.returncode != 0
    assert "active drivers" in r.stderr or "CUDA" in r.stderr or "cuda" in r.stderr


def test_amd_launch_options_are_unknown_to_cuda_triton_and_stripped():
    """Why strip_amd_launch_options: AITER's configs carry them; CUDAOptions has no such fields,
    so JITFunction raises KeyError (checked on the GPU by tests/aiter/gpu_check.py)."""
    from triton.backends.nvidia.compiler import CUDAOptions

    ua = loader.triton_module("unified_attention")
    cfg = ua.select_2d_config(16, 64, 0, False, 5, 40, 4, 8)
    assert "waves_per_eu" in cfg
    for opt in loader.AMD_LAUNCH_OPTIONS:
        assert opt not in CUDAOptions.__dataclass_fields__
    kept = loader.strip_amd_options(dict(cfg, kpack=2, matrix_instr_nonkdim=16))
    assert not set(loader.AMD_LAUNCH_OPTIONS) & set(kept)
    assert kept["BLOCK_M"] == cfg["BLOCK_M"] and kept["num_warps"] == cfg["num_warps"]


def test_missing_or_old_aiter_gives_a_clear_error():
    with pytest.raises(loader.AiterUnavailable, match="not installed.*pip install"):
        loader.aiter_version(lambda: None)
    with pytest.raises(loader.AiterUnavailable, match="0.1.6 is too old"):
        loader.aiter_version(lambda: "0.1.6")
    assert loader.aiter_version(lambda: "0.1.7.post2.dev18") == "0.1.7.post2.dev18"
    assert loader.aiter_version(lambda: "0.1.10") == "0.1.10"


def test_fp8_choice_by_arch():
    assert loader.fp8_e4m3_for_arch("gfx942") is torch.float8_e4m3fnuz
    for arch in ("gfx950", "gfx90a", "sm_90", "cpu"):
        assert loader.fp8_e4m3_for_arch(arch) is torch.float8_e4m3fn


def test_rocm_entry_points_refuse_off_rocm():
    from impl.aiter import rocm_ops

    if loader.load().mode == "rocm":
        pytest.skip("this machine has ROCm")
    with pytest.raises(loader.AiterUnavailable, match="not verified on this machine"):
        rocm_ops._rocm_aiter()
