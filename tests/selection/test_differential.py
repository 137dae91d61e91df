"""Differential test: ``select_backend`` against vLLM's own ROCm selector, for each modelled line.

For each line, the reference release's Python sources come from its wheel (tests/selection/
vllm_release.py: ``pip download --no-deps vllm==X`` once into a cache, only the listed files
kept; the installed vLLM's files when it is that version). Its selector runs in a sandbox
(tests/selection/vllm_sandbox.py): ``vllm/platforms/rocm.py`` and what it calls are vLLM's
code; compiled parts and third-party packages are stubs; the GPU arch (``amdsmi`` /
``torch.cuda``), ``aiter`` being installed, the environment and the vLLM config are answered
by this test.

Every configuration of the exhaustive matrix (tests/selection/helpers.py) that the release
can express is compared: the backend and effective block size, or that it is an error. A
disagreement must be one of ``DEVIATIONS`` (documented, with the reason); each deviation must
still occur. The planted-bug tests show that a policy with one rule flipped is caught.

Seeds' line: vLLM 0.12.0 is the first release after PR #29371 (merged 2025-11-25): the 0.11.2
wheel (files dated 2025-11-20) still has the pre-#26980 logic in which AITER flags override an
explicit backend, while the 0.12.0 wheel (files dated 2025-12-03) has #26980's order and the
explicit FLEX_ATTENTION branch of #29371.
"""

from __future__ import annotations

import ast
import functools
import itertools
import os
from collections import Counter
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import pytest
import torch

from impl.selection import LINES, SEEDS_LINE, SelectionError, select_backend
from impl.selection import capabilities, line_0_33, seeds_line
from impl.selection import VALID_BACKENDS
from tests.selection.helpers import (AITER, AITER_MHA, AITER_MLA, AITER_UNIFIED, ARCHS,
                                     BACKEND, FLAG_NAMES, GFX9, PREFILL_DECODE, describe,
                                     env_of, matrix_keys)
from tests.selection.vllm_release import ReleaseUnavailable, module_file, sources
from tests.selection.vllm_sandbox import Lazy, Sandbox

pytestmark = pytest.mark.smoke

HEAD_SIZE = {"MHA": 128, "MLA": 576}  # vLLM needs concrete values; MLA's is the latent width
DTYPE = "bfloat16"
ENV_VARS = (AITER, AITER_MHA, AITER_UNIFIED, PREFILL_DECODE, AITER_MLA, BACKEND)
THIRD_PARTY_STUBS = ("pydantic", "tqdm", "transformers", "msgspec", "cachetools",
                     "huggingface_hub")


# ---- answering the machine ------------------------------------------------------------------


class _DeviceProperties:
    def __init__(self, arch: str):
        self.gcnArchName = f"{arch}:sramecc+:xnack-"  # torch's form, feature suffixes included


def _amdsmi(arch: str) -> dict:
    return {"amdsmi_init": lambda: None, "amdsmi_shut_down": lambda: None,
            "amdsmi_get_processor_handles": lambda: ["gpu0"],
            "amdsmi_get_gpu_asic_info": lambda handle: {"target_graphics_version": arch}}


def _current_platform():
    import importlib

    return importlib.import_module("vllm.platforms.rocm").RocmPlatform()


def _refresh_class_from_envs(module, class_name: str) -> None:
    """Re-run the ``X = envs.NAME`` assignments of a class body (vLLM captures environment
    variables there at import time; the test changes the environment afterwards)."""
    cls = getattr(module, class_name)
    for attr, name in _env_assignments(module.__file__, class_name):
        setattr(cls, attr, getattr(module.envs, name))


@functools.lru_cache(maxsize=None)
def _env_assignments(path: str, class_name: str) -> tuple:
    out = []
    for node in ast.parse(open(path, encoding="utf-8").read()).body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for stmt in node.body:
                if (isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Attribute)
                        and isinstance(stmt.value.value, ast.Name)
                        and stmt.value.value.id == "envs"):
                    out += [(target.id, stmt.value.attr) for target in stmt.targets]
    return tuple(out)


