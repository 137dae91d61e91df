"""The seeds' line: vLLM 0.12 (PR #26980's selection, with PR #29371's FLEX_ATTENTION fix).

DESIGN.md "Selection policy" states these rules; ``RocmPlatform.get_attn_backend_cls`` of
vLLM 0.12.0 implements them. Rule ids (each explanation line starts with one;
``Selection.decided_by`` names the deciding one):

  INPUT     the configuration evaluated
  TYPO      an unknown VLLM_* variable close to a known one -> "did you mean" warning
  ENV       parse the selection flags (1/true/yes/on, 0/false/no/off; anything else is an error)
  E-SOURCE  where the explicit backend came from (argument > VLLM_ATTENTION_BACKEND)
  E-NAME    name lookup: case-insensitive, legacy ``_VLLM_V1`` suffix accepted with a note
  E-WINS    an explicit backend wins; the selection flags that are set are ignored (named)
  E-KIND    MLA model with a non-MLA backend, or the reverse -> error
  E-ARCH    ROCM_AITER_FA / ROCM_AITER_MLA need gfx9 (gfx90a, gfx942, gfx950)
  P1, P2, P3, DEFAULT        automatic MHA choice
  MLA-AITER, MLA-TRITON, MLA-SMALL-BLOCK   automatic MLA choice
  BLOCK     effective block size (the user's, else vLLM's default 16) and the backend's rule
  CAPS      dtype / head size / fp8 KV of the chosen backend (impl/selection/capabilities.py)

Where this policy and vLLM 0.12.0 answer differently, tests/selection/test_differential.py
lists the case with its reason (docs/selection.md, "Deviations").
"""

from __future__ import annotations

from typing import Mapping, Optional

from impl.platform import GFX9_ARCHS
from impl.selection import capabilities as caps
from impl.selection.common import (BACKEND_VAR, DEFAULT_BLOCK_SIZE, LEGACY_SUFFIX,
                                   SELECTION_FLAGS, USE_AITER, USE_AITER_MHA, USE_AITER_MLA,
                                   USE_AITER_UNIFIED, USE_PREFILL_DECODE, Inputs, Trace,
                                   lookup_name, parse_flags, show_flag)

LINE = "0.12"
NEEDS_GFX9 = ("ROCM_AITER_FA", "ROCM_AITER_MLA")
MHA_BLOCK_MULTIPLE = 16  # the kernel block sizes vLLM declares for its MHA backends
TRITON_MLA_MIN_BLOCK = 16  # the seeds: "TRITON_MLA requires block-size >= 16"


def _explicit_name(env: Mapping[str, str], backend: Optional[str], trace: Trace):
    """(raw name, where it came from) or (None, None) when no backend was named."""
    from_env = env.get(BACKEND_VAR)
    if backend is not None:
        if from_env is not None and from_env.strip().upper() != str(backend).strip().upper():
            trace.warn(f"{BACKEND_VAR}={from_env} ignored: the backend argument "
                       f"{backend!r} takes precedence")
        trace.add("E-SOURCE", f"explicit backend {backend!r} from the backend argument")
        return backend, "the backend argument"
    if from_env is not None:
        trace.add("E-SOURCE", f"explicit backend {from_env!r} from {BACKEND_VAR}")
        return from_env, BACKEND_VAR
    trace.add("E-SOURCE", f"no explicit backend (no argument, {BACKEND_VAR} unset): automatic")
    return None, None


def resolve_name(raw: object, source: str, trace: Trace) -> str:
    """vLLM enum name of a user-given backend name, or SelectionError."""
    name = raw.strip().upper() if isinstance(raw, str) else raw
    if isinstance(name, str) and name.endswith(LEGACY_SUFFIX) and name != LEGACY_SUFFIX:
        stripped = name[: -len(LEGACY_SUFFIX)]
        msg = (f"backend name {raw.strip()!r}: the {LEGACY_SUFFIX} suffix is deprecated; "
               f"use {stripped}")
        trace.warn(msg)
        trace.add("E-NAME", msg)
        name = stripped
    resolved = lookup_name(name, source, caps.VALID_BACKENDS, trace, case_note=False)
    given = raw.strip()
    if given.upper() == resolved and given != resolved:
        trace.add("E-NAME", f"{given!r} -> {resolved} (names are case-insensitive)")
    if given != resolved:
        trace.warn(f"vLLM 0.12 itself rejects {given!r}: it checks {BACKEND_VAR} against "
                   "the exact enum names (case and suffix included) before anything else; "
                   f"attncheck reads it as {resolved}")
    return resolved


def _ignore_flags(env: Mapping[str, str], name: str, trace: Trace) -> tuple:
    ignored = tuple(f"{v}={env[v]}" for v in SELECTION_FLAGS if v in env)
    for item in ignored:
        trace.warn(f"{item} ignored: the explicit backend {name} wins")
    trace.add("E-WINS", f"explicit backend {name} wins"
              + (f"; ignored flags: {', '.join(ignored)}" if ignored else ""))
    return ignored


