"""The vLLM loader: every patch is named, switchable, and shown to be needed.

Each "without it" test runs a fresh interpreter (the loading is process-wide) with the patch's
switch set to 0 and checks the failure the patch exists for; the fresh runs start together
(``_prefetch``) because each imports torch, Triton and vLLM's modules.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from impl.vllm import loader

pytestmark = pytest.mark.smoke

try:
    SOURCE = loader.find_source()
    NO_SOURCE = None
except loader.VllmUnavailable as e:
    SOURCE, NO_SOURCE = None, str(e)
needs_vllm = pytest.mark.skipif(SOURCE is None, reason=f"vLLM's sources are not here: {NO_SOURCE}")
CPU_ONLY = pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="shows the failure on a CPU under the Triton interpreter; with a CUDA device torch.cuda and vLLM's "
           "own platform probes answer differently")
# The probes run vLLM's kernels on CPU tensors under the Triton interpreter, the CPU's path (on the
# H200 machine Triton 3.6's interpreter raises inside the decode kernel); on a CUDA machine the
# compiled kernels are what tests/vllm/test_pipelines.py and the verify tiers check.
INTERPRETED_PROBE = pytest.mark.skipif(
    torch.cuda.is_available(), reason="runs vLLM's kernels under the Triton interpreter (the CPU path); on a "
                                      "CUDA machine the compiled kernels are checked by test_pipelines and verify")
# An extracted source folder (ATTNCHECK_VLLM_SRC) has no package __init__ files (its folders are
# namespace packages) and no compiled extensions: the patches that guard against those matter
# for the installed wheel only.
WHEEL_ONLY = pytest.mark.skipif(SOURCE is None or SOURCE.origin != "installed",
                                reason="guards against the installed wheel's __init__ files and binaries; "
                                       "the source here is a folder without them")


def slow_fresh(fn):
    """A fresh-interpreter test (~3-8 s of CPU each): slow, started early by ``_prefetch``."""
    return needs_vllm(pytest.mark.slow(pytest.mark.usefixtures("_prefetch")(fn)))


# One probe script for every fresh run: load, then do what argv asks.
PROBE = """
import os, sys, torch
from impl.vllm import loader, kernels
what = sys.argv[1:]
if "describe" in what:
    print("DESCRIBE", loader.load().describe())
    print("CUSTOM_OPS", getattr(sys.modules.get("vllm._custom_ops"), "__file__", "stub"))
if "env" in what:
    loader.load()
    print("ENV_OVERRIDE", "vllm.env_override" in sys.modules, os.environ.get("TORCHINDUCTOR_COMPILE_THREADS"))
if "platform" in what:
    loader.load()
    import vllm.platforms as P
    pp = loader.kernel_module("prefix_prefill")
    print("PLATFORM", P.current_platform.fp8_dtype(), pp.BASE_BLOCK)
if "jit" in what:
    print("KERNEL", type(loader.kernel_module("triton_unified_attention").kernel_unified_attention).__name__)
T, H, D, nb, bs = 2, 2, 64, 4, 16
key, value = torch.randn(T, H, D, dtype=torch.float16), torch.randn(T, H, D, dtype=torch.float16)
kc = torch.zeros(nb, bs, H, D, dtype=torch.float16)
vc = torch.zeros_like(kc)
if "write" in what:
    kernels.reshape_and_cache_flash(key, value, kc, vc, torch.tensor([0, 17]))
    print("WRITE", bool((kc[0, 0] == key[0]).all() and (vc[1, 1] == value[1]).all()))
if "decode" in what:  # ROCM_ATTN decode: fp16, head 64, block 16 (the HIP kernel's domain on gfx9)
    q = torch.randn(T, H, D, dtype=torch.float16)
    k5, v4 = kernels.rocm_attn_layout(kc, vc)
    out = torch.zeros_like(q)
    kernels.chunked_prefill_paged_decode(
        q, key, value, out, k5, v4, block_table=torch.tensor([[0], [1]], dtype=torch.int32),
        query_start_loc=torch.tensor([0, 1, 2], dtype=torch.int32), seq_lens=torch.tensor([1, 2], dtype=torch.int32),
        max_query_len=1, max_seq_len=2, scale=0.125)
    print("DECODE", bool(torch.isfinite(out).all()))
