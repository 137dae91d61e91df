"""What every vLLM line's policy shares: names, the result and error types, the explanation
trace, input normalisation, boolean parsing, and the misspelt-variable check."""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass
from typing import Mapping, Optional

from impl.platform import PlatformError, fp8_flavour, normalize_arch

# ---- environment variables ----------------------------------------------------------------

BACKEND_VAR = "VLLM_ATTENTION_BACKEND"
USE_AITER = "VLLM_ROCM_USE_AITER"
USE_AITER_MHA = "VLLM_ROCM_USE_AITER_MHA"
USE_AITER_UNIFIED = "VLLM_ROCM_USE_AITER_UNIFIED_ATTENTION"
USE_PREFILL_DECODE = "VLLM_V1_USE_PREFILL_DECODE_ATTENTION"
USE_AITER_MLA = "VLLM_ROCM_USE_AITER_MLA"

# The boolean flags that influenced selection in some vLLM line, with vLLM's defaults
# (research 1.2). Each line says which of them it still reads.
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
    "VLLM_BATCH_INVARIANT",
})

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
VLLM_TRUE_WORDS = ("1", "true")  # what vLLM's envs.py itself reads as true (any case)

# ---- other inputs -------------------------------------------------------------------------

KINDS = ("MHA", "MLA")
KV_CACHE_DTYPES = ("auto", "float16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2")
DTYPE_ALIASES = {
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float32": "float32", "fp32": "float32", "float": "float32",
}
DEFAULT_BLOCK_SIZE = 16  # vLLM's CacheConfig default in every modelled line
LEGACY_SUFFIX = "_VLLM_V1"

# vLLM names that exist but that this project does not model, with what to use instead.
UNMODELLED_ROCM_BACKENDS = {
    "ROCM_AITER_TRITON_MLA": "ROCM_AITER_MLA or TRITON_MLA",
    "ROCM_AITER_MLA_SPARSE": "ROCM_AITER_MLA (dense MLA)",
    "TURBOQUANT": "TRITON_ATTN (attncheck models no quantised-KV backends)",
    "ULTRAQUANT": "TRITON_ATTN (attncheck models no quantised-KV backends)",
    "ROCM_OCTAVE": "TRITON_ATTN (attncheck models no quantised-KV backends)",
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
    explicit: bool  # the backend was named (argument, attention config or env variable)
    decided_by: str  # id of the rule that chose the backend
    rules: tuple  # human-readable explanation, in order; each line starts with a rule id
    warnings: tuple = ()
    ignored_flags: tuple = ()  # "NAME=value" of selection flags ignored because explicit won
    kv_cache_dtype: str = "auto"
    kv_cache_storage: Optional[str] = None  # fp8 format on this arch, e.g. "fp8_e4m3fnuz"
    vllm_line: str = ""  # the modelled vLLM line, e.g. "0.12"
    vllm_version: str = ""  # the version asked for, e.g. "0.12.0"

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
            "vllm_line": self.vllm_line,
            "vllm_version": self.vllm_version,
        }


class Trace:
    """Collects the explanation; ``fail`` raises with everything collected so far."""

    def __init__(self):
        self.rules: list[str] = []
        self.warnings: list[str] = []

    def add(self, rule: str, text: str) -> None:
        self.rules.append(f"{rule}: {text}")

    def warn(self, text: str) -> None:
        self.warnings.append(text)

    def fail(self, rule: str, problem: str, fix: str):
        self.add(rule, f"error: {problem}")
        raise SelectionError(f"{problem}. {fix}", rule, self.rules)


@dataclass(frozen=True)
class Inputs:
    """The normalised inputs of one evaluation."""

    env: Mapping[str, str]
    backend: Optional[str]
    attention_config: Mapping
    arch: str
    kind: str
    block_size: Optional[int]  # None = not given by the user
    kv_cache_dtype: str
    dtype: Optional[str]  # None = not given (not checked)
    head_size: Optional[int]  # None = not given (not checked)


# ---- misspelt variables and names ----------------------------------------------------------


