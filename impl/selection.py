"""vLLM's ROCm attention-backend selection policy as a pure function (DESIGN.md "Selection policy").

``select_backend(env, backend, arch=..., kind=..., block_size=...)`` answers which backend
vLLM (late 2025: after PR #26980 and the FLEX_ATTENTION fix #29371) uses for a configuration,
with the effective block size, the chain of rules that fired (for ``attncheck select
--explain``) and warnings. An invalid configuration raises ``SelectionError`` whose message
says what is wrong and what would work. The function never reads ``os.environ``; the caller
passes the environment mapping, so the same inputs always give the same answer.

Rule ids (each explanation line starts with one; ``Selection.decided_by`` names the deciding
one):

  ENV       parse the selection flags (1/true/yes/on, 0/false/no/off; anything else is an error)
  TYPO      an unknown VLLM_* variable close to a known one -> "did you mean" warning
  E-SOURCE  where the explicit backend came from (argument > VLLM_ATTENTION_BACKEND)
  E-NAME    name lookup: case-insensitive, legacy ``_VLLM_V1`` suffix accepted with a note
  E-WINS    an explicit backend wins; the selection flags that are set are ignored (named)
  E-KIND    MLA model with a non-MLA backend, or the reverse -> error
  E-ARCH    ROCM_AITER_FA / ROCM_AITER_MLA need gfx9 (gfx90a, gfx942, gfx950)
  P1, P2, P3, DEFAULT        automatic MHA choice
  MLA-AITER, MLA-TRITON, MLA-SMALL-BLOCK   automatic MLA choice
  BLOCK     effective block size (user's, or the default) and the backend's block-size rule
  CAPS      dtype / head size / kv-cache dtype checks of the chosen backend

Choices this module makes where DESIGN.md is silent (documented in docs/selection.md):
  * Default block size follows the chosen backend: 64 for ROCM_AITER_UNIFIED_ATTN (its
    preferred size; vLLM #30432 set 64 when VLLM_ROCM_USE_AITER=1 and
    VLLM_ROCM_USE_AITER_UNIFIED_ATTENTION=1, which is exactly when auto mode picks it; #37606
    made it follow the backend for explicit selection too), 16 for everything else.
    So flags never change the block size of an explicitly selected backend.
  * MHA backends need a block size that is a multiple of 16 (their vLLM kernel block sizes).
  * ROCM_AITER_MLA explicitly selected off gfx9 is an error (AITER's MLA decode is gfx9 ASM).
  * ROCM_AITER_TRITON_MLA / ROCM_AITER_MLA_SPARSE are recognised vLLM names that this project
    does not model: selecting them is an error that says so. CUDA-only vLLM names
    (FLASH_ATTN, FLASHINFER, ...) get an error that points to the ROCm equivalents.
  * Sub-flags set without ``VLLM_ROCM_USE_AITER=1`` produce a "has no effect" warning.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass
from typing import Mapping, Optional

from impl.platform import GFX9_ARCHS, PlatformError, fp8_flavour, normalize_arch

# ---- names --------------------------------------------------------------------------------

MHA_BACKENDS = ("TRITON_ATTN", "ROCM_ATTN", "ROCM_AITER_FA", "ROCM_AITER_UNIFIED_ATTN",
                "FLEX_ATTENTION")
MLA_BACKENDS = ("TRITON_MLA", "ROCM_AITER_MLA")
VALID_BACKENDS = MHA_BACKENDS + MLA_BACKENDS

# vLLM names that exist but that this project does not model, with what to use instead.
UNMODELLED_ROCM_BACKENDS = {
    "ROCM_AITER_TRITON_MLA": "ROCM_AITER_MLA or TRITON_MLA",
    "ROCM_AITER_MLA_SPARSE": "ROCM_AITER_MLA (dense MLA)",
}
NON_ROCM_BACKENDS = {
    "FLASH_ATTN": "on ROCm, AITER's flash attention is ROCM_AITER_FA",
    "FLASHINFER": "use TRITON_ATTN or ROCM_ATTN",
    "XFORMERS": "XFORMERS was removed from vLLM; use TRITON_ATTN",
    "TREE_ATTN": "use TRITON_ATTN",
    "TORCH_SDPA": "use TRITON_ATTN",
    "FLASHMLA": "use ROCM_AITER_MLA or TRITON_MLA",
    "FLASH_ATTN_MLA": "use ROCM_AITER_MLA or TRITON_MLA",
    "FLASHINFER_MLA": "use ROCM_AITER_MLA or TRITON_MLA",
    "CUTLASS_MLA": "use ROCM_AITER_MLA or TRITON_MLA",
}

LEGACY_SUFFIX = "_VLLM_V1"

# ---- environment variables ----------------------------------------------------------------

BACKEND_VAR = "VLLM_ATTENTION_BACKEND"
USE_AITER = "VLLM_ROCM_USE_AITER"
USE_AITER_MHA = "VLLM_ROCM_USE_AITER_MHA"
USE_AITER_UNIFIED = "VLLM_ROCM_USE_AITER_UNIFIED_ATTENTION"
USE_PREFILL_DECODE = "VLLM_V1_USE_PREFILL_DECODE_ATTENTION"
USE_AITER_MLA = "VLLM_ROCM_USE_AITER_MLA"

# The boolean flags that influence selection, with vLLM's defaults (research 1.2).
SELECTION_FLAGS = {
    USE_AITER: False,
    USE_AITER_MHA: True,
    USE_AITER_UNIFIED: False,
    USE_PREFILL_DECODE: False,
    USE_AITER_MLA: True,
}
SELECTION_VARS = (BACKEND_VAR,) + tuple(SELECTION_FLAGS)

# Other real vLLM variables: never reported as typos of a selection variable, however close
# (VLLM_ROCM_USE_AITER_MOE is one letter pair away from VLLM_ROCM_USE_AITER_MHA).
OTHER_KNOWN_VLLM_VARS = frozenset({
    "VLLM_ROCM_USE_AITER_PAGED_ATTN", "VLLM_ROCM_USE_AITER_LINEAR", "VLLM_ROCM_USE_AITER_MOE",
    "VLLM_ROCM_USE_AITER_RMSNORM", "VLLM_ROCM_USE_AITER_FP8BMM",
    "VLLM_ROCM_USE_AITER_FP4_ASM_GEMM", "VLLM_ROCM_USE_AITER_TRITON_ROPE",
    "VLLM_ROCM_USE_AITER_TRITON_GEMM", "VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS",
    "VLLM_ROCM_USE_SKINNY_GEMM", "VLLM_ROCM_FP8_PADDING", "VLLM_ROCM_MOE_PADDING",
    "VLLM_ROCM_CUSTOM_PAGED_ATTN", "VLLM_ROCM_FP8_MFMA_PAGE_ATTN",
    "VLLM_ROCM_QUICK_REDUCE_QUANTIZATION", "VLLM_ROCM_SHUFFLE_KV_CACHE_LAYOUT",
    "VLLM_ROCM_USE_TRITON_ROPE", "VLLM_USE_V1", "VLLM_USE_TRITON_FLASH_ATTN",
    "VLLM_FLASH_ATTN_VERSION", "VLLM_LOGGING_LEVEL", "VLLM_CONFIGURE_LOGGING",
    "VLLM_TARGET_DEVICE", "VLLM_HOST_IP", "VLLM_PORT", "VLLM_CACHE_ROOT", "VLLM_CONFIG_ROOT",
    "VLLM_WORKER_MULTIPROC_METHOD", "VLLM_USE_MODELSCOPE", "VLLM_ENABLE_V1_MULTIPROCESSING",
    "VLLM_USE_PRECOMPILED", "VLLM_ALLOW_LONG_MAX_MODEL_LEN", "VLLM_TORCH_PROFILER_DIR",
    "VLLM_USE_DEEP_GEMM", "VLLM_MLA_DISABLE", "VLLM_API_KEY", "VLLM_NO_USAGE_STATS",
})

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")

# ---- other inputs -------------------------------------------------------------------------

KINDS = ("MHA", "MLA")
KV_CACHE_DTYPES = ("auto", "float16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2")
DTYPE_ALIASES = {
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float32": "float32", "fp32": "float32", "float": "float32",
}
DEFAULT_BLOCK_SIZE = 16
PREFERRED_BLOCK_SIZE = {"ROCM_AITER_UNIFIED_ATTN": 64}
MHA_BLOCK_MULTIPLE = 16
TRITON_MLA_MIN_BLOCK = 16
FP32_UNSUPPORTED = ("ROCM_AITER_FA", "TRITON_MLA", "ROCM_AITER_MLA")
AITER_FA_HEAD_SIZES = (64, 128, 256)
NEEDS_GFX9 = ("ROCM_AITER_FA", "ROCM_AITER_MLA")


class SelectionError(ValueError):
    """An invalid configuration. The message says what is wrong and what would work.

    ``rule`` is the id of the rule that rejected it, ``rules`` the explanation so far.
    """

    def __init__(self, message: str, rule: str, rules: tuple = ()):
        super().__init__(message)
        self.rule = rule
        self.rules = tuple(rules)


@dataclass(frozen=True)
class Selection:
    backend: str
    block_size: int
    block_size_source: str  # "user" or "default"
    kind: str
    arch: str
    explicit: bool  # the backend was named (argument or VLLM_ATTENTION_BACKEND)
    decided_by: str  # id of the rule that chose the backend
    rules: tuple  # human-readable explanation, in order; each line starts with a rule id
    warnings: tuple = ()
    ignored_flags: tuple = ()  # "NAME=value" of selection flags ignored because explicit won
    kv_cache_dtype: str = "auto"
    kv_cache_storage: Optional[str] = None  # fp8 format on this arch, e.g. "fp8_e4m3fnuz"

    def to_dict(self) -> dict:
        return {
            "backend": self.backend,
            "block_size": self.block_size,
            "block_size_source": self.block_size_source,
            "kind": self.kind,
            "arch": self.arch,
            "explicit": self.explicit,
            "decided_by": self.decided_by,
            "rules": list(self.rules),
            "warnings": list(self.warnings),
            "ignored_flags": list(self.ignored_flags),
            "kv_cache_dtype": self.kv_cache_dtype,
            "kv_cache_storage": self.kv_cache_storage,
        }


# ---- small helpers --------------------------------------------------------------------------


class _Trace:
    """Collects the explanation; ``fail`` raises with everything collected so far."""

    def __init__(self):
        self.rules: list[str] = []
        self.warnings: list[str] = []

    def add(self, rule: str, text: str) -> None:
        self.rules.append(f"{rule}: {text}")

    def fail(self, rule: str, problem: str, fix: str):
        self.add(rule, f"error: {problem}")
        raise SelectionError(f"{problem}. {fix}", rule, self.rules)


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance with adjacent transpositions (optimal string alignment)."""
    prev2, prev = None, list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if (prev2 is not None and i > 1 and j > 1 and a[i - 1] == b[j - 2]
                    and a[i - 2] == b[j - 1]):
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[len(b)]


