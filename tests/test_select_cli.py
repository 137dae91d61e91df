"""``attncheck select`` (attncheck/select_cmd.py) and platform detection (impl/platform.py).

The command is driven through its own small argparse harness with an injected environment
and platform probe, so no result depends on this machine; two subprocess tests run the real
entry points.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys

import pytest

from attncheck import select_cmd
from impl import platform as plat
from attncheck.seed_examples import parse_command
from tests.selection.helpers import SEEDS, seed_id

pytestmark = pytest.mark.smoke

CPU = lambda: ("cpu", None, None, None)  # noqa: E731  (vendor, gcnArchName, hip, name)
NVIDIA = lambda: ("nvidia", None, None, "NVIDIA H100")  # noqa: E731
MI300 = lambda: ("amd", "gfx942:sramecc+:xnack-", "6.4.1", "AMD Instinct MI300X")  # noqa: E731
RDNA = lambda: ("amd", "gfx1100", "6.4.1", "Radeon RX 7900 XTX")  # noqa: E731


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attncheck")
    sub = p.add_subparsers(dest="command")
    select_cmd.register(sub)
    return p


def run_select(argv, environ=None, probe=CPU, installed=None):
    """(exit code, stdout, stderr) of ``attncheck select <argv>``; ``installed`` is the
    installed vLLM's version (None: no vLLM installed)."""
    args = _parser().parse_args(["select", *argv])
    assert args.func is select_cmd.run
    out, err = io.StringIO(), io.StringIO()
    old = sys.stderr
    sys.stderr = err
    try:
        rc = args.func(args, out=out, environ={} if environ is None else environ, probe=probe,
                       installed=lambda: installed)
    finally:
        sys.stderr = old
    return rc, out.getvalue(), err.getvalue()


# ---- the "done when" command ----------------------------------------------------------------

DONE_WHEN = ["--json", "--env", "VLLM_ROCM_USE_AITER=1", "--env",
             "VLLM_ATTENTION_BACKEND=ROCM_ATTN"]


def _check_done_when(obj: dict) -> None:
    assert {"backend", "block_size", "rules", "warnings"} <= set(obj)
    assert obj["backend"] == "ROCM_ATTN"
    assert obj["block_size"] == 16
    assert any("VLLM_ROCM_USE_AITER=1 ignored" in w for w in obj["warnings"]), obj["warnings"]
    assert obj["ignored_flags"] == ["VLLM_ROCM_USE_AITER=1"]
    assert any(r.startswith("E-WINS: ") for r in obj["rules"])


def test_json_explicit_backend_ignores_aiter_flag():
    rc, out, err = run_select(DONE_WHEN)
    assert rc == 0 and err == ""
    _check_done_when(json.loads(out))


def _subprocess_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VLLM_") and k != plat.ARCH_ENV_VAR}
    return env


