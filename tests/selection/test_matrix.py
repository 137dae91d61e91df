"""The exhaustive matrix: every combination of the selection flags (unset/0/1), explicit
backend (none, every name, an invalid one), arch, attention kind and block size.

Checked against a decision-table restatement of the seeds' rules and against the policy's
invariants; planted bugs prove each invariant check catches what it claims to.
"""

from __future__ import annotations

import pytest

from impl import selection
from impl.selection import MLA_BACKENDS, SELECTION_FLAGS, VALID_BACKENDS, SelectionError
from tests.selection.helpers import (AITER, AITER_MHA, AITER_MLA, AITER_UNIFIED, BLOCKS,
                                     EXPLICIT_CHOICES, FLAG_NAMES, GFX9, KINDS,
                                     PREFILL_DECODE, ARCHS, compute_matrix, describe, env_of,
                                     evaluate, matrix_keys, report)

pytestmark = pytest.mark.smoke


def oracle(key):
    """The policy restated as a decision table (independent of impl/selection.py's code).

    Returns ("ok", backend, block_size) or ("error", rule).
    """
    vals, explicit, arch, kind, block = key
    env = dict(zip(FLAG_NAMES, vals))

    def flag(name):
        return SELECTION_FLAGS[name] if env[name] is None else env[name] == "1"

    gfx9 = arch in GFX9
    if explicit is not None:
        if explicit not in VALID_BACKENDS:
            return ("error", "E-NAME")
        if (kind == "MLA") != (explicit in MLA_BACKENDS):
            return ("error", "E-KIND")
        if explicit in ("ROCM_AITER_FA", "ROCM_AITER_MLA") and not gfx9:
            return ("error", "E-ARCH")
        chosen = explicit
    elif kind == "MHA":
        table = [  # (condition, backend) in priority order
            (flag(AITER) and flag(AITER_UNIFIED), "ROCM_AITER_UNIFIED_ATTN"),
            (flag(AITER) and flag(AITER_MHA) and gfx9, "ROCM_AITER_FA"),
            (flag(PREFILL_DECODE), "ROCM_ATTN"),
            (True, "TRITON_ATTN"),
        ]
        chosen = next(b for cond, b in table if cond)
    else:
        small = (block or 16) < 16
        if flag(AITER) and flag(AITER_MLA) and gfx9:
            chosen = "ROCM_AITER_MLA"
        elif not small:
            chosen = "TRITON_MLA"
        elif gfx9:
            chosen = "ROCM_AITER_MLA"
        else:
            return ("error", "MLA-SMALL-BLOCK")
    eff = block if block is not None else (64 if chosen == "ROCM_AITER_UNIFIED_ATTN" else 16)
    if kind == "MHA" and eff % 16:
        return ("error", "BLOCK")
    if chosen == "TRITON_MLA" and eff < 16:
        return ("error", "BLOCK")
    return ("ok", chosen, eff)


# -- invariant checks: each returns a list of violations (empty = holds) ----------------------


def v_matches_oracle(results) -> list:
    out = []
    for key, res in results.items():
        want = oracle(key)
        got = (("error", res.rule) if isinstance(res, SelectionError)
               else ("ok", res.backend, res.block_size))
        if got != want:
            out.append(f"{describe(key)}: policy {got}, decision table {want}")
    return out


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


INVARIANTS = [v_matches_oracle, v_explicit_wins_or_errors, v_flags_never_override_explicit,
              v_ignored_flags_named, v_no_aiter_fa_mla_off_gfx9,
              v_explanation_names_deciding_rule]


@pytest.fixture(scope="module")
def matrix():
    return compute_matrix(matrix_keys())


def test_matrix_size_and_both_outcomes(matrix):
    assert len(matrix) == 3 ** 5 * len(EXPLICIT_CHOICES) * len(ARCHS) * len(KINDS) * len(BLOCKS)
    errors = sum(isinstance(r, SelectionError) for r in matrix.values())
    assert 0 < errors < len(matrix)
    chosen = {r.backend for r in matrix.values() if not isinstance(r, SelectionError)}
    assert chosen == set(VALID_BACKENDS)  # every backend is reachable