@functools.lru_cache(maxsize=1024)  # pure; the matrix test asks many times
def near_miss(name: str) -> Optional[str]:
    """The selection variable an unknown VLLM_* name was probably meant to be, or None."""
    upper = name.upper()
    if name in SELECTION_VARS or name in OTHER_KNOWN_VLLM_VARS:
        return None
    best = None
    for known in SELECTION_VARS:
        if upper == known:
            return known  # only the letter case differs (variable names are case-sensitive)
        if upper.startswith(known + "_"):
            continue  # a longer, different variable (VLLM_ROCM_USE_AITER_XYZ), not a typo
        dist = _edit_distance(upper, known)
        ratio = difflib.SequenceMatcher(None, upper, known).ratio()
        if dist <= 2 or ratio >= 0.9:
            score = (dist, -ratio)
            if best is None or score < best[0]:
                best = (score, known)
    return None if best is None else best[1]


@functools.lru_cache(maxsize=1024)
def closest_backend(name: str) -> str:
    return difflib.get_close_matches(name.upper(), VALID_BACKENDS, n=1, cutoff=0.0)[0]


def _bool_problem(var: str, value: object) -> Optional[str]:
    """None when ``value`` is a boolean word, else what is wrong with it."""
    if not isinstance(value, str):
        return f"{var}={value!r}: expected a string"
    if value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return None
    return f"{var}={value!r} is not a boolean"


