"""vLLM's ROCm attention-backend selection as a pure function, for each modelled vLLM line.

``select_backend(env, backend, arch=..., kind=..., block_size=..., vllm_version=...)`` answers
which backend vLLM uses for a configuration, with the effective block size, the chain of
rules that fired (for ``attncheck select --explain``) and warnings. An invalid configuration
raises ``SelectionError`` whose message says what is wrong and what would work. The function
never reads ``os.environ``: the caller passes the environment mapping, so the same inputs
always give the same answer.

Modelled lines (``LINES``; a version is matched with ``packaging.version``):

  0.12  the seeds' line: vLLM 0.12.x, the first release after PR #29371 (DESIGN.md
        "Selection policy"): environment variables, a fixed rule order
        (impl/selection/seeds_line.py); the default
  0.33  vLLM 0.33.x: ``--attention-backend`` / ``--attention-config``, a backend priority
        list and each backend's validation (impl/selection/line_0_33.py)

What the backends accept (dtypes, head sizes, kv-cache dtypes, block sizes) comes from
attncheck's own backends, with vLLM's facts where a line enforces others
(impl/selection/capabilities.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from impl.selection import line_0_33, seeds_line
from impl.selection.capabilities import MHA_BACKENDS, MLA_BACKENDS, VALID_BACKENDS
from impl.selection.common import (KV_CACHE_DTYPES, SELECTION_FLAGS, Selection, SelectionError,
                                   Trace, check_typos, kv_storage, near_miss,
                                   normalize_inputs, parse_bool)

__all__ = ["select_backend", "Selection", "SelectionError", "VllmLine", "LINES", "SEEDS_LINE",
           "resolve_line", "KV_CACHE_DTYPES", "SELECTION_FLAGS", "VALID_BACKENDS",
           "MHA_BACKENDS", "MLA_BACKENDS", "near_miss", "parse_bool"]


@dataclass(frozen=True)
class VllmLine:
    name: str  # "0.12"
    releases: SpecifierSet  # the vLLM versions that behave this way
    reference: str  # the release whose wheel the differential test loads
    summary: str
    select: Callable  # (Inputs, Trace) -> (backend, block, source, decided_by, explicit, ignored)


SEEDS_LINE = VllmLine("0.12", SpecifierSet(">=0.12.0,<0.13.0"), "0.12.0",
                      "the seeds' line (PR #26980 + #29371): environment variables, fixed "
                      "rule order", seeds_line.select)
LINES = (SEEDS_LINE,
         VllmLine("0.33", SpecifierSet(">=0.33.0,<0.34.0"), "0.33.0",
                  "--attention-backend, backend priority list with per-backend validation",
                  line_0_33.select))


def resolve_line(version=None) -> tuple:
    """(VllmLine, version text) for a vLLM version (str or ``packaging`` Version).

    None means the seeds' line. A version outside every modelled line is a SelectionError.
    """
    if version is None:
        return SEEDS_LINE, SEEDS_LINE.reference
    try:
        parsed = version if isinstance(version, Version) else Version(str(version).strip())
    except InvalidVersion:
        raise SelectionError(f"vllm_version: {version!r} is not a version number. Use e.g. "
                             f"{' or '.join(line.reference for line in LINES)}",
                             "VERSION") from None
    for line in LINES:
        if line.releases.contains(parsed, prereleases=True):
            return line, str(parsed)
    modelled = ", ".join(f"{line.name}.x ({line.releases})" for line in LINES)
    raise SelectionError(f"vLLM {parsed} is not modelled (modelled lines: {modelled}). "
                         f"Pass one of them, e.g. {LINES[-1].reference}", "VERSION")


def select_backend(env: Optional[Mapping[str, str]] = None, backend: Optional[str] = None, *,
                   arch: str = "gfx942", vendor: str = "amd", kind: str = "MHA",
                   block_size: Optional[int] = None, kv_cache_dtype: str = "auto",
                   head_size: Optional[int] = None, dtype=None, vllm_version=None,
                   attention_config: Optional[Mapping] = None) -> Selection:
    """Which attention backend vLLM on ROCm selects; see the module docstring.

    ``env``: the environment (only VLLM_* names matter; never read from the process here);
    ``backend``: an explicit backend name (wins over VLLM_ATTENTION_BACKEND; in 0.33 it is
    ``--attention-backend``); ``attention_config``: vLLM 0.33's ``--attention-config``
    (its "backend" key); ``block_size`` None = not given by the user (the line's default
    applies); ``head_size`` / ``dtype`` None = not checked; ``vllm_version``: which vLLM
    line to evaluate (None = the seeds' line). Raises ``SelectionError``.
    """
    line, version = resolve_line(vllm_version)
    trace = Trace()
    trace.add("VERSION", f"vLLM {version}: line {line.name} ({line.summary})")
    inp = normalize_inputs(env, backend, attention_config, arch, vendor, kind, block_size,
                           kv_cache_dtype, head_size, dtype, trace)
    check_typos(inp.env, trace)
    name, eff, bs_source, decided_by, explicit, ignored = line.select(inp, trace)
    return Selection(
        backend=name, block_size=eff, block_size_source=bs_source, kind=inp.kind,
        arch=inp.arch, explicit=explicit, decided_by=decided_by, rules=tuple(trace.rules),
        warnings=tuple(trace.warnings), ignored_flags=ignored,
        kv_cache_dtype=inp.kv_cache_dtype, kv_cache_storage=kv_storage(inp.kv_cache_dtype,
                                                                       inp.arch),
        vllm_line=line.name, vllm_version=version)