def _check_explicit(name: str, kind: str, arch: str, trace: Trace) -> None:
    if kind == "MLA" and name not in caps.MLA_BACKENDS:
        trace.fail("E-KIND", f"{name} is not an MLA backend but the model uses MLA",
                   f"Use {' or '.join(caps.MLA_BACKENDS)}")
    if kind == "MHA" and name in caps.MLA_BACKENDS:
        trace.fail("E-KIND", f"{name} is an MLA backend but the model is not MLA",
                   f"Use one of {', '.join(caps.MHA_BACKENDS)}")
    trace.add("E-KIND", f"{name} matches the model's attention kind ({kind})")
    if name in NEEDS_GFX9:
        if arch not in GFX9_ARCHS:
            other = ("TRITON_ATTN, ROCM_ATTN or ROCM_AITER_UNIFIED_ATTN" if kind == "MHA"
                     else "TRITON_MLA (block size >= 16)")
            trace.fail("E-ARCH", f"{name} is only supported on gfx9 GPUs "
                       f"({', '.join(GFX9_ARCHS)}), not {arch}", f"On {arch} use {other}")
        trace.add("E-ARCH", f"{name} needs gfx9: {arch} is gfx9")


def _auto_mha(env, flags, arch, trace: Trace) -> tuple:
    aiter, mha = flags[USE_AITER], flags[USE_AITER_MHA]
    unified, pd = flags[USE_AITER_UNIFIED], flags[USE_PREFILL_DECODE]
    show = lambda v: show_flag(v, env)  # noqa: E731
    if aiter and unified:
        trace.add("P1", f"{show(USE_AITER)} and {show(USE_AITER_UNIFIED)} "
                  "-> ROCM_AITER_UNIFIED_ATTN")
        return "ROCM_AITER_UNIFIED_ATTN", "P1"
    trace.add("P1", f"not taken: needs {USE_AITER}=1 and {USE_AITER_UNIFIED}=1 "
              f"(have {show(USE_AITER)}, {show(USE_AITER_UNIFIED)})")
    gfx9 = arch in GFX9_ARCHS
    if aiter and mha and gfx9:
        trace.add("P2", f"{show(USE_AITER)}, {show(USE_AITER_MHA)}, {arch} is gfx9 "
                  "-> ROCM_AITER_FA")
        return "ROCM_AITER_FA", "P2"
    why = [] if aiter else [show(USE_AITER)]
    if not mha:
        why.append(show(USE_AITER_MHA))
    if not gfx9:
        why.append(f"{arch} is not gfx9 ({', '.join(GFX9_ARCHS)})")
    trace.add("P2", f"not taken: {'; '.join(why)}")
    if pd:
        trace.add("P3", f"{show(USE_PREFILL_DECODE)} -> ROCM_ATTN")
        return "ROCM_ATTN", "P3"
    trace.add("P3", f"not taken: {show(USE_PREFILL_DECODE)}")
    trace.add("DEFAULT", "no priority rule applies -> TRITON_ATTN")
    return "TRITON_ATTN", "DEFAULT"


def _auto_mla(env, flags, arch, block_size: Optional[int], trace: Trace) -> tuple:
    aiter, mla = flags[USE_AITER], flags[USE_AITER_MLA]
    show = lambda v: show_flag(v, env)  # noqa: E731
    gfx9 = arch in GFX9_ARCHS
    if aiter and mla and gfx9:
        trace.add("MLA-AITER", f"{show(USE_AITER)}, {show(USE_AITER_MLA)}, {arch} is gfx9 "
                  "-> ROCM_AITER_MLA")
        return "ROCM_AITER_MLA", "MLA-AITER"
    why = [] if aiter else [show(USE_AITER)]
    if not mla:
        why.append(show(USE_AITER_MLA))
    if not gfx9:
        why.append(f"{arch} is not gfx9 ({', '.join(GFX9_ARCHS)})")
    trace.add("MLA-AITER", f"not taken: {'; '.join(why)}")
    effective = DEFAULT_BLOCK_SIZE if block_size is None else block_size
    if effective >= TRITON_MLA_MIN_BLOCK:
        trace.add("MLA-TRITON", f"block size {effective} >= {TRITON_MLA_MIN_BLOCK} "
                  "-> TRITON_MLA")
        return "TRITON_MLA", "MLA-TRITON"
    if gfx9:
        disabled = [f"{v}={env[v]}" for v in (USE_AITER, USE_AITER_MLA)
                    if v in env and not flags[v]]
        if disabled:
            trace.warn(
                f"{' and '.join(disabled)} ignored for block size {effective}: TRITON_MLA "
                f"needs block size >= {TRITON_MLA_MIN_BLOCK}, so ROCM_AITER_MLA is the only "
                "MLA backend that can run it")
        trace.add("MLA-SMALL-BLOCK", f"block size {effective} < {TRITON_MLA_MIN_BLOCK} "
                  f"(TRITON_MLA cannot run it) and AITER can run on {arch} -> ROCM_AITER_MLA")
        return "ROCM_AITER_MLA", "MLA-SMALL-BLOCK"
    trace.fail("MLA-SMALL-BLOCK",
               f"MLA with block size {effective} needs ROCM_AITER_MLA (TRITON_MLA needs block "
               f"size >= {TRITON_MLA_MIN_BLOCK}), and AITER MLA needs a gfx9 GPU, not {arch}",
               f"On {arch} use block size {DEFAULT_BLOCK_SIZE} or more (TRITON_MLA)")


