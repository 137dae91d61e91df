"""Every example command of the seed documents selects the backend the seeds' vLLM line gives.

The rows are data (attncheck/seed_examples.json): the command quoted verbatim with its
document and line, parsed (env assignments, model -> MHA/MLA, --block-size, -tp), and the
expected backend, deciding rule, block size and warnings. The draft's "does not work yet"
rows take the result of the merged PR 26980 and the docs. The quotes are compared with the
documents only where ``ATTNCHECK_SEEDS_DIR`` points to them (skipped otherwise).
"""

from __future__ import annotations

import re

import pytest

from attncheck.seed_examples import MODEL_KINDS, parse_command
from impl.selection import select_backend
from tests.selection.helpers import (AITER, BACKEND, SEEDS, seed_document_lines,
                                     seed_documents_dir, seed_id)

pytestmark = pytest.mark.smoke

# A line of a seed document that runs vLLM or sets VLLM_ATTENTION_BACKEND is an example.
EXAMPLE_LINE = re.compile(r"vllm serve|lm_eval |export VLLM|VLLM_ATTENTION_BACKEND=\"\w+\" →")


def test_seed_rows_are_unique_and_complete():
    assert len({(r.doc, r.line) for r in SEEDS}) == len(SEEDS), "duplicate (document, line)"
    assert len({r.doc for r in SEEDS}) == 5
    for r in SEEDS:  # every row's model is known, or the row states its kind
        cmd = parse_command(r.command)
        assert r.kind is not None or cmd.model in MODEL_KINDS, r.id
        if cmd.model == "deepseek-ai/DeepSeek-R1":
            assert cmd.tensor_parallel == 8, r.id


def uncovered(rows, doc: str, lines: list) -> list:
    """Example lines of ``doc`` that no row quotes."""
    covered = {r.line for r in rows if r.doc == doc}
    return [f"{doc}:{i}: {line.strip()}" for i, line in enumerate(lines, 1)
            if EXAMPLE_LINE.search(line) and i not in covered]


def quote_problem(row, lines: list):
    """None when the row's command is on its line of the document, else what is wrong."""
    n = row.command.count("\n") + 1
    source = " ".join(lines[row.line - 1: row.line - 1 + n])
    squash = lambda s: " ".join(s.replace("\\\n", "\\ ").split())  # noqa: E731
    if squash(row.command) not in squash(source):
        return f"{row.id}: row command {row.command!r} is not on that line: {source!r}"
    if "blog" in row.doc and not source.startswith(f"| {row.kind} |"):
        return f"{row.id}: the table's category is not {row.kind}"  # the kind's source
    return None


def test_seed_table_covers_every_example_command():
    """Every line of a seed document that runs vLLM or sets the backend is a row."""
    seed_documents_dir()
    missing = []
    for doc in sorted({r.doc for r in SEEDS}):
        missing += uncovered(SEEDS, doc, seed_document_lines(doc))
    assert not missing, "seed example commands without a row:\n" + "\n".join(missing)


@pytest.mark.parametrize("row", SEEDS, ids=seed_id)
def test_seed_row_is_quoted_from_its_source(row):
    problem = quote_problem(row, seed_document_lines(row.doc))
    assert problem is None, problem


def test_quote_checks_catch_a_moved_or_missing_row():
    """Planted: a row one line off, and a document line that no row quotes (no documents
    needed: a two-line stand-in)."""
    row = next(r for r in SEEDS if r.kind == "MHA" and "blog" in r.doc)
    lines = ["intro", f"| MHA | `{row.command}` |", "vllm serve some/model"]
    placed = type(row)(row.doc, 2, row.command, row.expect, kind=row.kind)
    assert quote_problem(placed, lines) is None
    assert "is not on that line" in quote_problem(type(row)(row.doc, 1, row.command,
                                                             row.expect, kind=row.kind), lines)
    assert "category is not MLA" in quote_problem(type(row)(row.doc, 2, row.command,
                                                             row.expect, kind="MLA"), lines)
    assert uncovered([placed], row.doc, lines) == [f"{row.doc}:3: vllm serve some/model"]


