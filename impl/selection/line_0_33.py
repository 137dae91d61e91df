"""vLLM 0.33's selection: a backend priority list and each backend's validation.

``RocmPlatform.get_attn_backend_cls`` of vLLM 0.33.0 (research/vllm-backends.md 1.6, versions
B and C, plus what the 0.33 wheel shows). Rule ids:

  INPUT, TYPO, ENV  as in the seeds' line; ENV also says which variables 0.33 no longer reads
                    (VLLM_ATTENTION_BACKEND, VLLM_V1_USE_PREFILL_DECODE_ATTENTION) or reads
                    without effect on selection (VLLM_ROCM_USE_AITER_UNIFIED_ATTENTION)
  E-SOURCE  where the explicit backend came from: the backend argument (vLLM's
            ``--attention-backend``) or ``attention_config["backend"]``; both is an error
  E-NAME    name lookup: case-insensitive, "auto" means automatic, no legacy suffix
  E-WINS    an explicit backend that passes its validation wins (flags ignored, named)
  E-VALID   an explicit backend that fails its validation -> error with vLLM's reasons
  PRIORITY  automatic: the priority list (MHA: ROCM_ATTN, ROCM_AITER_FA when AITER MHA is
            on and the GPU is MI3xx, ROCM_AITER_UNIFIED_ATTN wherever AITER can run (MI3xx;
            first on RDNA4 with VLLM_ROCM_USE_AITER=1), TRITON_ATTN; MLA: ROCM_AITER_MLA then
            TRITON_MLA when AITER MLA is on and the GPU is MI3xx, else TRITON_MLA); the first
            backend that passes its validation wins
  NO-VALID  no backend in the list passes -> error with each backend's reasons
  BLOCK     effective block size: the user's, else the backend's preferred size (64 for
            ROCM_AITER_UNIFIED_ATTN, 16 otherwise)

A backend's validation (vLLM's ``validate_configuration``, in its words): head size, model
dtype, kv-cache dtype, block size, MLA or not, and the GPU (ROCM_AITER_FA needs MI3xx); the
facts are in impl/selection/capabilities.py. vLLM's list ends with quantised-KV backends
(TURBOQUANT, ROCM_OCTAVE, ULTRAQUANT) and, for MLA, ROCM_AITER_TRITON_MLA: they accept none
of the kv-cache dtypes modelled here (ROCM_AITER_TRITON_MLA validates as ROCM_AITER_MLA), so
they never win and are not modelled. AITER is assumed installed, as in vLLM's ROCm images.
"""

from __future__ import annotations

from typing import Optional

from impl.selection import capabilities as caps
from impl.selection.common import (BACKEND_VAR, DEFAULT_BLOCK_SIZE, SELECTION_FLAGS,
                                   USE_AITER, USE_AITER_MHA, USE_AITER_MLA, USE_AITER_UNIFIED,
                                   USE_PREFILL_DECODE, Inputs, Trace, lookup_name, parse_flags,
                                   show_flag)

LINE = "0.33"
READ = (USE_AITER, USE_AITER_MHA, USE_AITER_MLA)
NOT_READ = {
    BACKEND_VAR: "vLLM 0.33 no longer reads it; name the backend with --attention-backend",
    USE_PREFILL_DECODE: "vLLM 0.33 no longer reads it; ROCM_ATTN is first in its automatic "
                        "order (or name it with --attention-backend ROCM_ATTN)",
    USE_AITER_UNIFIED: "vLLM 0.33 reads it but selection does not use it: "
                       "ROCM_AITER_UNIFIED_ATTN is in the automatic order wherever AITER can "
                       "run",
}
CDNA_VERSION = {"gfx90a": 2, "gfx942": 3, "gfx950": 4}  # vLLM's get_cdna_version()
RDNA4_ARCHS = ("gfx1200", "gfx1201")
PREFERRED_BLOCK_SIZE = {"ROCM_AITER_UNIFIED_ATTN": 64}  # get_preferred_block_size()
NEEDS_MI3XX = ("ROCM_AITER_FA",)  # supports_compute_capability: CDNA3 or newer