def _warn_inert_subflags(env, flags, kind: str, trace: Trace) -> None:
    if flags[USE_AITER]:
        return
    subs = (USE_AITER_MHA, USE_AITER_UNIFIED) if kind == "MHA" else (USE_AITER_MLA,)
    for v in subs:
        if v in env and flags[v]:
            trace.warn(f"{v}={env[v]} has no effect without {USE_AITER}=1")


def _block_size(name: str, kind: str, block_size: Optional[int], trace: Trace) -> tuple:
    if block_size is None:
        eff, source = DEFAULT_BLOCK_SIZE, "default"
        trace.add("BLOCK", f"no block size given: {eff} (vLLM's default)")
    else:
        eff, source = block_size, "user"
        trace.add("BLOCK", f"block size {eff} given by the user")
    if kind == "MHA" and eff % MHA_BLOCK_MULTIPLE:
        trace.fail("BLOCK", f"{name} needs a block size that is a multiple of "
                   f"{MHA_BLOCK_MULTIPLE}, got {eff}",
                   "Use --block-size 16 (or 32, 64, ...); block size 1 is only for MLA "
                   "models (ROCM_AITER_MLA)")
    if name == "TRITON_MLA" and eff < TRITON_MLA_MIN_BLOCK:
        trace.fail("BLOCK", f"TRITON_MLA needs block size >= {TRITON_MLA_MIN_BLOCK}, "
                   f"got {eff}",
                   f"Use ROCM_AITER_MLA for block size {eff} (gfx9), or block size "
                   f"{DEFAULT_BLOCK_SIZE} with TRITON_MLA")
    return eff, source


def check_caps(line: str, name: str, inp: Inputs, trace: Trace) -> None:
    """The chosen backend's dtype, head size and fp8 KV facts (capabilities.py)."""
    f = caps.facts(line, name)
    if inp.dtype is not None and inp.dtype not in f.dtypes:
        trace.fail("CAPS", f"{name} does not support {inp.dtype} models "
                   f"(supports {', '.join(sorted(f.dtypes))})",
                   "Use one of those, or a backend that takes this dtype "
                   "(TRITON_ATTN / ROCM_ATTN take float32)")
    if inp.head_size is not None and not f.head_sizes.accepts(inp.head_size):
        trace.fail("CAPS", f"{name} does not support head size {inp.head_size} "
                   f"(supports {f.head_sizes.describe()})",
                   "Use TRITON_ATTN or ROCM_ATTN for this head size" if inp.kind == "MHA"
                   else "MLA head size is the 576-wide latent")
    if inp.kv_cache_dtype not in f.kv_cache_dtypes:
        trace.fail("CAPS", f"{name} does not support kv_cache_dtype {inp.kv_cache_dtype}",
                   "Use kv_cache_dtype auto, or TRITON_ATTN / ROCM_ATTN for an fp8 KV cache")
    checked = [what for what, given in (("dtype", inp.dtype), ("head size", inp.head_size))
               if given is not None] + ["kv cache dtype"]
    trace.add("CAPS", f"{name} takes this {', '.join(checked)}")


def select(inp: Inputs, trace: Trace) -> tuple:
    """(backend, block size, block size source, decided_by, explicit, ignored flags)."""
    if inp.attention_config:
        trace.fail("E-SOURCE", "vLLM 0.12 has no attention config (--attention-config came "
                   "with vLLM 0.13)", f"Name the backend with {BACKEND_VAR} or the backend "
                   "argument")
    env = inp.env
    flags = parse_flags(env, tuple(SELECTION_FLAGS), trace)
    raw, source = _explicit_name(env, inp.backend, trace)
    ignored: tuple = ()
    if raw is not None:
        name = resolve_name(raw, source, trace)
        ignored = _ignore_flags(env, name, trace)
        _check_explicit(name, inp.kind, inp.arch, trace)
        decided_by = "E-WINS"
    else:
        _warn_inert_subflags(env, flags, inp.kind, trace)
        if inp.kind == "MHA":
            name, decided_by = _auto_mha(env, flags, inp.arch, trace)
        else:
            name, decided_by = _auto_mla(env, flags, inp.arch, inp.block_size, trace)
    eff, bs_source = _block_size(name, inp.kind, inp.block_size, trace)
    check_caps(LINE, name, inp, trace)
    return name, eff, bs_source, decided_by, raw is not None, ignored