class _Environment:
    """The process environment for one evaluation (vLLM's envs.py reads os.environ)."""

    def __init__(self):
        self.saved = {k: os.environ.get(k) for k in ENV_VARS}

    def set(self, env: dict) -> None:
        for k in ENV_VARS:
            os.environ.pop(k, None)
        os.environ.update(env)

    def restore(self) -> None:
        for k, v in self.saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


# ---- one adapter per release: outcome of vLLM's selector for one matrix key ----------------


@dataclass
class Release:
    version: str
    real: tuple  # vLLM modules loaded from the wheel
    extra_files: tuple  # files read but not imported
    evaluate: Callable  # (sandbox, key, root) -> ("ok", backend, block) | ("error", text)
    answers: Callable  # arch -> answers for the sandbox
    patches: Callable  # arch -> [(obj, attr, value)]


@functools.lru_cache(maxsize=None)  # one per loaded registry module
def _names_by_path(registry) -> dict:
    out = {}
    for member in registry.AttentionBackendEnum:
        try:
            out[member.get_path()] = member.name
        except ValueError:  # CUSTOM: no path until registered
            pass
    return out


class _Resolved:
    """What vLLM 0.12's selector resolves a class path to (the class itself is not needed)."""

    def __init__(self, path: str):
        self.path = path

    def get_required_kv_cache_layout(self):
        return None

    def get_name(self) -> str:
        return self.path


def _evaluate_0_12(sandbox, key, root):
    import importlib

    vals, explicit, arch, kind, block = key
    env = env_of(vals)
    if explicit is not None:
        env[BACKEND] = explicit  # vLLM 0.12's only way to name a backend
    os.environ.update(env)
    rocm = importlib.import_module("vllm.platforms.rocm")
    selector = importlib.import_module("vllm.attention.selector")
    aiter_ops = importlib.import_module("vllm._aiter_ops")
    _refresh_class_from_envs(aiter_ops, "rocm_aiter_ops")
    config = SimpleNamespace(cache_config=SimpleNamespace(block_size=block),
                             compilation_config=SimpleNamespace(custom_ops=[]),
                             parallel_config=SimpleNamespace(worker_cls="auto"))
    rocm.RocmPlatform.check_and_update_config(config)  # vLLM's block-size default
    effective = config.cache_config.block_size
    try:
        resolved = selector._cached_get_attn_backend.__wrapped__(
            HEAD_SIZE[kind], getattr(torch, DTYPE), "auto", effective, kind == "MLA", False,
            False, None)
    except (ValueError, RuntimeError, AssertionError) as e:
        return ("error", f"{type(e).__name__}: {e}")
    registry = importlib.import_module("vllm.attention.backends.registry")
    return ("ok", _names_by_path(registry)[resolved.path], effective)