BOOL_FIX = "Use one of 1/true/yes/on or 0/false/no/off (case-insensitive), or unset it"


def parse_bool(var: str, value: object) -> bool:
    """vLLM-style boolean, strict: anything but 1/true/yes/on/0/false/no/off is an error."""
    problem = _bool_problem(var, value)
    if problem is not None:
        raise SelectionError(f"{problem}. {BOOL_FIX}", "ENV")
    return value.strip().lower() in TRUE_WORDS


def _show_flag(var: str, env: Mapping[str, str], flags: dict) -> str:
    if var in env:
        return f"{var}={env[var]}"
    return f"{var} unset (default {'on' if SELECTION_FLAGS[var] else 'off'})"


# ---- input normalisation --------------------------------------------------------------------


def _parse_flags(env: Mapping[str, str], trace: _Trace) -> dict:
    flags = {}
    for var, default in SELECTION_FLAGS.items():
        if var in env:
            problem = _bool_problem(var, env[var])
            if problem is not None:
                trace.fail("ENV", problem, BOOL_FIX)
            flags[var] = parse_bool(var, env[var])
        else:
            flags[var] = default
    set_flags = [f"{v}={env[v]}" for v in SELECTION_FLAGS if v in env]
    trace.add("ENV", "selection flags set: " + (", ".join(set_flags) if set_flags else "none"))
    return flags