@functools.lru_cache(maxsize=1024)  # pure; the matrix test asks many times
def near_miss(name: str) -> Optional[str]:
    """The selection variable an unknown VLLM_* name was probably meant to be, or None.

    Close means at most two edits apart or a ``difflib`` similarity of 0.9.
    """
    upper = name.upper()
    if name in SELECTION_VARS or name in OTHER_KNOWN_VLLM_VARS:
        return None
    best = None
    for known in SELECTION_VARS:
        if upper == known:
            return known  # only the letter case differs (variable names are case-sensitive)
        if upper.startswith(known + "_"):
            continue  # a longer, different variable (VLLM_ROCM_USE_AITER_XYZ), not a typo
        ratio = difflib.SequenceMatcher(None, upper, known).ratio()
        edits = _edits(upper, known)
        if edits <= 2 or ratio >= 0.9:
            score = (edits, -ratio)
            if best is None or score < best[0]:
                best = (score, known)
    return None if best is None else best[1]


def _edits(a: str, b: str) -> int:
    """Edit distance counting an adjacent swap as one edit (optimal string alignment)."""
    prev2, prev = None, list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
            if prev2 is not None and i > 1 and j > 1 and a[i - 1] == b[j - 2] \
                    and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[len(b)]


@functools.lru_cache(maxsize=1024)
def closest_name(name: str, valid: tuple) -> str:
    return difflib.get_close_matches(name.upper(), valid, n=1, cutoff=0.0)[0]


def check_typos(env: Mapping[str, str], trace: Trace) -> None:
    for name in sorted(env):
        if not isinstance(name, str) or not name.upper().startswith("VLLM"):
            continue
        meant = near_miss(name)
        if meant is not None:
            msg = (f"{name} is not a variable vLLM reads, so {name}={env[name]} was "
                   f"ignored; did you mean {meant}?")
            trace.warn(msg)
            trace.add("TYPO", msg)


# ---- booleans -------------------------------------------------------------------------------

BOOL_FIX = "Use one of 1/true/yes/on or 0/false/no/off (case-insensitive), or unset it"


def _bool_problem(var: str, value: object) -> Optional[str]:
    """None when ``value`` is a boolean word, else what is wrong with it."""
    if not isinstance(value, str):
        return f"{var}={value!r}: expected a string"
    if value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return None
    return f"{var}={value!r} is not a boolean"


def parse_bool(var: str, value: object) -> bool:
    """Strict boolean (DESIGN.md rule 3): anything but 1/true/yes/on/0/false/no/off fails."""
    problem = _bool_problem(var, value)
    if problem is not None:
        raise SelectionError(f"{problem}. {BOOL_FIX}", "ENV")
    return value.strip().lower() in TRUE_WORDS


def parse_flags(env: Mapping[str, str], read: tuple, trace: Trace) -> dict:
    """Every selection flag's value (its default when unset); values are checked even for
    flags the line does not read. A word vLLM itself reads differently gets a warning."""
    flags = {}
    for var, default in SELECTION_FLAGS.items():
        if var not in env:
            flags[var] = default
            continue
        problem = _bool_problem(var, env[var])
        if problem is not None:
            trace.fail("ENV", problem, BOOL_FIX)
        flags[var] = parse_bool(var, env[var])
        word = env[var].strip().lower()
        if var in read and flags[var] and word not in VLLM_TRUE_WORDS:
            trace.warn(f"{var}={env[var]}: vLLM itself reads only 1/true as true, so it "
                       "treats this as off; attncheck reads it as on")
    set_flags = [f"{v}={env[v]}" for v in SELECTION_FLAGS if v in env]
    trace.add("ENV", "selection flags set: " + (", ".join(set_flags) if set_flags else "none"))
    return flags


def show_flag(var: str, env: Mapping[str, str]) -> str:
    if var in env:
        return f"{var}={env[var]}"
    return f"{var} unset (default {'on' if SELECTION_FLAGS[var] else 'off'})"


# ---- input normalisation --------------------------------------------------------------------


