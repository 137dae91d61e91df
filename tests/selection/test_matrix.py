"""The exhaustive matrix: every combination of the selection flags (unset/0/1), explicit
backend (none, every name, an invalid one), arch, attention kind and block size, for every
modelled vLLM line.

Checked against the policy's invariants here (planted bugs prove each check catches what it
claims to) and against vLLM's own selector in test_differential.py.
"""

from __future__ import annotations

import pytest

from impl.selection import seeds_line
from impl.selection import LINES, SEEDS_LINE, VALID_BACKENDS, SelectionError
from tests.selection.helpers import (AITER, ARCHS, BLOCKS, EXPLICIT_CHOICES, GFX9, KINDS,
                                     compute_matrix, describe, env_of, evaluate, matrix_keys,
                                     report)

pytestmark = pytest.mark.smoke


def v_explicit_wins_or_errors(results) -> list:
    out = []
    for key, res in results.items():
        explicit = key[1]
        if explicit is None or isinstance(res, SelectionError):
            continue
        if res.backend != explicit or not res.explicit or res.decided_by != "E-WINS":
            out.append(f"{describe(key)}: explicit {explicit} lost to {res.backend} "
                       f"({res.decided_by})")
    return out


def _outcome(res):
    if isinstance(res, SelectionError):
        return ("error", res.rule, str(res))
    return ("ok", res.backend, res.block_size)


def v_flags_never_override_explicit(results) -> list:
    """For an explicit backend, the outcome must not depend on the flags at all."""
    groups: dict = {}
    for key, res in results.items():
        if key[1] is None:
            continue
        groups.setdefault(key[1:], {}).setdefault(_outcome(res), []).append(key)
    out = []
    for rest, outcomes in groups.items():
        if len(outcomes) > 1:
            shown = "; ".join(f"{o[:2]} e.g. {describe(ks[0])}" for o, ks in outcomes.items())
            out.append(f"explicit {rest}: outcome depends on the flags: {shown}")
    return out


def v_ignored_flags_named(results) -> list:
    out = []
    for key, res in results.items():
        if isinstance(res, SelectionError):
            continue
        set_flags = {f"{k}={v}" for k, v in env_of(key[0]).items()}
        want = set_flags if key[1] is not None else set()
        if set(res.ignored_flags) != want:
            out.append(f"{describe(key)}: ignored_flags {res.ignored_flags}, expected "
                       f"{sorted(want)}")
        for item in want:
            if not any(item in w and "ignored" in w for w in res.warnings):
                out.append(f"{describe(key)}: no warning says {item} was ignored")
    return out


def v_no_aiter_fa_mla_off_gfx9(results) -> list:
    out = []
    for key, res in results.items():
        arch = key[2]
        if arch in GFX9:
            continue
        if not isinstance(res, SelectionError) and res.backend in ("ROCM_AITER_FA",
                                                                   "ROCM_AITER_MLA"):
            how = "auto-selected" if key[1] is None else "accepted"
            out.append(f"{describe(key)}: {res.backend} {how} on non-gfx9 {arch}")
    return out


def v_explanation_names_deciding_rule(results) -> list:
    out = []
    for key, res in results.items():
        if isinstance(res, SelectionError):
            msg = str(res)
            if not res.rule or not res.rules or not res.rules[-1].startswith(res.rule + ": "):
                out.append(f"{describe(key)}: error's rule chain does not end in {res.rule}")
            if msg.count(". ") < 1 or len(msg.split(". ", 1)[1]) < 10:
                out.append(f"{describe(key)}: error message has no fix: {msg!r}")
            continue
        deciding = [r for r in res.rules if r.startswith(res.decided_by + ": ")
                    and res.backend in r]
        if not deciding:
            out.append(f"{describe(key)}: no rule line '{res.decided_by}: ...{res.backend}'")
        if not any(r.startswith("BLOCK: ") and str(res.block_size) in r for r in res.rules):
            out.append(f"{describe(key)}: no BLOCK line for block size {res.block_size}")
    return out


# Invariants of every line; v_no_aiter_fa_mla_off_gfx9 only of the seeds' line (vLLM 0.33
# accepts a named ROCM_AITER_MLA on any GPU, and the 0.33 line follows it with a warning).
INVARIANTS = [v_explicit_wins_or_errors, v_flags_never_override_explicit,
              v_ignored_flags_named, v_explanation_names_deciding_rule]
LINE_NAMES = [line.name for line in LINES]
_MATRICES: dict = {}


@pytest.fixture(params=LINE_NAMES, ids=lambda name: f"vllm-{name}")
def matrix(request):
    """(line name, {key: outcome}), computed once per line."""
    name = request.param
    if name not in _MATRICES:
        version = next(line.reference for line in LINES if line.name == name)
        _MATRICES[name] = compute_matrix(matrix_keys(), vllm_version=version)
    return name, _MATRICES[name]