def _check_typos(env: Mapping[str, str], trace: _Trace) -> None:
    for name in sorted(env):
        if not isinstance(name, str) or not name.upper().startswith("VLLM"):
            continue
        meant = near_miss(name)
        if meant is not None:
            msg = (f"{name} is not a variable vLLM reads, so {name}={env[name]} was "
                   f"ignored; did you mean {meant}?")
            trace.warnings.append(msg)
            trace.add("TYPO", msg)


def _normalize_kind(kind: object, trace: _Trace) -> str:
    k = kind.strip().upper() if isinstance(kind, str) else None
    if k not in KINDS:
        trace.fail("INPUT", f"kind: expected 'MHA' or 'MLA', got {kind!r}",
                   "Pass kind='MLA' for DeepSeek-style latent attention, else 'MHA'")
    return k


def _normalize_arch(arch: object, vendor: str, trace: _Trace) -> str:
    if vendor != "amd":
        trace.fail("INPUT", f"vendor {vendor!r}: this is vLLM's ROCm selection policy",
                   "Evaluate it for a ROCm arch (vendor='amd', arch='gfx942')")
    try:
        return normalize_arch(arch)
    except PlatformError as e:
        problem = str(e)
    trace.fail("INPUT", problem, "Pass one of the listed archs")


def _normalize_block_size(block_size: object, trace: _Trace) -> Optional[int]:
    if block_size is None:
        return None
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        trace.fail("INPUT", f"block_size: expected a positive integer, got {block_size!r}",
                   f"Leave it unset for the default ({DEFAULT_BLOCK_SIZE}) or pass e.g. 16")
    return block_size