def aiter_can_run(arch: str) -> bool:
    """vLLM 0.33's ``is_aiter_found_and_supported``: AITER on CDNA3 or newer (MI3xx)."""
    return CDNA_VERSION.get(arch, 0) > 2


def reasons(name: str, inp: Inputs) -> list:
    """Why ``name`` cannot serve this configuration, in vLLM's words (empty = valid)."""
    f = caps.facts(LINE, name)
    out = []
    if inp.head_size is not None and not f.head_sizes.accepts(inp.head_size):
        out.append("head_size not supported")
    if inp.dtype is not None and inp.dtype not in f.dtypes:
        out.append("dtype not supported")
    if inp.kv_cache_dtype not in f.kv_cache_dtypes:
        out.append("kv_cache_dtype not supported")
    if inp.block_size is not None and not f.block_sizes.accepts(inp.block_size):
        out.append("block_size not supported")
    is_mla = name in caps.MLA_BACKENDS
    if (inp.kind == "MLA") != is_mla:
        out.append("MLA not supported" if inp.kind == "MLA" else "non-MLA not supported")
    if name in NEEDS_MI3XX and not aiter_can_run(inp.arch):
        out.append("compute capability not supported")
    return out


def _explicit_name(inp: Inputs, trace: Trace) -> Optional[str]:
    for key in sorted(inp.attention_config):
        if key != "backend":
            trace.warn(f"attention_config.{key} is not modelled by attncheck's policy; "
                       "ignored")
    from_config = inp.attention_config.get("backend")
    if isinstance(from_config, str) and from_config.strip().lower() == "auto":
        from_config = None
    if inp.backend is not None and from_config is not None:
        trace.fail("E-SOURCE", "the backend argument (--attention-backend) and "
                   "attention_config.backend are mutually exclusive (vLLM 0.33 refuses both)",
                   "Name the backend once")
    raw, source = ((inp.backend, "--attention-backend") if inp.backend is not None
                   else (from_config, "attention_config.backend"))
    if raw is None:
        trace.add("E-SOURCE", "no explicit backend (no --attention-backend, no "
                  "attention_config.backend): automatic")
        return None
    trace.add("E-SOURCE", f"explicit backend {raw!r} from {source}")
    if isinstance(raw, str) and raw.strip().lower() == "auto":
        trace.add("E-NAME", "'auto' -> automatic selection")
        return None
    return lookup_name(raw, source, caps.VALID_BACKENDS, trace)


def _flag_warnings(env, flags, kind: str, trace: Trace) -> None:
    for var, why in NOT_READ.items():
        if var in env:
            trace.warn(f"{var}={env[var]} ignored: {why}")
    if not flags[USE_AITER]:
        for v in ((USE_AITER_MHA,) if kind == "MHA" else (USE_AITER_MLA,)):
            if v in env and flags[v]:
                trace.warn(f"{v}={env[v]} has no effect without {USE_AITER}=1")


def _priorities(inp: Inputs, flags: dict, trace: Trace) -> list:
    env, arch = inp.env, inp.arch
    show = lambda v: show_flag(v, env)  # noqa: E731
    mi3xx = aiter_can_run(arch)
    where = f"{arch} is {'' if mi3xx else 'not '}MI3xx (gfx942, gfx950)"
    if inp.kind == "MLA":
        if flags[USE_AITER] and flags[USE_AITER_MLA] and mi3xx:
            order, why = ["ROCM_AITER_MLA", "TRITON_MLA"], (
                f"AITER MLA on: {show(USE_AITER)}, {show(USE_AITER_MLA)}, {where}")
        else:
            order, why = ["TRITON_MLA"], (
                f"AITER MLA off ({show(USE_AITER)}, {show(USE_AITER_MLA)}, {where})")
    else:
        order, notes = ["ROCM_ATTN"], []
        if flags[USE_AITER] and flags[USE_AITER_MHA] and mi3xx:
            order.append("ROCM_AITER_FA")
            notes.append(f"ROCM_AITER_FA: {show(USE_AITER)}, {show(USE_AITER_MHA)}, {where}")
        else:
            notes.append(f"no ROCM_AITER_FA ({show(USE_AITER)}, {show(USE_AITER_MHA)}, "
                         f"{where})")
        if mi3xx:
            order.append("ROCM_AITER_UNIFIED_ATTN")
            notes.append(f"ROCM_AITER_UNIFIED_ATTN: AITER can run on {arch}")
        elif arch in RDNA4_ARCHS and flags[USE_AITER]:
            order.insert(0, "ROCM_AITER_UNIFIED_ATTN")
            notes.append(f"ROCM_AITER_UNIFIED_ATTN first: RDNA4 with {show(USE_AITER)}")
        else:
            notes.append(f"no ROCM_AITER_UNIFIED_ATTN (AITER cannot run on {arch} here)")
        order.append("TRITON_ATTN")
        why = "; ".join(notes)
    trace.add("PRIORITY", f"order {' > '.join(order)} ({why})")
    return order