@functools.lru_cache(maxsize=None)
def _default_block_size(root) -> int:
    """vLLM 0.33's ``CacheConfig.DEFAULT_BLOCK_SIZE``, read from its source."""
    tree = ast.parse((root / "vllm/config/cache.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == \
                "DEFAULT_BLOCK_SIZE":
            return ast.literal_eval(node.value)
    raise AssertionError("no DEFAULT_BLOCK_SIZE in vllm/config/cache.py")


def _evaluate_0_33(sandbox, key, root, head_size=None, dtype=DTYPE, kv_cache_dtype="auto"):
    import importlib

    vals, explicit, arch, kind, block = key
    os.environ.update(env_of(vals))
    rocm = importlib.import_module("vllm.platforms.rocm")
    aiter_ops = importlib.import_module("vllm._aiter_ops")
    _refresh_class_from_envs(aiter_ops, "rocm_aiter_ops")
    attention = importlib.import_module("vllm.config.attention")
    selector = importlib.import_module("vllm.v1.attention.selector")
    try:
        chosen = (None if explicit is None
                  else attention.AttentionConfig.validate_backend_before(explicit))
        config = selector.AttentionSelectorConfig(
            head_size=head_size or HEAD_SIZE[kind], dtype=getattr(torch, dtype),
            kv_cache_dtype=kv_cache_dtype, block_size=block, use_mla=kind == "MLA")
        path = rocm.RocmPlatform.get_attn_backend_cls(chosen, config)
    except (ValueError, KeyError) as e:
        return ("error", f"{type(e).__name__}: {e}")
    registry = importlib.import_module("vllm.v1.attention.backends.registry")
    name = _names_by_path(registry)[path]
    if block is None:  # vLLM's update_block_size_for_backend for one backend
        backend_cls = importlib.import_module("vllm.utils.import_utils") \
            .resolve_obj_by_qualname(path)
        block = backend_cls.get_preferred_block_size(_default_block_size(root))
    return ("ok", name, block)


_COMMON_REAL = ("vllm.envs", "vllm.platforms.rocm", "vllm.platforms.interface",
                "vllm._aiter_ops")

RELEASES = {
    "0.12": Release(
        "0.12.0",
        real=_COMMON_REAL + ("vllm.attention.backends.registry", "vllm.attention.selector"),
        extra_files=(),
        evaluate=_evaluate_0_12,
        answers=lambda arch: {
            "amdsmi": {}, "aiter": {}, "regex": __import__("re"),
            "vllm.platforms": {"current_platform": Lazy(_current_platform)},
            "vllm.utils.import_utils": {"resolve_obj_by_qualname": _Resolved}},
        patches=lambda arch: [(torch.cuda, "get_device_properties",
                               lambda *a, **k: _DeviceProperties(arch))]),
    "0.33": Release(
        "0.33.0",
        real=_COMMON_REAL + (
            "vllm.v1.attention.backends.registry", "vllm.v1.attention.backend",
            "vllm.v1.attention.selector", "vllm.config.attention", "vllm.utils.import_utils",
            "vllm.v1.attention.backends.rocm_attn", "vllm.v1.attention.backends.rocm_aiter_fa",
            "vllm.v1.attention.backends.rocm_aiter_unified_attn",
            "vllm.v1.attention.backends.triton_attn",
            "vllm.v1.attention.backends.flex_attention",
            "vllm.v1.attention.backends.turboquant_attn",
            "vllm.v1.attention.backends.ultraquant_attn",
            "vllm.v1.attention.backends.rocm_octave_attn",
            "vllm.v1.attention.backends.mla.triton_mla",
            "vllm.v1.attention.backends.mla.rocm_aiter_mla",
            "vllm.v1.attention.backends.mla.aiter_triton_mla",
            "vllm.model_executor.layers.attention.mla_attention"),
        extra_files=("vllm/config/cache.py",),
        evaluate=_evaluate_0_33,
        answers=lambda arch: {
            "amdsmi": _amdsmi(arch), "aiter": {}, "regex": __import__("re"),
            "vllm.platforms": {"current_platform": Lazy(_current_platform)},
            "vllm.config": {"get_current_vllm_config_or_none": lambda: None}},
        patches=lambda arch: []),
}


def test_every_modelled_line_has_a_release():
    assert set(RELEASES) == {line.name for line in LINES}
    for line in LINES:
        assert RELEASES[line.name].version == line.reference


# ---- running both sides ---------------------------------------------------------------------


def outcome_of_policy(key, version: str, select=select_backend, head_size=None, dtype=DTYPE,
                      kv_cache_dtype="auto"):
    vals, explicit, arch, kind, block = key
    try:
        sel = select(env_of(vals), explicit, arch=arch, kind=kind, block_size=block,
                     head_size=head_size or HEAD_SIZE[kind], dtype=dtype,
                     kv_cache_dtype=kv_cache_dtype, vllm_version=version)
    except SelectionError as e:
        return ("error", str(e))
    return ("ok", sel.backend, sel.block_size)


def vllm_outcomes(release: Release, arch: str) -> dict:
    """vLLM's outcome for every matrix key of one arch (vLLM reads the arch at import, so
    each arch gets its own sandbox)."""
    files = [module_file(m) for m in release.real] + list(release.extra_files)
    try:
        root = sources(release.version, files)
    except ReleaseUnavailable as e:
        pytest.skip(f"vLLM {release.version}'s wheel cannot be had here: {e}")
    sandbox = Sandbox(root, release.real, stubbed=THIRD_PARTY_STUBS,
                      answers=release.answers(arch))
    sandbox.patches = release.patches(arch)
    out = {}
    environment = _Environment()
    try:
        with sandbox:
            for key in matrix_keys(archs=(arch,)):
                environment.set({})
                out[key] = release.evaluate(sandbox, key, root)
    finally:
        environment.restore()
    return out


_VLLM: dict = {}  # (line, arch) -> vLLM's outcomes, computed once per test process


def compared(line_name: str, archs=ARCHS) -> tuple:
    """(keys, vLLM's outcomes, the policy's outcomes) for a line on ``archs``."""
    release = RELEASES[line_name]
    theirs = {}
    for arch in archs:
        if (line_name, arch) not in _VLLM:
            _VLLM[line_name, arch] = vllm_outcomes(release, arch)
        theirs.update(_VLLM[line_name, arch])
    keys = list(theirs)
    ours = {k: outcome_of_policy(k, release.version) for k in keys}
    return keys, theirs, ours


# ---- documented deviations ------------------------------------------------------------------


@dataclass(frozen=True)
class Deviation:
    id: str
    line: str
    applies: Callable  # (key, vLLM's outcome, ours) -> bool
    reason: str


def _mla_small_block_off_gfx9(key, theirs, ours):
    vals, explicit, arch, kind, block = key
    return (kind == "MLA" and explicit is None and block == 1 and arch not in GFX9
            and theirs[:2] == ("ok", "ROCM_AITER_MLA") and ours[0] == "error")


def _aiter_mla_named_off_gfx9(key, theirs, ours):
    vals, explicit, arch, kind, block = key
    return (explicit == "ROCM_AITER_MLA" and kind == "MLA" and arch not in GFX9
            and theirs[:2] == ("ok", "ROCM_AITER_MLA") and ours[0] == "error")


def _mha_block_not_multiple_of_16(key, theirs, ours):
    vals, explicit, arch, kind, block = key
    return kind == "MHA" and block == 1 and theirs[0] == "ok" and ours[0] == "error"


DEVIATIONS = (
    Deviation("mla-small-block-off-gfx9", "0.12", _mla_small_block_off_gfx9,
              "automatic MLA with block size 1 off gfx9: vLLM 0.12 picks ROCM_AITER_MLA for "
              "block size 1 on any GPU; AITER's MLA decode needs gfx9, so the policy says so "
              "(DESIGN.md: 'else an error that says why')"),
    Deviation("aiter-mla-named-off-gfx9", "0.12", _aiter_mla_named_off_gfx9,
              "ROCM_AITER_MLA named on RDNA: vLLM 0.12 accepts it without any check; AITER's "
              "MLA decode kernels are gfx9 assembly, so the policy refuses it (E-ARCH)"),
    Deviation("mha-block-not-multiple-of-16", "0.12", _mha_block_not_multiple_of_16,
              "MHA with block size 1: vLLM 0.12's selector does not look at the block size; "
              "its MHA kernels declare block sizes that are multiples of 16 and the seeds use "
              "16, so the policy refuses it at selection (BLOCK)"),
)


def classify(keys, theirs, ours, line_name: str) -> tuple:
    """(agreements, {deviation id: count}, [undocumented disagreements])."""
    agree, documented, undocumented = 0, Counter(), []
    mine = [d for d in DEVIATIONS if d.line == line_name]
    for key in keys:
        a, b = theirs[key], ours[key]
        if a[0] == b[0] == "error" or a == b:
            agree += 1
            continue
        hits = [d.id for d in mine if d.applies(key, a, b)]
        if len(hits) == 1:
            documented[hits[0]] += 1
        else:
            undocumented.append(f"{describe(key)}: vLLM {a[:3]}, policy {b[:3]}"
                                + (f" (matches {hits})" if hits else ""))
    return agree, documented, undocumented


@pytest.mark.parametrize("line_name", [line.name for line in LINES])
def test_policy_agrees_with_vllm_or_documents_why(line_name):
    keys, theirs, ours = compared(line_name)
    agree, documented, undocumented = classify(keys, theirs, ours, line_name)
    summary = (f"vLLM {RELEASES[line_name].version}: {len(keys)} configurations compared, "
               f"{agree} agree, {sum(documented.values())} documented deviations "
               f"({', '.join(f'{k}: {v}' for k, v in sorted(documented.items())) or 'none'})")
    print(summary)
    assert not undocumented, (f"{summary}; {len(undocumented)} undocumented:\n"
                              + "\n".join(undocumented[:20]))
    stale = [d.id for d in DEVIATIONS if d.line == line_name and not documented[d.id]]
    assert not stale, f"documented deviations that no longer occur: {stale}"
    assert agree + sum(documented.values()) == len(keys)
    assert {o[0] for o in theirs.values()} == {"ok", "error"}  # both outcomes exercised


# ---- planted bugs: a policy with one rule flipped is caught -------------------------------


def _undocumented_with(line_name: str, target, attr, value, monkeypatch,
                       archs=("gfx942", "gfx1100")) -> list:
    """Disagreements no deviation explains, with ``target.attr`` replaced by ``value``."""
    keys, theirs, ours = compared(line_name, archs)
    assert not classify(keys, theirs, ours, line_name)[2]  # clean before the plant
    monkeypatch.setattr(target, attr, value)
    version = RELEASES[line_name].version
    planted = {k: outcome_of_policy(k, version) for k in keys}
    return classify(keys, theirs, planted, line_name)[2]


def test_planted_seeds_line_p1_p2_swapped_is_caught(monkeypatch):
    """AITER FA checked before AITER unified attention (P2 before P1)."""
    real = seeds_line._auto_mha

    def swapped(env, flags, arch, trace):
        if flags[AITER] and flags[AITER_MHA] and arch in GFX9:
            trace.add("P2", "-> ROCM_AITER_FA")
            return "ROCM_AITER_FA", "P2"
        return real(env, flags, arch, trace)

    assert _undocumented_with(SEEDS_LINE.name, seeds_line, "_auto_mha", swapped, monkeypatch)


def test_planted_seeds_line_aiter_block_64_is_caught(monkeypatch):
    """The 2026 default (64 for AITER unified attention) in the seeds' line."""
    real = seeds_line._block_size

    def preferred(name, kind, block_size, trace):
        if block_size is None and name == "ROCM_AITER_UNIFIED_ATTN":
            trace.add("BLOCK", "no block size given: 64")
            return 64, "default"
        return real(name, kind, block_size, trace)

    assert _undocumented_with(SEEDS_LINE.name, seeds_line, "_block_size", preferred,
                              monkeypatch)


def test_planted_0_33_unified_default_16_is_caught(monkeypatch):
    """vLLM 0.33's preferred block size of AITER unified attention forgotten."""
    assert _undocumented_with("0.33", line_0_33, "PREFERRED_BLOCK_SIZE", {}, monkeypatch)


def test_planted_0_33_aiter_fa_on_gfx90a_is_caught(monkeypatch):
    """AITER allowed on every gfx9 (the 2025 rule) in the 0.33 line."""
    assert _undocumented_with("0.33", line_0_33, "CDNA_VERSION",
                              {"gfx90a": 3, "gfx942": 3, "gfx950": 4}, monkeypatch,
                              archs=("gfx90a",))


def test_planted_seeds_line_triton_mla_block_1_is_caught(monkeypatch):
    """TRITON_MLA accepting block size 1 (vLLM 0.12 refuses it)."""
    assert _undocumented_with(SEEDS_LINE.name, seeds_line, "TRITON_MLA_MIN_BLOCK", 1,
                              monkeypatch)


# ---- what each backend accepts: the 0.33 line's facts against vLLM 0.33's validation --------

CAPS_HEAD_SIZES = {"MHA": (16, 32, 64, 80, 96, 128, 192, 256, 512), "MLA": (576,)}
CAPS_DTYPES = ("float16", "bfloat16", "float32")
CAPS_KV = ("auto", "float16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2")


def capability_disagreements() -> tuple:
    """(configurations compared, disagreements) of the 0.33 capability sweep."""
    release = RELEASES["0.33"]
    files = [module_file(m) for m in release.real] + list(release.extra_files)
    try:
        root = sources(release.version, files)
    except ReleaseUnavailable as e:
        pytest.skip(f"vLLM {release.version}'s wheel cannot be had here: {e}")
    sandbox = Sandbox(root, release.real, stubbed=THIRD_PARTY_STUBS,
                      answers=release.answers("gfx942"))
    aiter_on = tuple("1" if name == AITER else None for name in FLAG_NAMES)
    no_flags = (None,) * len(FLAG_NAMES)
    disagreements, compared_count = [], 0
    environment = _Environment()
    try:
        with sandbox:
            for vals in (no_flags, aiter_on):
                for explicit in (None,) + VALID_BACKENDS:
                    for kind in ("MHA", "MLA"):
                        for head, dtype, kv in itertools.product(
                                CAPS_HEAD_SIZES[kind], CAPS_DTYPES, CAPS_KV):
                            key = (vals, explicit, "gfx942", kind, None)
                            environment.set({})
                            theirs = release.evaluate(sandbox, key, root, head, dtype, kv)
                            ours = outcome_of_policy(key, release.version, head_size=head,
                                                     dtype=dtype, kv_cache_dtype=kv)
                            compared_count += 1
                            if not (theirs == ours or theirs[0] == ours[0] == "error"):
                                disagreements.append(
                                    f"{describe(key)} head {head} {dtype} kv {kv}: vLLM "
                                    f"{theirs[:3]}, policy {ours[:3]}")
    finally:
        environment.restore()
    return compared_count, disagreements


def test_0_33_capabilities_agree_with_vllm_validation():
    """Every modelled backend, named and automatic, over head sizes, model dtypes and
    kv-cache dtypes (flags unset and AITER on, gfx942): impl/selection/capabilities.py's facts
    for line 0.33 (ours plus VLLM_FACTS) give vLLM 0.33.0's answers."""
    compared_count, disagreements = capability_disagreements()
    print(f"vLLM 0.33.0 capabilities: {compared_count} configurations compared, "
          f"{compared_count - len(disagreements)} agree")
    assert not disagreements, f"{len(disagreements)} of {compared_count}:\n" + "\n".join(
        disagreements[:20])


def test_planted_missing_vllm_fact_is_caught(monkeypatch):
    """Without vLLM's head sizes for ROCM_AITER_FA, ours (any head size) is caught."""
    facts = {line: dict(table) for line, table in capabilities.VLLM_FACTS.items()}
    facts["0.33"]["ROCM_AITER_FA"] = {
        k: v for k, v in facts["0.33"]["ROCM_AITER_FA"].items() if k != "head_sizes"}
    monkeypatch.setattr(capabilities, "VLLM_FACTS", facts)
    capabilities.facts.cache_clear()
    try:
        _, disagreements = capability_disagreements()
    finally:
        capabilities.facts.cache_clear()
    assert disagreements and all("ROCM_AITER_FA" in d for d in disagreements)