def test_matrix_size_and_both_outcomes(matrix):
    _, results = matrix
    assert len(results) == (3 ** 5 * len(EXPLICIT_CHOICES) * len(ARCHS) * len(KINDS)
                            * len(BLOCKS))
    errors = sum(isinstance(r, SelectionError) for r in results.values())
    assert 0 < errors < len(results)
    chosen = {r.backend for r in results.values() if not isinstance(r, SelectionError)}
    assert chosen == set(VALID_BACKENDS)  # every backend is reachable


@pytest.mark.parametrize("check", INVARIANTS, ids=lambda f: f.__name__[2:])
def test_matrix_invariant(matrix, check):
    violations = check(matrix[1])
    assert not violations, report(violations)


def test_seeds_line_never_takes_aiter_fa_or_mla_off_gfx9():
    results = _MATRICES.get(SEEDS_LINE.name) or compute_matrix(matrix_keys())
    violations = v_no_aiter_fa_mla_off_gfx9(results)
    assert not violations, report(violations)


def test_matrix_is_deterministic(matrix):
    """Recompute (every 5th key, in reverse order): same outcome, rules and warnings."""
    name, results = matrix
    version = next(line.reference for line in LINES if line.name == name)
    diffs = []
    for key in reversed(list(results)[::5]):
        a, b = results[key], evaluate(key, vllm_version=version)
        same = ((str(a), a.rule, a.rules) == (str(b), b.rule, b.rules)
                if isinstance(a, SelectionError) and isinstance(b, SelectionError)
                else not isinstance(a, SelectionError) and not isinstance(b, SelectionError)
                and a.to_dict() == b.to_dict())
        if not same:
            diffs.append(describe(key))
    assert not diffs, report(diffs)


def test_auto_mode_reaches_every_priority_rule(matrix):
    name, results = matrix
    rules = {r.decided_by for k, r in results.items()
             if k[1] is None and not isinstance(r, SelectionError)}
    assert rules == ({"P1", "P2", "P3", "DEFAULT", "MLA-AITER", "MLA-TRITON", "MLA-SMALL-BLOCK"}
                     if name == SEEDS_LINE.name else {"PRIORITY"})


# -- planted bugs: each invariant check must catch the bug it is for --------------------------

SMALL_KEYS = dict(flag_values=(None, "1"), explicit=(None, "TRITON_ATTN", "ROCM_ATTN",
                  "ROCM_AITER_FA", "TRITON_MLA"), archs=("gfx942", "gfx1100"),
                  kinds=KINDS, blocks=(None, 1, 16))


def test_planted_flags_override_explicit_is_caught(monkeypatch):
    """The pre-PR-26980 bug: VLLM_ROCM_USE_AITER=1 overrode an explicit backend."""
    real = seeds_line._explicit_name

    def buggy(env, backend, trace):
        if env.get(AITER) == "1":
            return None, None
        return real(env, backend, trace)

    monkeypatch.setattr(seeds_line, "_explicit_name", buggy)
    results = compute_matrix(matrix_keys(**SMALL_KEYS))
    assert v_explicit_wins_or_errors(results)
    assert v_flags_never_override_explicit(results)


def test_planted_aiter_fa_off_gfx9_is_caught(monkeypatch):
    """An arch check that lets AITER FA / MLA through on RDNA."""
    monkeypatch.setattr(seeds_line, "GFX9_ARCHS", ("gfx90a", "gfx942", "gfx950", "gfx1100"))
    results = compute_matrix(matrix_keys(**SMALL_KEYS))
    assert v_no_aiter_fa_mla_off_gfx9(results)


def test_planted_silent_ignore_is_caught(monkeypatch):
    """An explicit backend that wins but does not say which flags it ignored."""
    monkeypatch.setattr(seeds_line, "_ignore_flags", lambda env, name, trace: (
        trace.add("E-WINS", f"explicit backend {name} wins"), ())[1])
    results = compute_matrix(matrix_keys(**SMALL_KEYS))
    assert v_ignored_flags_named(results)


def test_planted_unexplained_rule_is_caught(monkeypatch):
    """A decision whose deciding rule never appears in the explanation."""
    real = seeds_line._auto_mha

    def buggy(env, flags, arch, trace):
        name, rule = real(env, flags, arch, trace)
        trace.rules[:] = [r for r in trace.rules if not r.startswith(rule + ": ")]
        return name, rule

    monkeypatch.setattr(seeds_line, "_auto_mha", buggy)
    results = compute_matrix(matrix_keys(**SMALL_KEYS))
    assert v_explanation_names_deciding_rule(results)