def _block_size(name: str, block_size: Optional[int], trace: Trace) -> tuple:
    if block_size is not None:
        trace.add("BLOCK", f"block size {block_size} given by the user")
        return block_size, "user"
    eff = PREFERRED_BLOCK_SIZE.get(name, DEFAULT_BLOCK_SIZE)
    why = (f"{name} prefers {eff}" if name in PREFERRED_BLOCK_SIZE else "vLLM's default")
    trace.add("BLOCK", f"no block size given: {eff} ({why})")
    return eff, "default"


def select(inp: Inputs, trace: Trace) -> tuple:
    """(backend, block size, block size source, decided_by, explicit, ignored flags)."""
    env = inp.env
    flags = parse_flags(env, READ, trace)
    _flag_warnings(env, flags, inp.kind, trace)
    name = _explicit_name(inp, trace)
    if name is not None:
        bad = reasons(name, inp)
        if bad:
            trace.fail("E-VALID", f"{name} is not valid for this configuration: "
                       f"{', '.join(bad)}", _fix(name, bad, inp))
        ignored = tuple(f"{v}={env[v]}" for v in SELECTION_FLAGS if v in env)
        for item in ignored:
            if item.split("=", 1)[0] in READ:
                trace.warn(f"{item} ignored: the explicit backend {name} wins")
        if name == "ROCM_AITER_MLA" and not aiter_can_run(inp.arch):
            trace.warn(f"vLLM 0.33 accepts ROCM_AITER_MLA on {inp.arch}, but AITER's MLA "
                       "decode kernels are built for MI3xx (gfx942, gfx950)")
        trace.add("E-WINS", f"explicit backend {name} is valid here and wins"
                  + (f"; ignored flags: {', '.join(ignored)}" if ignored else ""))
        eff, source = _block_size(name, inp.block_size, trace)
        return name, eff, source, "E-WINS", True, ignored
    failures = {}
    for candidate in _priorities(inp, flags, trace):
        bad = reasons(candidate, inp)
        if not bad:
            trace.add("PRIORITY", f"{candidate} is valid -> {candidate}")
            eff, source = _block_size(candidate, inp.block_size, trace)
            return candidate, eff, source, "PRIORITY", False, ()
        failures[candidate] = bad
        trace.add("PRIORITY", f"{candidate} not valid: {', '.join(bad)}")
    listed = "; ".join(f"{b}: {', '.join(r)}" for b, r in failures.items())
    trace.fail("NO-VALID", f"no valid attention backend for this configuration ({listed})",
               _fix(next(iter(failures)), next(iter(failures.values())), inp))


def _fix(name: str, bad: list, inp: Inputs) -> str:
    if "block_size not supported" in bad:
        return ("Use a block size that is a multiple of 16" if inp.kind == "MHA" else
                "Use a block size that is a multiple of 16, or ROCM_AITER_MLA on MI3xx "
                "(any block size)")
    if "MLA not supported" in bad or "non-MLA not supported" in bad:
        names = caps.MLA_BACKENDS if inp.kind == "MLA" else caps.MHA_BACKENDS
        return f"Use one of {', '.join(names)}"
    if "compute capability not supported" in bad:
        return f"{name} needs an MI3xx GPU (gfx942, gfx950); on {inp.arch} use ROCM_ATTN"
    return "Leave the backend unset for automatic selection, or pick one that supports it"