def _normalize_kv_dtype(kv: object, trace: _Trace) -> str:
    k = kv.strip().lower() if isinstance(kv, str) else None
    if k not in KV_CACHE_DTYPES:
        trace.fail("INPUT", f"kv_cache_dtype: unknown value {kv!r}",
                   f"Use one of {', '.join(KV_CACHE_DTYPES)}")
    return k


def _normalize_dtype(dtype: object, trace: _Trace) -> Optional[str]:
    if dtype is None:
        return None
    text = str(dtype).replace("torch.", "").strip().lower()
    if text not in DTYPE_ALIASES:
        trace.fail("INPUT", f"dtype: unknown model dtype {dtype!r}",
                   "Use float16, bfloat16 or float32")
    return DTYPE_ALIASES[text]


def _normalize_head_size(head_size: object, trace: _Trace) -> Optional[int]:
    if head_size is None:
        return None
    if isinstance(head_size, bool) or not isinstance(head_size, int) or head_size < 1:
        trace.fail("INPUT", f"head_size: expected a positive integer, got {head_size!r}",
                   "Pass the model's attention head size, e.g. 128")
    return head_size


# ---- the explicit path ----------------------------------------------------------------------


def _explicit_name(env: Mapping[str, str], backend: Optional[str], trace: _Trace):
    """(raw name, where it came from) or (None, None) when no backend was named."""
    from_env = env.get(BACKEND_VAR)
    if backend is not None:
        if from_env is not None and from_env.strip().upper() != str(backend).strip().upper():
            msg = (f"{BACKEND_VAR}={from_env} ignored: the backend argument "
                   f"{backend!r} takes precedence")
            trace.warnings.append(msg)
        trace.add("E-SOURCE", f"explicit backend {backend!r} from the backend argument")
        return backend, "the backend argument"
    if from_env is not None:
        trace.add("E-SOURCE", f"explicit backend {from_env!r} from {BACKEND_VAR}")
        return from_env, BACKEND_VAR
    trace.add("E-SOURCE", f"no explicit backend (no argument, {BACKEND_VAR} unset): automatic")
    return None, None


def resolve_name(raw: object, source: str, trace: _Trace) -> str:
    """vLLM enum name of a user-given backend name, or SelectionError."""
    valid = ", ".join(VALID_BACKENDS)
    if not isinstance(raw, str):
        trace.fail("E-NAME", f"{source}: expected a backend name, got {raw!r}",
                   f"Valid names: {valid}")
    name = raw.strip().upper()
    if not name:
        trace.fail("E-NAME", f"{source} is set but empty",
                   f"Name a backend ({valid}) or unset it for automatic selection")
    if name.endswith(LEGACY_SUFFIX) and name != LEGACY_SUFFIX:
        stripped = name[: -len(LEGACY_SUFFIX)]
        msg = (f"backend name {raw.strip()!r}: the {LEGACY_SUFFIX} suffix is deprecated; "
               f"use {stripped}")
        trace.warnings.append(msg)
        trace.add("E-NAME", msg)
        name = stripped
    if name in VALID_BACKENDS:
        if name != raw.strip():
            trace.add("E-NAME", f"{raw.strip()!r} -> {name} (names are case-insensitive)")
        return name
    if name in UNMODELLED_ROCM_BACKENDS:
        trace.fail("E-NAME", f"{name} is a vLLM ROCm backend that attncheck does not model "
                   "(no seed document uses it)",
                   f"Use {UNMODELLED_ROCM_BACKENDS[name]}; valid names: {valid}")
    if name in NON_ROCM_BACKENDS:
        trace.fail("E-NAME", f"{name} is not a ROCm attention backend",
                   f"{NON_ROCM_BACKENDS[name][0].upper()}{NON_ROCM_BACKENDS[name][1:]}; "
                   f"valid names: {valid}")
    trace.fail("E-NAME", f"unknown attention backend {raw.strip()!r} (from {source})",
               f"Valid names: {valid}. Closest: {closest_backend(name)}")