@pytest.mark.parametrize("check", INVARIANTS, ids=lambda f: f.__name__[2:])
def test_matrix_invariant(matrix, check):
    violations = check(matrix)
    assert not violations, report(violations)


def test_matrix_is_deterministic(matrix):
    """Recompute (every 5th key, in reverse order): same outcome, rules and warnings."""
    diffs = []
    for key in reversed(list(matrix)[::5]):
        a, b = matrix[key], evaluate(key)
        same = ((str(a), a.rule, a.rules) == (str(b), b.rule, b.rules)
                if isinstance(a, SelectionError) and isinstance(b, SelectionError)
                else not isinstance(a, SelectionError) and not isinstance(b, SelectionError)
                and a.to_dict() == b.to_dict())
        if not same:
            diffs.append(describe(key))
    assert not diffs, report(diffs)


def test_auto_mode_reaches_every_priority_rule(matrix):
    rules = {r.decided_by for k, r in matrix.items()
             if k[1] is None and not isinstance(r, SelectionError)}
    assert rules == {"P1", "P2", "P3", "DEFAULT", "MLA-AITER", "MLA-TRITON", "MLA-SMALL-BLOCK"}


# -- planted bugs: each invariant check must catch the bug it is for --------------------------

SMALL_KEYS = dict(flag_values=(None, "1"), explicit=(None, "TRITON_ATTN", "ROCM_ATTN",
                  "ROCM_AITER_FA", "TRITON_MLA"), archs=("gfx942", "gfx1100"),
                  kinds=KINDS, blocks=(None, 1, 16))


def test_planted_flags_override_explicit_is_caught(monkeypatch):
    """The pre-PR-26980 bug: VLLM_ROCM_USE_AITER=1 overrode an explicit backend."""
    real = selection._explicit_name

    def buggy(env, backend, trace):
        if env.get(AITER) == "1":
            return None, None
        return real(env, backend, trace)

    monkeypatch.setattr(selection, "_explicit_name", buggy)
    results = compute_matrix(matrix_keys(**SMALL_KEYS))
    assert v_explicit_wins_or_errors(results)
    assert v_flags_never_override_explicit(results)
    assert v_matches_oracle(results)


def test_planted_aiter_fa_off_gfx9_is_caught(monkeypatch):
    """An arch check that lets AITER FA / MLA through on RDNA."""
    monkeypatch.setattr(selection, "GFX9_ARCHS", ("gfx90a", "gfx942", "gfx950", "gfx1100"))
    results = compute_matrix(matrix_keys(**SMALL_KEYS))
    assert v_no_aiter_fa_mla_off_gfx9(results)
    assert v_matches_oracle(results)


def test_planted_triton_mla_block1_is_caught(monkeypatch):
    """TRITON_MLA accepting block size 1 (a config that fails at run time)."""
    monkeypatch.setattr(selection, "TRITON_MLA_MIN_BLOCK", 1)
    results = compute_matrix(matrix_keys(**SMALL_KEYS))
    assert v_matches_oracle(results)


def test_planted_silent_ignore_is_caught(monkeypatch):
    """An explicit backend that wins but does not say which flags it ignored."""
    monkeypatch.setattr(selection, "_ignore_flags", lambda env, name, trace: (
        trace.add("E-WINS", f"explicit backend {name} wins"), ())[1])
    results = compute_matrix(matrix_keys(**SMALL_KEYS))
    assert v_ignored_flags_named(results)


def test_planted_unexplained_rule_is_caught(monkeypatch):
    """A decision whose deciding rule never appears in the explanation."""
    real = selection._auto_mha

    def buggy(env, flags, arch, trace):
        name, rule = real(env, flags, arch, trace)
        trace.rules[:] = [r for r in trace.rules if not r.startswith(rule + ": ")]
        return name, rule

    monkeypatch.setattr(selection, "_auto_mha", buggy)
    results = compute_matrix(matrix_keys(**SMALL_KEYS))
    assert v_explanation_names_deciding_rule(results)