def normalize_inputs(env, backend, attention_config, arch, vendor, kind, block_size,
                     kv_cache_dtype, head_size, dtype, trace: Trace) -> Inputs:
    env = {} if env is None else env
    if attention_config is None:
        attention_config = {}
    elif not isinstance(attention_config, Mapping):
        trace.fail("INPUT", f"attention_config: expected a mapping such as "
                   f"{{'backend': 'ROCM_ATTN'}}, got {attention_config!r}",
                   "Pass a dict (the CLI takes JSON)")
    k = kind.strip().upper() if isinstance(kind, str) else None
    if k not in KINDS:
        trace.fail("INPUT", f"kind: expected 'MHA' or 'MLA', got {kind!r}",
                   "Pass kind='MLA' for DeepSeek-style latent attention, else 'MHA'")
    if vendor != "amd":
        trace.fail("INPUT", f"vendor {vendor!r}: this is vLLM's ROCm selection policy",
                   "Evaluate it for a ROCm arch (vendor='amd', arch='gfx942')")
    try:
        arch = normalize_arch(arch)
    except PlatformError as e:
        trace.fail("INPUT", str(e), "Pass one of the listed archs")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(
            block_size, int) or block_size < 1):
        trace.fail("INPUT", f"block_size: expected a positive integer, got {block_size!r}",
                   f"Leave it unset for the default ({DEFAULT_BLOCK_SIZE}) or pass e.g. 16")
    kv = kv_cache_dtype.strip().lower() if isinstance(kv_cache_dtype, str) else None
    if kv not in KV_CACHE_DTYPES:
        trace.fail("INPUT", f"kv_cache_dtype: unknown value {kv_cache_dtype!r}",
                   f"Use one of {', '.join(KV_CACHE_DTYPES)}")
    dt = None
    if dtype is not None:
        text = str(dtype).replace("torch.", "").strip().lower()
        if text not in DTYPE_ALIASES:
            trace.fail("INPUT", f"dtype: unknown model dtype {dtype!r}",
                       "Use float16, bfloat16 or float32")
        dt = DTYPE_ALIASES[text]
    if head_size is not None and (isinstance(head_size, bool) or not isinstance(
            head_size, int) or head_size < 1):
        trace.fail("INPUT", f"head_size: expected a positive integer, got {head_size!r}",
                   "Pass the model's attention head size, e.g. 128")
    trace.add("INPUT", f"{k} model on {arch}, block size "
              f"{'unset' if block_size is None else block_size}, kv cache {kv}")
    return Inputs(env, backend, attention_config, arch, k, block_size, kv, dt, head_size)


def kv_storage(kv: str, arch: str) -> Optional[str]:
    """The fp8 format an fp8 KV cache uses on ``arch`` (None for a non-fp8 cache)."""
    if kv in ("fp8", "fp8_e4m3"):
        return fp8_flavour(arch)
    if kv == "fp8_e5m2":
        return "fp8_e5m2"
    return None


def lookup_name(raw: object, source: str, valid: tuple, trace: Trace, *,
                case_note: bool = True) -> str:
    """vLLM enum name of a user-given backend name (case-insensitive), or SelectionError.

    The legacy ``_VLLM_V1`` suffix is the caller's business (it differs by line).
    """
    listed = ", ".join(valid)
    if not isinstance(raw, str):
        trace.fail("E-NAME", f"{source}: expected a backend name, got {raw!r}",
                   f"Valid names: {listed}")
    name = raw.strip().upper()
    if not name:
        trace.fail("E-NAME", f"{source} is set but empty",
                   f"Name a backend ({listed}) or unset it for automatic selection")
    if name in valid:
        if name != raw.strip() and case_note:
            trace.add("E-NAME", f"{raw.strip()!r} -> {name} (names are case-insensitive)")
        return name
    if name in UNMODELLED_ROCM_BACKENDS:
        trace.fail("E-NAME", f"{name} is a vLLM ROCm backend that attncheck does not model "
                   "(no seed document uses it)",
                   f"Use {UNMODELLED_ROCM_BACKENDS[name]}; valid names: {listed}")
    if name in NON_ROCM_BACKENDS:
        fix = NON_ROCM_BACKENDS[name]
        trace.fail("E-NAME", f"{name} is not a ROCm attention backend",
                   f"{fix[0].upper()}{fix[1:]}; valid names: {listed}")
    trace.fail("E-NAME", f"unknown attention backend {raw.strip()!r} (from {source})",
               f"Valid names: {listed}. Closest: {closest_name(name, valid)}")