def test_seed_rows_include_the_draft_not_yet_examples():
    """The three 'does not work yet' examples of the draft are rows with the later result."""
    flagged = [r for r in SEEDS if r.draft_not_yet]
    assert len(flagged) == 3 and all(r.expect.warnings for r in flagged)
    draft = flagged[0].doc
    lines = seed_document_lines(draft)
    not_yet = [i for i, line in enumerate(lines, 1) if "does not work yet" in line]
    # the command follows its comment line
    assert sorted(i + 1 for i in not_yet) == sorted(r.line for r in flagged)


def test_parse_command_extracts_everything():
    c = parse_command("VLLM_ROCM_USE_AITER=1 vllm serve deepseek-ai/DeepSeek-R1 \\\n--tp 8 "
                      "\\\n--block-size 1")
    assert (c.env, c.program, c.model, c.tensor_parallel, c.block_size) == (
        {AITER: "1"}, "vllm serve", "deepseek-ai/DeepSeek-R1", 8, 1)
    c = parse_command('VLLM_ATTENTION_BACKEND="TRITON_MLA" vllm serve deepseek-ai/DeepSeek-R1 '
                      "-tp 8")
    assert (c.env, c.tensor_parallel, c.block_size) == ({BACKEND: "TRITON_MLA"}, 8, None)
    c = parse_command("VLLM_ATTENTION_BACKEND=TRITON_ATTN_VLLM_V1 lm_eval --model vllm "
                      "--model_args pretrained=meta-llama/Llama-3.1-8B-Instruct --tasks gsm8k")
    assert (c.env, c.program, c.model) == (
        {BACKEND: "TRITON_ATTN_VLLM_V1"}, "lm_eval", "meta-llama/Llama-3.1-8B-Instruct")
    c = parse_command("export VLLM_ATTENTION_BACKND=ROCM_AITER_FA")
    assert (c.env, c.program) == ({"VLLM_ATTENTION_BACKND": "ROCM_AITER_FA"}, None)
    with pytest.raises(ValueError, match="unrecognised example command"):
        parse_command("python serve.py")


def check_seed_result(row, sel) -> list:
    want = row.expect
    problems = []
    if sel.backend != want.backend:
        problems.append(f"backend {sel.backend}, expected {want.backend}")
    if sel.decided_by != want.rule:
        problems.append(f"decided by {sel.decided_by}, expected {want.rule}")
    if sel.block_size != want.block_size:
        problems.append(f"block size {sel.block_size}, expected {want.block_size}")
    for w in want.warnings:
        if not any(w in got for got in sel.warnings):
            problems.append(f"missing warning containing {w!r}")
    if len(sel.warnings) != len(want.warnings):
        problems.append(f"warnings {list(sel.warnings)}, expected exactly "
                        f"{len(want.warnings)}")
    return problems


@pytest.mark.parametrize("row", SEEDS, ids=seed_id)
def test_seed_example_selects_documented_backend(row):
    sel = select_backend(**row.inputs())
    problems = check_seed_result(row, sel)
    assert not problems, f"{row.id} {row.command!r} ({row.note}):\n  " + "\n  ".join(
        problems) + "\nrules:\n  " + "\n  ".join(sel.rules)


def test_seed_check_catches_a_wrong_row():
    """The comparison fails when the policy's answer and the row differ (planted)."""
    row = next(r for r in SEEDS if r.expect.warnings)
    sel = select_backend(**row.inputs())
    wrong = type(row)(row.doc, row.line, row.command,
                      type(row.expect)("ROCM_ATTN" if sel.backend != "ROCM_ATTN" else
                                       "TRITON_ATTN", "P9", sel.block_size + 1, ()),
                      kind=row.kind)
    assert len(check_seed_result(wrong, sel)) == 4


def test_seed_examples_agree_on_every_gfx9_arch():
    """The seeds were written for MI300X; the policy gives the same answer on gfx90a/gfx950."""
    diffs = []
    for row in SEEDS:
        kw = row.inputs()
        base = select_backend(**kw)
        for arch in ("gfx90a", "gfx950"):
            other = select_backend(**{**kw, "arch": arch})
            if (other.backend, other.block_size) != (base.backend, base.block_size):
                diffs.append(f"{row.id} on {arch}: {other.backend} vs {base.backend}")
    assert not diffs, "\n".join(diffs)