def _ignore_flags(env: Mapping[str, str], name: str, trace: _Trace) -> tuple:
    ignored = tuple(f"{v}={env[v]}" for v in SELECTION_FLAGS if v in env)
    for item in ignored:
        trace.warnings.append(f"{item} ignored: the explicit backend {name} wins")
    trace.add("E-WINS", f"explicit backend {name} wins"
              + (f"; ignored flags: {', '.join(ignored)}" if ignored else ""))
    return ignored


def _check_explicit(name: str, kind: str, arch: str, trace: _Trace) -> None:
    if kind == "MLA" and name not in MLA_BACKENDS:
        trace.fail("E-KIND", f"{name} is not an MLA backend but the model uses MLA",
                   f"Use {' or '.join(MLA_BACKENDS)}")
    if kind == "MHA" and name in MLA_BACKENDS:
        trace.fail("E-KIND", f"{name} is an MLA backend but the model is not MLA",
                   f"Use one of {', '.join(MHA_BACKENDS)}")
    trace.add("E-KIND", f"{name} matches the model's attention kind ({kind})")
    if name in NEEDS_GFX9:
        if arch not in GFX9_ARCHS:
            other = ("TRITON_ATTN, ROCM_ATTN or ROCM_AITER_UNIFIED_ATTN" if kind == "MHA"
                     else "TRITON_MLA (block size >= 16)")
            trace.fail("E-ARCH", f"{name} is only supported on gfx9 GPUs "
                       f"({', '.join(GFX9_ARCHS)}), not {arch}", f"On {arch} use {other}")
        trace.add("E-ARCH", f"{name} needs gfx9: {arch} is gfx9")


# ---- the automatic path ---------------------------------------------------------------------


def _auto_mha(env, flags, arch, trace: _Trace) -> tuple:
    aiter, mha = flags[USE_AITER], flags[USE_AITER_MHA]
    unified, pd = flags[USE_AITER_UNIFIED], flags[USE_PREFILL_DECODE]
    show = lambda v: _show_flag(v, env, flags)  # noqa: E731
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