def test_done_when_command_in_a_subprocess():
    """The real entry point: the main CLI where it exists, else select_cmd's own main."""
    try:
        import attncheck.cli  # noqa: F401
        entry = "attncheck.cli"
    except ImportError:
        entry = "attncheck.select_cmd"
    proc = subprocess.run([sys.executable, "-m", entry, "select", "--vllm-version", "0.12",
                           *DONE_WHEN],
                          capture_output=True, text=True, env=_subprocess_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    obj = json.loads(proc.stdout)  # exactly one JSON object on stdout
    _check_done_when(obj)
    assert obj["platform"]["arch"] == "gfx942"


def test_invalid_configuration_in_a_subprocess_exits_2():
    proc = subprocess.run([sys.executable, "-m", "attncheck.select_cmd", "select", "--json",
                           "--vllm-version", "0.12", "--env", "VLLM_ROCM_USE_AITER=maybe"],
                          capture_output=True,
                          text=True, env=_subprocess_env(), timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "VLLM_ROCM_USE_AITER='maybe' is not a boolean" in proc.stderr


# ---- every seed example through `select --explain` -----------------------------------------


def seed_argv(row) -> list:
    kw = row.inputs()
    argv = ["--explain", "--arch", kw["arch"]]
    for key, value in kw["env"].items():
        argv += ["--env", f"{key}={value}"]
    if kw["kind"] == "MLA":
        argv.append("--mla")
    if kw["block_size"] is not None:
        argv += ["--block-size", str(kw["block_size"])]
    return argv


@pytest.mark.parametrize("row", SEEDS, ids=seed_id)
def test_explain_answers_every_seed_example(row):
    rc, out, err = run_select(seed_argv(row))
    assert rc == 0, err
    lines = out.splitlines()
    want = row.expect
    how = "explicit" if want.rule == "E-WINS" else f"automatic, rule {want.rule}"
    assert f"backend: {want.backend} ({how})" in lines, out
    assert any(line.startswith(f"block size: {want.block_size} (") for line in lines), out
    warnings = [line for line in lines if line.startswith("warning: ")]
    assert len(warnings) == len(want.warnings), out
    for w in want.warnings:
        assert any(w in line for line in warnings), (w, out)
    rules = lines[lines.index("rules:") + 1:]
    assert rules and all(r.strip().split(". ", 1)[0].isdigit() for r in rules)
    assert any(f". {want.rule}: " in r and want.backend in r for r in rules), out


def test_explain_prints_chain_even_for_an_error():
    rc, out, err = run_select(["--explain", "--mla", "--block-size", "1", "--arch", "gfx1100"])
    assert rc == 2 and out == ""
    assert "MLA-SMALL-BLOCK: error:" in err
    assert "On gfx1100 use block size 16 or more (TRITON_MLA)" in err


# ---- errors, environment, platform ----------------------------------------------------------


@pytest.mark.parametrize("argv,fragment", [
    (["--env", "VLLM_ROCM_USE_AITER=maybe"], "VLLM_ROCM_USE_AITER='maybe' is not a boolean"),
    (["--backend", ""], "the backend argument is set but empty"),
    (["--backend", "ROCM_AITER_XX"], "Closest: ROCM_AITER_FA"),
    (["--backend", "ROCM_AITER_FA", "--arch", "gfx1201"], "only supported on gfx9"),
    (["--backend", "TRITON_MLA", "--mla", "--block-size", "1"], "Use ROCM_AITER_MLA"),
    (["--backend", "TRITON_ATTN", "--mla"], "is not an MLA backend"),
    (["--arch", "gfx1030"], "unknown ROCm arch 'gfx1030'"),
])
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_invalid_configuration_exits_2_with_message_on_stderr(argv, fragment, as_json):
    rc, out, err = run_select(argv + (["--json"] if as_json else []))
    assert rc == 2
    assert out == ""
    assert err.startswith("attncheck select: invalid configuration: ") and fragment in err


@pytest.mark.parametrize("argv", [["--env", "NOEQUALS"], ["--env", "=1"],
                                  ["--block-size", "0"], ["--block-size", "x"],
                                  ["--kv-cache-dtype", "int4"]])
def test_bad_arguments_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        _parser().parse_args(["select", *argv])
    assert info.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_without_env_the_process_environment_is_read():
    rc, out, _ = run_select([], environ={"VLLM_ROCM_USE_AITER": "1"})
    assert rc == 0 and "backend: ROCM_AITER_FA (automatic, rule P2)" in out


def test_env_options_replace_the_process_environment():
    rc, out, _ = run_select(["--env", "VLLM_V1_USE_PREFILL_DECODE_ATTENTION=1"],
                            environ={"VLLM_ROCM_USE_AITER": "1"})
    assert rc == 0 and "backend: ROCM_ATTN (automatic, rule P3)" in out


def test_backend_option_beats_env_backend():
    rc, out, _ = run_select(["--backend", "triton_attn", "--env",
                             "VLLM_ATTENTION_BACKEND=ROCM_ATTN"])
    assert rc == 0 and "backend: TRITON_ATTN (explicit)" in out
    assert "VLLM_ATTENTION_BACKEND=ROCM_ATTN ignored" in out


def test_misspelt_variable_warning_is_printed():
    rc, out, _ = run_select(["--env", "VLLM_ATTENTION_BACKND=ROCM_AITER_FA"])
    assert rc == 0 and "backend: TRITON_ATTN (automatic, rule DEFAULT)" in out
    assert "did you mean VLLM_ATTENTION_BACKEND?" in out


def test_off_rocm_says_which_arch_it_evaluates():
    rc, out, _ = run_select([], probe=CPU)
    assert out.splitlines()[1] == ("note: not on ROCm (CPU only): evaluating vLLM's ROCm "
                                   "policy for gfx942 (the default; pass --arch to choose "
                                   "another)")
    rc, out, _ = run_select(["--json", "--arch", "gfx1100", "--env",
                             "VLLM_ROCM_USE_AITER=1"], probe=NVIDIA)
    obj = json.loads(out)
    assert obj["backend"] == "TRITON_ATTN"  # P2 needs gfx9
    assert obj["platform"] == {"vendor": "nvidia", "on_rocm": False, "arch": "gfx1100",
                               "arch_source": "argument", "note": obj["platform"]["note"]}
    assert "not on ROCm" in obj["platform"]["note"] and "gfx1100" in obj["platform"]["note"]


def test_on_rocm_uses_the_detected_arch_without_a_note():
    rc, out, _ = run_select(["--json", "--env", "VLLM_ROCM_USE_AITER=1"], probe=RDNA)
    obj = json.loads(out)
    assert obj["arch"] == "gfx1100" and obj["backend"] == "TRITON_ATTN"
    assert obj["platform"]["note"] is None and obj["platform"]["arch_source"] == "detected"
    rc, out, _ = run_select(["--env", "VLLM_ROCM_USE_AITER=1"], probe=MI300)
    assert "note:" not in out and "ROCM_AITER_FA" in out


def test_attncheck_arch_overrides_detection():
    rc, out, _ = run_select(["--json"], environ={"ATTNCHECK_ARCH": "gfx950"}, probe=MI300)
    obj = json.loads(out)
    assert obj["arch"] == "gfx950" and obj["platform"]["arch_source"] == "ATTNCHECK_ARCH"
    assert "gfx950" in obj["platform"]["note"]
    rc, out, err = run_select([], environ={"ATTNCHECK_ARCH": "mi300"})
    assert rc == 2 and "ATTNCHECK_ARCH: unknown ROCm arch 'mi300'" in err


def test_kv_cache_dtype_shows_the_fp8_flavour():
    rc, out, _ = run_select(["--kv-cache-dtype", "fp8", "--arch", "gfx942"])
    assert "kv cache: fp8 -> fp8_e4m3fnuz on gfx942" in out
    rc, out, _ = run_select(["--kv-cache-dtype", "fp8", "--arch", "gfx950"])
    assert "kv cache: fp8 -> fp8_e4m3fn on gfx950" in out


# ---- impl/platform.py -----------------------------------------------------------------------


@pytest.mark.parametrize("name,canon", [("gfx942", "gfx942"), ("GFX90A", "gfx90a"),
                                        ("gfx942:sramecc+:xnack-", "gfx942"),
                                        (" gfx1201 ", "gfx1201")])
def test_normalize_arch(name, canon):
    assert plat.normalize_arch(name) == canon


@pytest.mark.parametrize("bad", ["", "gfx908", "sm90", None, 942])
def test_normalize_arch_rejects(bad):
    with pytest.raises(plat.PlatformError, match="--arch"):
        plat.normalize_arch(bad, "--arch")


def test_arch_families():
    assert [a for a in plat.ROCM_ARCHS if plat.is_gfx9(a)] == ["gfx90a", "gfx942", "gfx950"]
    assert [a for a in plat.ROCM_ARCHS if plat.is_mi3xx(a)] == ["gfx942", "gfx950"]
    assert [a for a in plat.ROCM_ARCHS if plat.is_rdna(a)] == ["gfx1100", "gfx1101",
                                                              "gfx1200", "gfx1201"]


def test_fp8_flavour_per_platform():
    assert plat.fp8_flavour("gfx942") == "fp8_e4m3fnuz"
    assert plat.fp8_flavour("gfx950") == "fp8_e4m3fn"
    assert plat.fp8_flavour("gfx1100") == "fp8_e4m3fn"
    assert plat.fp8_flavour(None, "nvidia") == "fp8_e4m3fn"
    with pytest.raises(plat.PlatformError):
        plat.fp8_flavour(None, "amd")
    import torch

    assert plat.torch_fp8_dtype("fp8_e4m3fnuz") is torch.float8_e4m3fnuz
    assert plat.detect_platform(env={}, probe=MI300).fp8_flavour() == "fp8_e4m3fnuz"
    assert plat.detect_platform(env={}, probe=NVIDIA).fp8_flavour() == "fp8_e4m3fn"


def test_detect_platform_precedence():
    p = plat.detect_platform(env={}, probe=MI300)
    assert (p.vendor, p.arch, p.arch_source, p.on_rocm, p.gfx9) == (
        "amd", "gfx942", "detected", True, True)
    p = plat.detect_platform("gfx1100", env={"ATTNCHECK_ARCH": "gfx950"}, probe=MI300)
    assert (p.arch, p.arch_source) == ("gfx1100", "argument")
    p = plat.detect_platform(env={"ATTNCHECK_ARCH": "gfx950"}, probe=MI300)
    assert (p.arch, p.arch_source) == ("gfx950", "ATTNCHECK_ARCH")
    p = plat.detect_platform(env={}, probe=CPU)
    assert (p.vendor, p.arch, p.policy_arch()) == ("cpu", None, "gfx942")
    p = plat.detect_platform(env={}, probe=lambda: ("amd", None, "6.4.1", None))
    assert p.on_rocm and p.arch is None  # ROCm build, no visible GPU
    with pytest.raises(plat.PlatformError, match="ATTNCHECK_ARCH"):
        plat.detect_platform(env={"ATTNCHECK_ARCH": ""}, probe=CPU)


def test_detect_platform_on_this_machine():
    import torch

    p = plat.detect_platform(env={})
    if torch.version.hip:
        assert p.vendor == "amd"
    elif torch.cuda.is_available():
        assert p.vendor == "nvidia" and plat.is_cuda() and not plat.is_rocm()
    else:
        assert (p.vendor, p.arch) == ("cpu", None)
        assert not plat.is_cuda() and not plat.is_rocm()


def test_is_interpreter():
    assert plat.is_interpreter({"TRITON_INTERPRET": "1"})
    assert not plat.is_interpreter({"TRITON_INTERPRET": "0"})
    assert not plat.is_interpreter({})


def test_seed_argv_round_trip():
    """The argv built for a seed row carries exactly its parsed environment."""
    row = next(r for r in SEEDS if r.id == "rocm-attention-backends-docs:80")
    argv = seed_argv(row)
    assert argv == ["--explain", "--arch", "gfx942", "--env", "VLLM_ROCM_USE_AITER=1",
                    "--mla", "--block-size", "1"]
    assert parse_command(row.command).tensor_parallel == 8


# ---- vLLM versions --------------------------------------------------------------------------


@pytest.mark.parametrize("installed,argv,first_line", [
    (None, [], "vllm: 0.12.0 (line 0.12; the seeds' line; no vLLM installed)"),
    ("0.33.0", [], "vllm: 0.33.0 (line 0.33; the installed vLLM)"),
    ("0.12.1", [], "vllm: 0.12.1 (line 0.12; the installed vLLM)"),
    ("0.33.0", ["--vllm-version", "0.12"], "vllm: 0.12 (line 0.12; --vllm-version)"),
])
def test_the_output_says_which_vllm_version(installed, argv, first_line):
    rc, out, err = run_select(argv, installed=installed)
    assert rc == 0, err
    assert out.splitlines()[0] == first_line
    rc, out, _ = run_select(argv + ["--json"], installed=installed)
    assert json.loads(out)["vllm"]["line"] == first_line.split("line ")[1][:4]


def test_the_version_changes_the_answer():
    """No flags: vLLM 0.12 defaults to TRITON_ATTN, vLLM 0.33 to ROCM_ATTN (#36702)."""
    assert "backend: TRITON_ATTN (automatic, rule DEFAULT)" in run_select([])[1]
    assert "backend: ROCM_ATTN (automatic, rule PRIORITY)" in run_select(
        ["--vllm-version", "0.33.0"])[1]
    assert "backend: ROCM_ATTN (automatic, rule PRIORITY)" in run_select(
        [], installed="0.33.0")[1]


@pytest.mark.parametrize("argv,installed,fragment", [
    (["--vllm-version", "0.20.0"], None, "vLLM 0.20.0 is not modelled"),
    (["--vllm-version", "zero"], None, "vllm_version: 'zero' is not a version number"),
    ([], "0.20.0", "installed vLLM 0.20.0: vLLM 0.20.0 is not modelled"),
    (["--attention-config", '{"backend": "ROCM_ATTN"}'], None,
     "vLLM 0.12 has no attention config"),
    (["--vllm-version", "0.33", "--attention-backend", "TRITON_ATTN", "--attention-config",
      '{"backend": "ROCM_ATTN"}'], None, "mutually exclusive"),
    (["--vllm-version", "0.33", "--attention-backend", "ROCM_AITER_FA", "--arch", "gfx90a"],
     None, "compute capability not supported"),
    (["--vllm-version", "0.33", "--mla", "--block-size", "1"], None,
     "no valid attention backend for this configuration (TRITON_MLA: block_size not "
     "supported)"),
])
def test_version_errors_exit_2_with_one_line(argv, installed, fragment):
    rc, out, err = run_select(argv, installed=installed)
    assert rc == 2 and out == ""
    assert err.startswith("attncheck select: invalid configuration: ") and fragment in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("text", ["{", "[1]", "backend=ROCM_ATTN"])
def test_bad_attention_config_is_a_usage_error(text, capsys):
    with pytest.raises(SystemExit) as info:
        _parser().parse_args(["select", "--attention-config", text])
    assert info.value.code == 2 and "--attention-config: expected a JSON object" in \
        capsys.readouterr().err


def test_attention_backend_and_config_name_the_backend_in_0_33():
    rc, out, _ = run_select(["--vllm-version", "0.33", "--attention-config",
                             '{"backend": "rocm_aiter_unified_attn"}', "--env",
                             "VLLM_ROCM_USE_AITER=1"])
    assert rc == 0 and "backend: ROCM_AITER_UNIFIED_ATTN (explicit)" in out
    assert "block size: 64 (default)" in out
    assert "VLLM_ROCM_USE_AITER=1 ignored: the explicit backend" in out
    rc, out, _ = run_select(["--vllm-version", "0.33", "--attention-backend", "auto"])
    assert rc == 0 and "backend: ROCM_ATTN (automatic, rule PRIORITY)" in out


@pytest.mark.parametrize("row", SEEDS, ids=seed_id)
def test_explain_works_on_every_seed_example_in_0_33(row):
    """The issue's 'done when': --vllm-version 0.33.0 --explain on the seed examples."""
    rc, out, err = run_select(["--vllm-version", "0.33.0", *seed_argv(row)])
    if rc == 2:  # vLLM 0.33 refuses it: the chain goes to stderr, ending in the error
        chain = [line.strip() for line in err.splitlines()[:-1]]
        assert chain[0].startswith("1. VERSION: vLLM 0.33.0") and ": error: " in chain[-1]
        assert err.splitlines()[-1].startswith("attncheck select: invalid configuration: ")
        return
    assert rc == 0, err
    lines = out.splitlines()
    backend = next(line for line in lines if line.startswith("backend: "))
    rules = lines[lines.index("rules:") + 1:]
    assert rules[0].strip().startswith("1. VERSION: vLLM 0.33.0: line 0.33")
    decided = "E-WINS" if "(explicit)" in backend else "PRIORITY"
    assert any(f". {decided}: " in r and backend.split()[1] in r for r in rules), out
    if "VLLM_ATTENTION_BACKEND" in row.command:  # 0.33 no longer reads it, and says so
        assert "VLLM_ATTENTION_BACKEND" in out and "no longer reads it" in out


def test_compare_versions_shows_every_changed_seed_example_side_by_side():
    rc, out, err = run_select(["--compare-versions"])
    assert rc == 0, err
    header, *body = out.splitlines()
    changed = [line for line in body if line and not line.startswith(" ")]
    assert header.startswith(f"{len(changed)} of {len(SEEDS)} seed examples select "
                             "differently in vLLM 0.33.0 than in vLLM 0.12.0")
    expected = {r.id for r in SEEDS if _result(r, "0.12.0") != _result(r, "0.33.0")}
    assert {line.split(": ", 1)[0] for line in changed} == expected and expected
    first = body.index(changed[0] if changed else "")
    assert body[first + 1].split("|")[0].strip() == "vLLM 0.12.0"
    assert body[first + 1].split("|")[1].strip() == "vLLM 0.33.0"
    rc, out, _ = run_select(["--compare-versions", "--json"])
    assert {o["example"] for o in json.loads(out)} == expected


def _result(row, version):
    from impl.selection import SelectionError, select_backend

    try:
        sel = select_backend(**row.inputs(), vllm_version=version)
    except SelectionError:
        return "error"
    return (sel.backend, sel.block_size)


def test_installed_version_is_read_from_package_metadata(monkeypatch):
    from importlib import metadata

    monkeypatch.setattr(metadata, "version", lambda name: "0.33.0" if name == "vllm" else "")
    assert select_cmd.installed_vllm_version() == "0.33.0"

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    assert select_cmd.installed_vllm_version() is None