"""

_CACHE = {}


def _key(args, env):
    return (tuple(args), tuple(sorted(env.items())))


def _start(args, env) -> subprocess.Popen:
    full_env = dict(os.environ, TRITON_INTERPRET="1", **env)
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(PROBE), *args], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(args, **env) -> subprocess.CompletedProcess:
    """Run the probe in a fresh interpreter; prefetched runs are reused."""
    proc = _CACHE.pop(_key(args, env), None) or _start(args, env)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _off(name: str, **extra) -> dict:
    return {loader.PATCHES[name].env: "0", **extra}


GFX942 = {"ATTNCHECK_ARCH": "gfx942"}
RUNS = [
    (["describe", "env", "jit", "write", "decode"], {}),
    (["describe", "platform", "decode"], GFX942),
    (["env"], _off("stub_package")),
    (["describe"], {}),
    (["describe"], _off("regex_alias")),
    (["describe"], {"VLLM_LOGGING_LEVEL": "WARNING"}),
    (["describe"], _off("block_compiled_extensions", VLLM_LOGGING_LEVEL="WARNING")),
    (["describe"], _off("quantization_bare_packages")),
    (["describe"], _off("parallel_state_stub")),
    (["write"], _off("kv_cache_dtype_handler")),
    (["describe"], _off("custom_ops_stub")),
    (["platform"], _off("platform_answers", **GFX942)),
    (["jit", "write"], _off("force_triton")),
    (["decode"], _off("rocm_arch_at_import")),
    (["decode"], _off("no_custom_paged_attention", **GFX942)),
    (["write"], _off("cuda_capability_answer")),
]


@pytest.fixture(scope="module")
def _prefetch():
    for args, env in RUNS:
        _CACHE.setdefault(_key(args, env), _start(args, env))
    yield
    for proc in _CACHE.values():
        proc.kill()
        proc.communicate()
    _CACHE.clear()


def _fails_with(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode != 0, f"expected a failure, got:\n{r.stdout}"
    assert any(n in r.stderr for n in needles), f"none of {needles} in:\n{r.stderr[-3000:]}"


# ---- in-process facts ---------------------------------------------------------------------------

def test_every_patch_is_named_explained_and_switchable():
    assert list(loader.PATCHES) == [
        "stub_package", "regex_alias", "block_compiled_extensions", "quantization_bare_packages",
        "parallel_state_stub", "kv_cache_dtype_handler", "custom_ops_stub", "platform_answers",
        "force_triton", "rocm_arch_at_import", "no_custom_paged_attention", "cuda_capability_answer"]
    for name, p in loader.PATCHES.items():
        assert p.name == name and len(p.why) > 40
        assert p.env == "ATTNCHECK_VLLM_PATCH_" + name.upper()


def test_version_check_is_a_note_not_an_error():
    assert loader.version_note("0.33.0") is None
    note = loader.version_note("0.34.1")
    assert "0.34.1" in note and "0.33.0" in note and "\n" not in note


def test_source_errors_are_one_line_and_name_the_variable(tmp_path):
    with pytest.raises(loader.VllmUnavailable, match=r"ATTNCHECK_VLLM_SRC=.*no such folder"):
        loader.find_source({"ATTNCHECK_VLLM_SRC": str(tmp_path / "missing")})
    with pytest.raises(loader.VllmUnavailable, match=r"ATTNCHECK_VLLM_SRC=.*vllm/v1/attention/ops"):
        loader.find_source({"ATTNCHECK_VLLM_SRC": str(tmp_path)})
    with pytest.raises(loader.VllmUnavailable, match=r"not installed: pip install --no-deps vllm==0\.33\.0"):
        loader.find_source({}, installed_version=lambda: None)


def test_source_folder_version_is_read_not_executed(tmp_path):
    ops = tmp_path / "vllm" / "v1" / "attention" / "ops"
    ops.mkdir(parents=True)
    (tmp_path / "vllm" / "_version.py").write_text(
        "raise SystemExit('never executed')\n__version__ = version = '0.99.1'\n")
    src = loader.find_source({"ATTNCHECK_VLLM_SRC": str(tmp_path)})
    assert (src.version, src.origin) == ("0.99.1", f"ATTNCHECK_VLLM_SRC={tmp_path}")
    assert src.package_dir == str(tmp_path / "vllm")


def test_arch_answers():
    assert loader.capability_of("sm_90") == (9, 0) and loader.capability_of("sm_120") == (12, 0)
    assert loader.capability_of("gfx942") == (9, 4) and loader.capability_of("gfx90a") == (9, 0)
    assert loader.capability_of("gfx1100") == (11, 0) and loader.capability_of("gfx950") == (9, 5)
    with pytest.raises(loader.VllmUnavailable, match="arch 'mi300'"):
        loader.capability_of("mi300")
    assert loader.fp8_dtype_for_arch("gfx942") is torch.float8_e4m3fnuz
    for arch in ("gfx950", "gfx90a", "sm_90"):
        assert loader.fp8_dtype_for_arch(arch) is torch.float8_e4m3fn


# ---- fresh interpreters ---------------------------------------------------------------------------

@slow_fresh
@INTERPRETED_PROBE
def test_loads_and_reports_version_arch_and_patches():
    r = _run(["describe", "env", "jit", "write", "decode"])
    assert r.returncode == 0, r.stderr
    assert f"vllm {SOURCE.version} ({SOURCE.origin}; interpreter, answering as sm_90" in r.stdout
    applied, _, not_applied = r.stdout.partition("not applied")
    for name in loader.PATCHES:
        # a patch is applied, or named as not needed here with the reason (e.g. regex installed)
        assert name in applied or f"{name} (not needed: " in not_applied, name
    assert "no_custom_paged_attention (not needed: sm_90 is not a gfx arch" in r.stdout
    assert "KERNEL InterpretedFunction" in r.stdout and "WRITE True" in r.stdout and "DECODE True" in r.stdout
    assert "ENV_OVERRIDE False None" in r.stdout  # vllm/__init__ never ran


@slow_fresh
@WHEEL_ONLY
def test_without_stub_package_vllm_init_changes_the_process():
    """vllm/__init__ imports env_override: environment variables and torch inductor patches."""
    r = _run(["env"], **_off("stub_package"))
    assert r.returncode == 0, r.stderr
    assert "ENV_OVERRIDE True 1" in r.stdout


@slow_fresh
def test_without_regex_alias_nothing_imports():
    if loader.regex_installed():
        pytest.skip("the regex module is installed here, so the alias is not needed")
    _fails_with(_run(["describe"], **_off("regex_alias")), "No module named 'regex'")


@slow_fresh
def test_without_block_compiled_extensions_the_wheel_binaries_are_loaded():
    so = list(Path(SOURCE.package_dir).glob("_C_stable_libtorch*.so"))
    if not so:
        pytest.skip(f"{SOURCE.origin} has no compiled extensions (a source folder)")
    on = _run(["describe"], VLLM_LOGGING_LEVEL="WARNING")
    off = _run(["describe"], **_off("block_compiled_extensions", VLLM_LOGGING_LEVEL="WARNING"))
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    assert "vllm._C_stable_libtorch halted; None in sys.modules" in on.stderr
    # without the patch the dynamic loader opens the binary (here it then misses libcuda)
    assert "Failed to import from vllm._C_stable_libtorch" in off.stderr
    assert "vllm._C_stable_libtorch halted" not in off.stderr


@slow_fresh
@WHEEL_ONLY
def test_without_quantization_bare_packages_the_model_zoo_is_imported():
    _fails_with(_run(["describe"], **_off("quantization_bare_packages")),
                f"model_executor{os.sep}__init__.py", f"quantization{os.sep}__init__.py")


@slow_fresh
def test_without_parallel_state_stub_nothing_imports():
    _fails_with(_run(["describe"], **_off("parallel_state_stub")), f"distributed{os.sep}parallel_state.py",
                f"distributed{os.sep}__init__.py", "No module named 'vllm.distributed")


@slow_fresh
def test_without_kv_cache_dtype_handler_the_cache_write_fails():
    _fails_with(_run(["write"], **_off("kv_cache_dtype_handler")), f"config{os.sep}cache.py",
                f"config{os.sep}__init__.py", "No module named 'vllm.config")


@slow_fresh
def test_without_custom_ops_stub_the_real_custom_ops_module_is_imported():
    """Without the stub vLLM's own _custom_ops module runs (it asks the platform to import the
    compiled kernels and pulls in flashinfer helpers): where its third-party imports are missing
    nothing imports (a source folder has no such module at all); where they are present the real
    module is what the kernels see."""
    on, off = _run(["describe"]), _run(["describe"], **_off("custom_ops_stub"))
    assert on.returncode == 0, on.stderr
    assert "CUSTOM_OPS stub" in on.stdout
    if off.returncode != 0:
        _fails_with(off, "_custom_ops.py", "'vllm._custom_ops'", "cannot import name '_custom_ops'")
    else:
        assert f"CUSTOM_OPS {Path(SOURCE.package_dir) / '_custom_ops.py'}" in off.stdout, off.stdout


@slow_fresh
@CPU_ONLY
def test_without_platform_answers_constants_and_fp8_are_wrong_for_the_arch():
    """Asked as gfx942: vLLM's own resolution finds no GPU platform here, so the fp8 dtype is
    the OCP one instead of MI300's fnuz and prefix_prefill's tile is the pre-sm80 64."""
    on = _run(["describe", "platform", "decode"], **GFX942)
    off = _run(["platform"], **_off("platform_answers", **GFX942))
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    assert "PLATFORM torch.float8_e4m3fnuz 128" in on.stdout
    assert "PLATFORM torch.float8_e4m3fn 64" in off.stdout


@slow_fresh
@pytest.mark.skipif(torch.cuda.is_available() and SOURCE is not None and SOURCE.origin == "installed",
                    reason="with a GPU driver and the wheel's metadata vLLM keeps the real triton")
def test_without_force_triton_the_kernels_are_plain_functions():
    r = _run(["jit", "write"], **_off("force_triton"))
    assert "KERNEL function" in r.stdout  # the placeholder's @jit returned the Python function
    _fails_with(r, "has no attribute 'next_power_of_2'")


@slow_fresh
@CPU_ONLY
def test_without_rocm_arch_at_import_the_rocm_attn_call_fails():
    _fails_with(_run(["decode"], **_off("rocm_arch_at_import")), "Torch not compiled with CUDA",
                "No CUDA GPUs")


@slow_fresh
@INTERPRETED_PROBE
def test_without_no_custom_paged_attention_gfx9_decodes_call_the_hip_kernel():
    on = _run(["describe", "platform", "decode"], **GFX942)
    assert "DECODE True" in on.stdout, on.stderr
    _fails_with(_run(["decode"], **_off("no_custom_paged_attention", **GFX942)),
                "vllm._custom_ops.paged_attention_rocm is a compiled vLLM op")


@slow_fresh
@CPU_ONLY
def test_without_cuda_capability_answer_the_cache_write_fails():
    _fails_with(_run(["write"], **_off("cuda_capability_answer")), "Torch not compiled with CUDA",
                "No CUDA GPUs")