def _auto_mla(env, flags, arch, block_size: Optional[int], trace: _Trace) -> tuple:
    aiter, mla = flags[USE_AITER], flags[USE_AITER_MLA]
    show = lambda v: _show_flag(v, env, flags)  # noqa: E731
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
            trace.warnings.append(
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


def _warn_inert_subflags(env, flags, kind: str, trace: _Trace) -> None:
    if flags[USE_AITER]:
        return
    subs = (USE_AITER_MHA, USE_AITER_UNIFIED) if kind == "MHA" else (USE_AITER_MLA,)
    for v in subs:
        if v in env and flags[v]:
            trace.warnings.append(f"{v}={env[v]} has no effect without {USE_AITER}=1")


# ---- block size and capabilities ------------------------------------------------------------


def _block_size(name: str, kind: str, block_size: Optional[int], trace: _Trace) -> tuple:
    if block_size is None:
        eff, source = PREFERRED_BLOCK_SIZE.get(name, DEFAULT_BLOCK_SIZE), "default"
        why = (f"{name} prefers {eff}" if name in PREFERRED_BLOCK_SIZE
               else "vLLM's default")
        trace.add("BLOCK", f"no block size given: {eff} ({why})")
    else:
        eff, source = block_size, "user"
        trace.add("BLOCK", f"block size {eff} given by the user")
    if kind == "MHA" and eff % MHA_BLOCK_MULTIPLE:
        trace.fail("BLOCK", f"{name} needs a block size that is a multiple of "
                   f"{MHA_BLOCK_MULTIPLE}, got {eff}",
                   f"Use --block-size 16 (or 32, 64, ...); block size 1 is only for MLA "
                   "models (ROCM_AITER_MLA)")
    if name == "TRITON_MLA" and eff < TRITON_MLA_MIN_BLOCK:
        trace.fail("BLOCK", f"TRITON_MLA needs block size >= {TRITON_MLA_MIN_BLOCK}, "
                   f"got {eff}",
                   f"Use ROCM_AITER_MLA for block size {eff} (gfx9), or block size "
                   f"{DEFAULT_BLOCK_SIZE} with TRITON_MLA")
    return eff, source


def _check_caps(name: str, dtype, head_size, kv: str, trace: _Trace) -> None:
    if dtype == "float32" and name in FP32_UNSUPPORTED:
        trace.fail("CAPS", f"{name} does not support float32 models",
                   "Use float16 or bfloat16, or TRITON_ATTN/ROCM_ATTN for float32")
    if name == "ROCM_AITER_FA" and head_size is not None and head_size not in \
            AITER_FA_HEAD_SIZES:
        trace.fail("CAPS", f"ROCM_AITER_FA does not support head size {head_size} "
                   f"(supports {', '.join(map(str, AITER_FA_HEAD_SIZES))})",
                   "Use TRITON_ATTN or ROCM_ATTN for this head size")
    if name == "FLEX_ATTENTION" and kv.startswith("fp8"):
        trace.fail("CAPS", f"FLEX_ATTENTION does not support kv_cache_dtype {kv}",
                   "Use kv_cache_dtype auto, or TRITON_ATTN / ROCM_ATTN for an fp8 KV cache")


def _kv_storage(kv: str, arch: str) -> Optional[str]:
    if kv in ("fp8", "fp8_e4m3"):
        return fp8_flavour(arch)
    if kv == "fp8_e5m2":
        return "fp8_e5m2"
    return None


# ---- the policy -----------------------------------------------------------------------------


def select_backend(env: Optional[Mapping[str, str]] = None, backend: Optional[str] = None, *,
                   arch: str = "gfx942", vendor: str = "amd", kind: str = "MHA",
                   block_size: Optional[int] = None, kv_cache_dtype: str = "auto",
                   head_size: Optional[int] = None, dtype=None) -> Selection:
    """Which attention backend vLLM on ROCm selects; see the module docstring for the rules.

    ``env``: the environment (only VLLM_* names matter; never read from the process here);
    ``backend``: an explicit backend name (takes precedence over VLLM_ATTENTION_BACKEND);
    ``block_size`` None = not given by the user (the default is then chosen per backend).
    Raises ``SelectionError`` for an invalid configuration.
    """
    env = {} if env is None else env
    trace = _Trace()
    kind = _normalize_kind(kind, trace)
    arch = _normalize_arch(arch, vendor, trace)
    block_size = _normalize_block_size(block_size, trace)
    kv = _normalize_kv_dtype(kv_cache_dtype, trace)
    dt = _normalize_dtype(dtype, trace)
    hs = _normalize_head_size(head_size, trace)
    trace.add("INPUT", f"{kind} model on {arch}, block size "
              f"{'unset' if block_size is None else block_size}, kv cache {kv}")
    _check_typos(env, trace)
    flags = _parse_flags(env, trace)

    raw, source = _explicit_name(env, backend, trace)
    ignored: tuple = ()
    if raw is not None:
        name = resolve_name(raw, source, trace)
        ignored = _ignore_flags(env, name, trace)
        _check_explicit(name, kind, arch, trace)
        decided_by = "E-WINS"
    else:
        _warn_inert_subflags(env, flags, kind, trace)
        if kind == "MHA":
            name, decided_by = _auto_mha(env, flags, arch, trace)
        else:
            name, decided_by = _auto_mla(env, flags, arch, block_size, trace)
    eff, bs_source = _block_size(name, kind, block_size, trace)
    _check_caps(name, dt, hs, kv, trace)
    return Selection(
        backend=name, block_size=eff, block_size_source=bs_source, kind=kind, arch=arch,
        explicit=raw is not None, decided_by=decided_by, rules=tuple(trace.rules),
        warnings=tuple(trace.warnings), ignored_flags=ignored, kv_cache_dtype=kv,
        kv_cache_storage=_kv_storage(kv, arch))
