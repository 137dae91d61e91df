"""Selection-matrix test of the ROCm backend-selection policy (impl/selection.py).

a. every example command of the five seed documents, quoted verbatim with document and line,
   parsed as data (env assignments, model -> MHA/MLA, --block-size, -tp), with its expected
   backend; the early draft's "does not work yet" rows take the result defined by the merged
   PR 26980 and the later docs;
b. the rows of vLLM's own selection test (research/vllm-backends.md section 2.1, version A);
c. the exhaustive matrix (5 flags x unset/0/1, explicit backend none/every name/invalid,
   4 archs, MHA/MLA, block sizes unset/1/16/64), computed once and checked against an
   independent decision table and against the policy's invariants; planted bugs prove the
   invariant checks catch what they claim to;
d. malformed values and misspelt variables;
4. numerics: every seed row's backend is resolved in the registry and one smoke golden case
   runs through it (skip, with the reason, where it cannot run here).
"""

from __future__ import annotations

import itertools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from impl import selection
from impl.selection import (MLA_BACKENDS, SELECTION_FLAGS, VALID_BACKENDS,
                            SelectionError, select_backend)

pytestmark = pytest.mark.smoke

SEEDS = Path(__file__).resolve().parents[2] / "shared" / "seeds"
DOCS = {
    "draft": "rocm-attention-backends-draft.md",
    "docs": "rocm-attention-backends-docs.md",
    "blog": "rocm-attention-blog-draft.md",
    "pr24648": "pr-24648-split-triton-rocm-attn.md",
    "pr26980": "pr-26980-rocm-selection-reorg.md",
}
MODEL_KINDS = {
    "meta-llama/Llama-3.1-8B-Instruct": "MHA",  # Llama: multi-head (GQA) attention
    "deepseek-ai/DeepSeek-R1": "MLA",  # DeepSeek-V3/R1: multi-head latent attention
}
SEED_ARCH = "gfx942"  # the seeds were written for MI300X

AITER = "VLLM_ROCM_USE_AITER"
AITER_MHA = "VLLM_ROCM_USE_AITER_MHA"
AITER_UNIFIED = "VLLM_ROCM_USE_AITER_UNIFIED_ATTENTION"
PREFILL_DECODE = "VLLM_V1_USE_PREFILL_DECODE_ATTENTION"
AITER_MLA = "VLLM_ROCM_USE_AITER_MLA"
BACKEND = "VLLM_ATTENTION_BACKEND"


# ---- the command parser (seed commands are data) ------------------------------------------

_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass
class Command:
    env: dict
    program: Optional[str] = None  # "vllm serve", "lm_eval" or None (bare assignments)
    model: Optional[str] = None
    block_size: Optional[int] = None
    tensor_parallel: Optional[int] = None


def parse_command(text: str) -> Command:
    """Shell-parse one example: leading ``K=V`` (or ``export K=V``), then the program."""
    tokens = shlex.split(text.replace("\\\n", " "))
    if tokens and tokens[0] == "export":
        tokens = tokens[1:]
    env = {}
    while tokens and _ASSIGN.match(tokens[0]):
        key, value = tokens.pop(0).split("=", 1)
        env[key] = value
    cmd = Command(env)
    if not tokens:
        return cmd
    if tokens[:2] == ["vllm", "serve"]:
        cmd.program, cmd.model, opts = "vllm serve", tokens[2], tokens[3:]
    elif tokens[0] == "lm_eval":
        cmd.program, opts = "lm_eval", tokens[1:]
    else:
        raise ValueError(f"unrecognised example command: {text!r}")
    i = 0
    while i < len(opts):
        opt = opts[i]
        value = opts[i + 1] if i + 1 < len(opts) else None
        if opt == "--block-size":
            cmd.block_size = int(value)
        elif opt in ("-tp", "--tp", "--tensor-parallel-size"):  # "--tp" is in the docs seed
            cmd.tensor_parallel = int(value)
        elif opt == "--model_args":  # lm_eval: pretrained=<model>,key=value...
            args = dict(kv.split("=", 1) for kv in value.split(","))
            cmd.model = args["pretrained"]
        else:
            i += 1
            continue
        i += 2
    return cmd


# ---- a. the seed rows ---------------------------------------------------------------------


@dataclass(frozen=True)
class SeedRow:
    doc: str  # key of DOCS
    line: int  # 1-based line where the command starts
    command: str  # verbatim (backslash-newline continuations kept)
    backend: str  # expected backend on SEED_ARCH
    rule: str  # expected deciding rule
    block_size: int = 16  # expected effective block size
    warns: tuple = ()  # substrings, one per expected warning (no other warnings allowed)
    kind: Optional[str] = None  # only where the command names no model
    note: str = ""

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


LLAMA = "vllm serve meta-llama/Llama-3.1-8B-Instruct"
DSR1 = "vllm serve deepseek-ai/DeepSeek-R1 -tp 8"
IGN = "ignored: the explicit backend"  # every ignored-flag warning says this
NOT_YET = ("the draft says 'does not work yet'; the merged PR 26980 (appendix) and the docs "
           "define this result")


def _mha_block(doc: str, lines: dict, not_yet: tuple = ()) -> list:
    """The MHA examples, identical in the draft, the docs and the PR 26980 appendix."""
    L = lines
    rows = [
        SeedRow(doc, L["t1"], LLAMA, "TRITON_ATTN", "DEFAULT"),
        SeedRow(doc, L["t2"], f'VLLM_ATTENTION_BACKEND="TRITON_ATTN" {LLAMA}', "TRITON_ATTN",
                "E-WINS"),
        SeedRow(doc, L["t3"], f'VLLM_ROCM_USE_AITER=1 VLLM_ATTENTION_BACKEND="TRITON_ATTN" '
                f'{LLAMA}', "TRITON_ATTN", "E-WINS", warns=(f"{AITER}=1 {IGN}",),
                note=NOT_YET if "t3" in not_yet else ""),
        SeedRow(doc, L["t4"], f"VLLM_ROCM_USE_AITER=1 VLLM_ROCM_USE_AITER_MHA=0 {LLAMA}",
                "TRITON_ATTN", "DEFAULT"),
        SeedRow(doc, L["r1"], f'VLLM_ATTENTION_BACKEND="ROCM_ATTN" {LLAMA}', "ROCM_ATTN",
                "E-WINS"),
        SeedRow(doc, L["r2"], f'VLLM_ROCM_USE_AITER=1 VLLM_ATTENTION_BACKEND="ROCM_ATTN" '
                f'{LLAMA}', "ROCM_ATTN", "E-WINS", warns=(f"{AITER}=1 {IGN}",),
                note=NOT_YET if "r2" in not_yet else ""),
        SeedRow(doc, L["r3"], f'VLLM_ROCM_USE_AITER=1 VLLM_ROCM_USE_AITER_MHA=0 '
                f'VLLM_ATTENTION_BACKEND="ROCM_ATTN" {LLAMA}', "ROCM_ATTN", "E-WINS",
                warns=(f"{AITER}=1 {IGN}", f"{AITER_MHA}=0 {IGN}")),
        SeedRow(doc, L["r4"], f"VLLM_ROCM_USE_AITER=1 VLLM_ROCM_USE_AITER_MHA=0 "
                f"VLLM_V1_USE_PREFILL_DECODE_ATTENTION=1 {LLAMA}", "ROCM_ATTN", "P3"),
        SeedRow(doc, L["f1"], f'VLLM_ATTENTION_BACKEND="ROCM_AITER_FA" {LLAMA}',
                "ROCM_AITER_FA", "E-WINS",
                note=("the draft marks a bug (ROCM_AITER_FA missing from the V1 oracle list); "
                      "PR 26980 fixed it") if doc == "draft" else ""),
        SeedRow(doc, L["f2"], f"VLLM_ROCM_USE_AITER=1 {LLAMA}", "ROCM_AITER_FA", "P2"),
        SeedRow(doc, L["u1"], f'VLLM_ATTENTION_BACKEND="ROCM_AITER_UNIFIED_ATTN" {LLAMA}',
                "ROCM_AITER_UNIFIED_ATTN", "E-WINS", block_size=64),
        SeedRow(doc, L["u2"], f'VLLM_ROCM_USE_AITER=1 '
                f'VLLM_ATTENTION_BACKEND="ROCM_AITER_UNIFIED_ATTN" {LLAMA}',
                "ROCM_AITER_UNIFIED_ATTN", "E-WINS", block_size=64,
                warns=(f"{AITER}=1 {IGN}",), note=NOT_YET if "u2" in not_yet else ""),
        SeedRow(doc, L["u3"], f"VLLM_ROCM_USE_AITER=1 VLLM_ROCM_USE_AITER_MHA=0 "
                f"VLLM_ROCM_USE_AITER_UNIFIED_ATTENTION=1 {LLAMA}", "ROCM_AITER_UNIFIED_ATTN",
                "P1", block_size=64),
        SeedRow(doc, L["m1"], f'VLLM_ATTENTION_BACKEND="TRITON_MLA" {DSR1}', "TRITON_MLA",
                "E-WINS"),
        SeedRow(doc, L["m2"], f'VLLM_ROCM_USE_AITER=1 VLLM_ATTENTION_BACKEND="TRITON_MLA" '
                f'{DSR1}', "TRITON_MLA", "E-WINS", warns=(f"{AITER}=1 {IGN}",)),
    ]
    return rows


_DRAFT_LINES = dict(t1=18, t2=21, t3=25, t4=28, r1=37, r2=41, r3=45, r4=48, f1=60, f2=63,
                    u1=72, u2=76, u3=79, m1=95, m2=97)
_DOCS_LINES = dict(t1=34, t2=36, t3=38, t4=40, r1=44, r2=46, r3=48, r4=50, f1=54, f2=56,
                   u1=60, u2=62, u3=64, m1=70, m2=72)
_PR_LINES = dict(t1=98, t2=100, t3=102, t4=104, r1=109, r2=112, r3=114, r4=117, f1=122,
                 f2=125, u1=130, u2=133, u3=135, m1=144, m2=146)

SEED_ROWS = (
    _mha_block("draft", _DRAFT_LINES, not_yet=("t3", "r2", "u2")) + [
        SeedRow("draft", 105, f'VLLM_ATTENTION_BACKEND="ROCM_AITER_MLA" {DSR1} --block-size 1',
                "ROCM_AITER_MLA", "E-WINS", block_size=1,
                note="the draft says AITER MLA only supports block size 1; PR 26980 added 16"),
        SeedRow("draft", 107, f"VLLM_ROCM_USE_AITER=1 {DSR1}  --block-size 1",
                "ROCM_AITER_MLA", "MLA-AITER", block_size=1),
    ]
    + _mha_block("docs", _DOCS_LINES) + [
        SeedRow("docs", 76, f'VLLM_ATTENTION_BACKEND="ROCM_AITER_MLA" {DSR1}',
                "ROCM_AITER_MLA", "E-WINS"),
        SeedRow("docs", 78, f"VLLM_ROCM_USE_AITER=1 {DSR1}", "ROCM_AITER_MLA", "MLA-AITER"),
        SeedRow("docs", 80, "VLLM_ROCM_USE_AITER=1 vllm serve deepseek-ai/DeepSeek-R1 \\\n"
                "--tp 8 \\\n--block-size 1", "ROCM_AITER_MLA", "MLA-AITER", block_size=1,
                note="the docs write '--tp 8'; vLLM's flag is -tp / --tensor-parallel-size "
                     "(irrelevant to selection)"),
    ]
    + [
        SeedRow("pr26980", 37, 'VLLM_ATTENTION_BACKEND="ROCM_AITER_FA" vllm serve ...',
                "ROCM_AITER_FA", "E-WINS", kind="MHA",
                note="'Fixes the case' in the PR body; model elided, an MHA backend"),
        SeedRow("pr26980", 43, 'VLLM_ROCM_USE_AITER=1 VLLM_ATTENTION_BACKEND="TRITON_ATTN"',
                "TRITON_ATTN", "E-WINS", warns=(f"{AITER}=1 {IGN}",), kind="MHA",
                note="PR body: '-> Uses Triton attention'"),
        SeedRow("pr26980", 44, 'VLLM_ROCM_USE_AITER=1 VLLM_ATTENTION_BACKEND="ROCM_ATTN"',
                "ROCM_ATTN", "E-WINS", warns=(f"{AITER}=1 {IGN}",), kind="MHA",
                note="PR body: '-> Uses ROCm chunked prefill/paged decode'"),
        SeedRow("pr26980", 45,
                'VLLM_ROCM_USE_AITER=1 VLLM_ATTENTION_BACKEND="ROCM_AITER_UNIFIED_ATTN"',
                "ROCM_AITER_UNIFIED_ATTN", "E-WINS", block_size=64,
                warns=(f"{AITER}=1 {IGN}",), kind="MHA",
                note="PR body: '-> Uses AITER unified attention'"),
    ]
    + _mha_block("pr26980", _PR_LINES) + [
        SeedRow("pr26980", 150, f'VLLM_ATTENTION_BACKEND="ROCM_AITER_MLA" {DSR1}',
                "ROCM_AITER_MLA", "E-WINS"),
        SeedRow("pr26980", 152, f"VLLM_ROCM_USE_AITER=1 {DSR1}  --block-size 1",
                "ROCM_AITER_MLA", "MLA-AITER", block_size=1),
        SeedRow("pr26980", 154, f"VLLM_ROCM_USE_AITER=1 {DSR1}", "ROCM_AITER_MLA",
                "MLA-AITER"),
    ]
    + [
        SeedRow("pr24648", 28, "VLLM_ATTENTION_BACKEND=TRITON_ATTN_VLLM_V1 lm_eval --model vllm "
                "--model_args pretrained=meta-llama/Llama-3.1-8B-Instruct --tasks gsm8k "
                "--num_fewshot 5 --batch_size auto --limit 500", "TRITON_ATTN", "E-WINS",
                warns=("_VLLM_V1 suffix is deprecated; use TRITON_ATTN",),
                note="legacy V1 name; the PR ran it on H100 and MI300 (evaluated for gfx942)"),
        SeedRow("pr24648", 60, "VLLM_ATTENTION_BACKEND=ROCM_ATTN_VLLM_V1 lm_eval --model vllm "
                "--model_args pretrained=meta-llama/Llama-3.1-8B-Instruct --tasks gsm8k "
                "--num_fewshot 5 --batch_size auto --limit 500", "ROCM_ATTN", "E-WINS",
                warns=("_VLLM_V1 suffix is deprecated; use ROCM_ATTN",)),
    ]
    + [
        SeedRow("blog", 17, "export VLLM_ATTENTION_BACKEND=TRITON_ATTN", "TRITON_ATTN",
                "E-WINS", kind="MHA"),
        SeedRow("blog", 18, "export VLLM_ATTENTION_BACKEND=ROCM_AITER_UNIFIED_ATTN",
                "ROCM_AITER_UNIFIED_ATTN", "E-WINS", block_size=64, kind="MHA"),
        SeedRow("blog", 19, "export VLLM_ATTENTION_BACKEND=ROCM_ATTN", "ROCM_ATTN", "E-WINS",
                kind="MHA"),
        SeedRow("blog", 20, "export VLLM_ATTENTION_BACKND=ROCM_AITER_FA", "TRITON_ATTN",
                "DEFAULT", kind="MHA",
                warns=("VLLM_ATTENTION_BACKND is not a variable vLLM reads",),
                note="typo in the blog: vLLM never sees an explicit backend, so automatic "
                     "selection gives TRITON_ATTN (not the ROCM_AITER_FA the row intends); "
                     "the policy warns 'did you mean VLLM_ATTENTION_BACKEND'"),
        SeedRow("blog", 21, "export VLLM_ATTENTION_BACKEND=TRITON_MLA", "TRITON_MLA", "E-WINS",
                kind="MLA"),
        SeedRow("blog", 22, "export VLLM_ATTENTION_BACKEND=ROCM_AITER_MLA", "ROCM_AITER_MLA",
                "E-WINS", kind="MLA"),
    ]
)


def seed_inputs(row: SeedRow) -> dict:
    """Keyword arguments of select_backend for a seed row (parsed from its command)."""
    cmd = parse_command(row.command)
    kind = row.kind if row.kind is not None else MODEL_KINDS[cmd.model]
    return dict(env=cmd.env, arch=SEED_ARCH, kind=kind, block_size=cmd.block_size)


def _seed_lines(doc: str) -> list:
    return (SEEDS / DOCS[doc]).read_text(encoding="utf-8").splitlines()


def test_seed_table_covers_every_example_command():
    """Every line of a seed that runs vLLM or sets VLLM_ATTENTION_BACKEND is a row."""
    pattern = re.compile(r"vllm serve|lm_eval |export VLLM|VLLM_ATTENTION_BACKEND=\"\w+\" →")
    covered = {(r.doc, r.line) for r in SEED_ROWS}
    missing = []
    for doc in DOCS:
        for i, line in enumerate(_seed_lines(doc), 1):
            if pattern.search(line) and (doc, i) not in covered:
                missing.append(f"{doc}:{i}: {line.strip()}")
    assert not missing, "seed example commands without a matrix row:\n" + "\n".join(missing)
    assert len(covered) == len(SEED_ROWS), "duplicate (document, line) in SEED_ROWS"


@pytest.mark.parametrize("row", SEED_ROWS, ids=lambda r: r.id)
def test_seed_row_is_quoted_from_its_source(row):
    lines = _seed_lines(row.doc)
    n = row.command.count("\n") + 1
    source = " ".join(lines[row.line - 1: row.line - 1 + n])
    squash = lambda s: " ".join(s.replace("\\\n", "\\ ").split())  # noqa: E731
    assert squash(row.command) in squash(source), (
        f"{row.id}: row command {row.command!r} is not on that line: {source!r}")
    if row.doc == "blog":  # the kind comes from the table's Category column
        assert source.startswith(f"| {row.kind} |"), f"{row.id}: category is not {row.kind}"


def test_parse_command_extracts_everything():
    c = parse_command("VLLM_ROCM_USE_AITER=1 vllm serve deepseek-ai/DeepSeek-R1 \\\n--tp 8 "
                      "\\\n--block-size 1")
    assert (c.env, c.program, c.model, c.tensor_parallel, c.block_size) == (
        {AITER: "1"}, "vllm serve", "deepseek-ai/DeepSeek-R1", 8, 1)
    c = parse_command('VLLM_ATTENTION_BACKEND="TRITON_MLA" vllm serve deepseek-ai/DeepSeek-R1 '
                      "-tp 8")
    assert (c.env, c.tensor_parallel, c.block_size) == ({BACKEND: "TRITON_MLA"}, 8, None)
    row = next(r for r in SEED_ROWS if r.id == "pr24648:28")
    c = parse_command(row.command)
    assert (c.env, c.program, c.model) == (
        {BACKEND: "TRITON_ATTN_VLLM_V1"}, "lm_eval", "meta-llama/Llama-3.1-8B-Instruct")
    c = parse_command("export VLLM_ATTENTION_BACKND=ROCM_AITER_FA")
    assert (c.env, c.program) == ({"VLLM_ATTENTION_BACKND": "ROCM_AITER_FA"}, None)
    for r in SEED_ROWS:  # every row's model is known, or the row states its kind
        cmd = parse_command(r.command)
        assert r.kind is not None or cmd.model in MODEL_KINDS, r.id
        if cmd.model == "deepseek-ai/DeepSeek-R1":
            assert cmd.tensor_parallel == 8, r.id


def _check_seed_result(row: SeedRow, sel) -> list:
    problems = []
    if sel.backend != row.backend:
        problems.append(f"backend {sel.backend}, expected {row.backend}")
    if sel.decided_by != row.rule:
        problems.append(f"decided by {sel.decided_by}, expected {row.rule}")
    if sel.block_size != row.block_size:
        problems.append(f"block size {sel.block_size}, expected {row.block_size}")
    for w in row.warns:
        if not any(w in got for got in sel.warnings):
            problems.append(f"missing warning containing {w!r}")
    if len(sel.warnings) != len(row.warns):
        problems.append(f"warnings {list(sel.warnings)}, expected exactly {len(row.warns)}")
    return problems


@pytest.mark.parametrize("row", SEED_ROWS, ids=lambda r: r.id)
def test_seed_example_selects_documented_backend(row):
    sel = select_backend(**seed_inputs(row))
    problems = _check_seed_result(row, sel)
    assert not problems, f"{row.id} {row.command!r} ({row.note}):\n  " + "\n  ".join(
        problems) + "\nrules:\n  " + "\n  ".join(sel.rules)


def test_seed_examples_agree_on_every_gfx9_arch():
    """The seeds were written for MI300X; the policy gives the same answer on gfx90a/gfx950."""
    diffs = []
    for row in SEED_ROWS:
        kw = seed_inputs(row)
        base = select_backend(**kw)
        for arch in ("gfx90a", "gfx950"):
            other = select_backend(**{**kw, "arch": arch})
            if (other.backend, other.block_size) != (base.backend, base.block_size):
                diffs.append(f"{row.id} on {arch}: {other.backend} vs {base.backend}")
    assert not diffs, "\n".join(diffs)


def test_seed_rows_include_the_draft_not_yet_examples():
    """The three 'does not work yet' examples of the draft are rows with the later result."""
    lines = _seed_lines("draft")
    not_yet = [i for i, line in enumerate(lines, 1) if "does not work yet" in line]
    assert len(not_yet) == 3
    for i in not_yet:  # the command follows its comment line
        row = next(r for r in SEED_ROWS if r.doc == "draft" and r.line == i + 1)
        assert row.note == NOT_YET and row.warns, row.id


# ---- b. vLLM's own selection test (research 2.1, commit 64deead71) --------------------------


@dataclass(frozen=True)
class VllmRow:
    id: str
    env: dict
    backend: Optional[str]
    expect: str  # backend name, or "error:<rule>"
    kind: str = "MHA"
    block_size: int = 16
    arch: str = "gfx942"  # the upstream test patches on_gfx9 -> True
    note: str = ""


VLLM_ROWS = [
    VllmRow("std-flex", {}, "FLEX_ATTENTION", "FLEX_ATTENTION"),
    VllmRow("std-1", {}, None, "TRITON_ATTN"),
    VllmRow("std-2", {}, "TRITON_ATTN", "TRITON_ATTN"),
    VllmRow("std-3", {}, "ROCM_ATTN", "ROCM_ATTN"),
    VllmRow("std-4", {}, "ROCM_AITER_FA", "ROCM_AITER_FA"),
    VllmRow("std-5", {}, "ROCM_AITER_UNIFIED_ATTN", "ROCM_AITER_UNIFIED_ATTN"),
    VllmRow("std-6", {AITER: "1"}, None, "ROCM_AITER_FA"),
    VllmRow("std-7", {AITER: "1", AITER_MHA: "1"}, None, "ROCM_AITER_FA"),
    VllmRow("std-8", {AITER: "1", AITER_UNIFIED: "1"}, None, "ROCM_AITER_UNIFIED_ATTN"),
    VllmRow("std-9", {PREFILL_DECODE: "1"}, None, "ROCM_ATTN"),
    VllmRow("std-10", {AITER: "1"}, "TRITON_ATTN", "TRITON_ATTN"),
    VllmRow("std-11", {AITER: "1", AITER_MHA: "0"}, None, "TRITON_ATTN"),
    VllmRow("std-12", {AITER: "1"}, "ROCM_ATTN", "ROCM_ATTN"),
    VllmRow("mla-1", {}, "TRITON_MLA", "TRITON_MLA", "MLA", 16),
    VllmRow("mla-2", {}, "TRITON_MLA", "error:BLOCK", "MLA", 1),
    VllmRow("mla-3", {}, "ROCM_AITER_MLA", "ROCM_AITER_MLA", "MLA", 1),
    VllmRow("mla-4", {}, "ROCM_AITER_MLA", "ROCM_AITER_MLA", "MLA", 16),
    VllmRow("mla-5", {AITER: "1"}, None, "ROCM_AITER_MLA", "MLA", 1),
    VllmRow("mla-6", {AITER: "1"}, None, "ROCM_AITER_MLA", "MLA", 16),
    VllmRow("mla-7", {AITER: "1"}, "TRITON_MLA", "TRITON_MLA", "MLA", 16),
    VllmRow("mla-8", {}, "ROCM_AITER_TRITON_MLA", "error:E-NAME", "MLA", 16,
            note="deliberate deviation: vLLM selects ROCM_AITER_TRITON_MLA; attncheck does not "
                 "model that backend (no seed uses it) and says so"),
    VllmRow("aiter-fa-requires-gfx9", {}, "ROCM_AITER_FA", "error:E-ARCH", arch="gfx1100",
            note="upstream patches on_gfx9 -> False; gfx1100 is our non-gfx9 arch"),
    # test_sparse_not_supported has no counterpart: sparse MLA is not an input of this policy.
]


@pytest.mark.parametrize("row", VLLM_ROWS, ids=lambda r: r.id)
def test_vllm_selection_test_rows(row):
    kw = dict(arch=row.arch, kind=row.kind, block_size=row.block_size, head_size=128
              if row.kind == "MHA" else None, dtype="float16", kv_cache_dtype="auto")
    if row.expect.startswith("error:"):
        with pytest.raises(SelectionError) as info:
            select_backend(row.env, row.backend, **kw)
        assert info.value.rule == row.expect.split(":", 1)[1], str(info.value)
        if row.id == "aiter-fa-requires-gfx9":
            assert "only supported on gfx9" in str(info.value)
        if row.id == "mla-2":  # the error points to what works for block size 1
            assert "ROCM_AITER_MLA" in str(info.value)
    else:
        sel = select_backend(row.env, row.backend, **kw)
        assert sel.backend == row.expect, "\n".join(sel.rules)


# ---- c. the exhaustive matrix -----------------------------------------------------------------

FLAG_NAMES = tuple(SELECTION_FLAGS)
FLAG_VALUES = (None, "0", "1")  # None = unset
EXPLICIT_CHOICES = (None,) + VALID_BACKENDS + ("NOT_A_BACKEND",)
ARCHS = ("gfx90a", "gfx942", "gfx950", "gfx1100")
KINDS = ("MHA", "MLA")
BLOCKS = (None, 1, 16, 64)  # None = the user gave none (default chosen by the policy)
GFX9 = {"gfx90a", "gfx942", "gfx950"}


def _env_of(values: tuple) -> dict:
    return {n: v for n, v in zip(FLAG_NAMES, values) if v is not None}


def matrix_keys(flag_values=FLAG_VALUES, explicit=EXPLICIT_CHOICES, archs=ARCHS, kinds=KINDS,
                blocks=BLOCKS):
    for vals in itertools.product(flag_values, repeat=len(FLAG_NAMES)):
        for key in itertools.product(explicit, archs, kinds, blocks):
            yield (vals,) + key


def evaluate(key, select=None):
    """The policy's outcome for one matrix key: a Selection or the SelectionError."""
    select = select_backend if select is None else select
    vals, explicit, arch, kind, block = key
    try:
        return select(_env_of(vals), explicit, arch=arch, kind=kind, block_size=block)
    except SelectionError as e:
        return e


def compute_matrix(keys, select=None) -> dict:
    return {key: evaluate(key, select) for key in keys}


def describe(key) -> str:
    vals, explicit, arch, kind, block = key
    env = " ".join(f"{k}={v}" for k, v in _env_of(vals).items()) or "(no flags)"
    return f"[{env} | backend={explicit} | {arch} {kind} block={block}]"


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
        set_flags = {f"{k}={v}" for k, v in _env_of(key[0]).items()}
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


def _report(violations: list, limit: int = 15) -> str:
    more = f"\n... and {len(violations) - limit} more" if len(violations) > limit else ""
    return f"{len(violations)} violations:\n" + "\n".join(violations[:limit]) + more


@pytest.fixture(scope="module")
def matrix():
    return compute_matrix(matrix_keys())


def test_matrix_size_and_both_outcomes(matrix):
    assert len(matrix) == 3 ** 5 * len(EXPLICIT_CHOICES) * 4 * 2 * len(BLOCKS)
    errors = sum(isinstance(r, SelectionError) for r in matrix.values())
    assert 0 < errors < len(matrix)
    chosen = {r.backend for r in matrix.values() if not isinstance(r, SelectionError)}
    assert chosen == set(VALID_BACKENDS)  # every backend is reachable


@pytest.mark.parametrize("check", INVARIANTS, ids=lambda f: f.__name__[2:])
def test_matrix_invariant(matrix, check):
    violations = check(matrix)
    assert not violations, _report(violations)


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
    assert not diffs, _report(diffs)


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


# ---- d. malformed values and misspelt variables ---------------------------------------------


@pytest.mark.parametrize("env,backend,fragment", [
    ({AITER: "maybe"}, None, f"{AITER}='maybe' is not a boolean"),
    ({AITER_MHA: ""}, None, f"{AITER_MHA}='' is not a boolean"),
    ({AITER_MLA: "2"}, "TRITON_MLA", f"{AITER_MLA}='2' is not a boolean"),  # even if ignored
    ({BACKEND: ""}, None, "VLLM_ATTENTION_BACKEND is set but empty"),
    ({}, "", "the backend argument is set but empty"),
    ({}, "   ", "is set but empty"),
    ({BACKEND: "TRITON_ATN"}, None, "Closest: TRITON_ATTN"),
    ({}, "NOT_A_BACKEND", "unknown attention backend 'NOT_A_BACKEND'"),
    ({}, "FLASH_ATTN", "AITER's flash attention is ROCM_AITER_FA"),
    ({}, "_VLLM_V1", "unknown attention backend"),
])
def test_malformed_values_are_errors(env, backend, fragment):
    with pytest.raises(SelectionError) as info:
        select_backend(env, backend, kind="MLA" if backend == "TRITON_MLA" else "MHA")
    assert fragment in str(info.value)


def test_unknown_name_error_lists_every_valid_name():
    with pytest.raises(SelectionError) as info:
        select_backend({BACKEND: "rocm_aiter_f"})
    msg = str(info.value)
    assert all(name in msg for name in VALID_BACKENDS)
    assert msg.endswith("Closest: ROCM_AITER_FA")


@pytest.mark.parametrize("word,value", [("1", True), ("TRUE", True), ("Yes", True),
                                        ("on", True), ("0", False), ("False", False),
                                        ("NO", False), ("off", False), (" 1 ", True)])
def test_boolean_words(word, value):
    sel = select_backend({AITER: word})
    assert sel.backend == ("ROCM_AITER_FA" if value else "TRITON_ATTN")


@pytest.mark.parametrize("name,meant", [
    ("VLLM_ATTENTION_BACKND", BACKEND),  # the blog's typo
    ("VLLM_ROCM_USE_AITR", AITER),
    ("VLLM_ROCM_USE_AITER_UNIFIED_ATTN", AITER_UNIFIED),
    ("VLLM_V1_USE_PREFILL_DECODE_ATTN", PREFILL_DECODE),
    ("vllm_rocm_use_aiter", AITER),  # variable names are case-sensitive
])
def test_misspelt_variable_warns_did_you_mean(name, meant):
    sel = select_backend({name: "1"})
    assert sel.backend == "TRITON_ATTN"  # the misspelt variable has no effect
    assert len(sel.warnings) == 1 and f"did you mean {meant}?" in sel.warnings[0]
    assert any(r.startswith("TYPO: ") for r in sel.rules)


@pytest.mark.parametrize("name", ["VLLM_ROCM_USE_AITER_MOE", "VLLM_ROCM_USE_AITER_PAGED_ATTN",
                                  "VLLM_USE_V1", "VLLM_ROCM_USE_AITER_SOMETHING_NEW",
                                  "VLLM_LOGGING_LEVEL", "ATTENTION_BACKND"])
def test_real_or_unrelated_variables_do_not_warn(name):
    assert select_backend({name: "1"}).warnings == ()


def test_legacy_suffix_and_case_are_accepted_with_a_note():
    sel = select_backend({BACKEND: "rocm_attn_vllm_v1"})
    assert sel.backend == "ROCM_ATTN"
    assert sel.warnings == ("backend name 'rocm_attn_vllm_v1': the _VLLM_V1 suffix is "
                            "deprecated; use ROCM_ATTN",)
    assert select_backend({}, "triton_mla", kind="mla").backend == "TRITON_MLA"


def test_argument_beats_env_backend_with_a_warning():
    sel = select_backend({BACKEND: "ROCM_ATTN"}, "TRITON_ATTN")
    assert sel.backend == "TRITON_ATTN"
    assert any("VLLM_ATTENTION_BACKEND=ROCM_ATTN ignored" in w for w in sel.warnings)


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(arch="gfx908"), "unknown ROCm arch 'gfx908'"),
    (dict(kind="GQA"), "kind: expected 'MHA' or 'MLA'"),
    (dict(block_size=0), "block_size: expected a positive integer"),
    (dict(kv_cache_dtype="int4"), "kv_cache_dtype: unknown value"),
    (dict(vendor="nvidia"), "ROCm selection policy"),
    (dict(dtype="float64"), "dtype: unknown model dtype"),
    (dict(backend="ROCM_AITER_FA", head_size=80), "ROCM_AITER_FA does not support head size 80"),
    (dict(backend="ROCM_AITER_FA", dtype="float32"), "does not support float32"),
    (dict(backend="FLEX_ATTENTION", kv_cache_dtype="fp8"), "FLEX_ATTENTION does not support"),
    (dict(block_size=8), "multiple of 16"),
])
def test_invalid_inputs_name_the_problem(kwargs, fragment):
    with pytest.raises(SelectionError) as info:
        select_backend({}, **kwargs)
    assert fragment in str(info.value)


def test_fp8_storage_follows_the_arch():
    assert select_backend({}, kv_cache_dtype="fp8", arch="gfx942").kv_cache_storage == \
        "fp8_e4m3fnuz"
    assert select_backend({}, kv_cache_dtype="fp8", arch="gfx950").kv_cache_storage == \
        "fp8_e4m3fn"
    assert select_backend({}).kv_cache_storage is None


def test_policy_does_not_read_the_process_environment(monkeypatch):
    monkeypatch.setenv(AITER, "1")
    monkeypatch.setenv(BACKEND, "ROCM_ATTN")
    assert select_backend({}).backend == "TRITON_ATTN"


# ---- 4. tie selection to numerics ------------------------------------------------------------

_VERDICTS: dict = {}


def _smoke_candidates(kind: str, block_size: int, list_cases) -> list:
    """Smoke cases of the kind, plainest first (matching block size, no extra knobs)."""
    names = list_cases(tier="smoke", kind=kind)
    try:
        from attncheck.cases import get_case
    except ImportError:
        return names

    def plainness(name):
        p = get_case(name).params()
        return (p.get("block_size") != block_size, p.get("kv_cache_dtype", "auto") != "auto",
                bool(p.get("sliding_window")), bool(p.get("softcap")), bool(p.get("alibi")),
                bool(p.get("sinks")), not p.get("causal", True), bool(p.get("unordered")),
                sum(p.get("seq_lens", [0])) * p.get("num_heads", 1), name)

    return sorted(names, key=plainness)


def _verdict_for(backend_name: str, kind: str, block_size: int, device: str):
    """("pass"|"fail"|"xfail"|"skip", text), computed once per backend."""
    key = (backend_name, kind, block_size, device)
    if key in _VERDICTS:
        return _VERDICTS[key]
    harness = pytest.importorskip(
        "attncheck.harness", reason="attncheck.harness (list_cases/run_backend) not written yet")
    backends = pytest.importorskip(
        "attncheck.backends", reason="attncheck.backends (get_backend) not written yet")
    try:
        backend = backends.get_backend(backend_name)
    except Exception as e:  # noqa: BLE001 - a missing module is reported, anything else fails
        if isinstance(e.__cause__ or e, ModuleNotFoundError) or "No module named" in str(e):
            result = ("skip", f"{backend_name}: backend module not importable yet ({e})")
            _VERDICTS[key] = result
            return result
        raise
    import torch

    avail = backend.availability(torch.device(device))
    if not avail.ok:
        result = ("skip", f"{backend_name} cannot run on {device}: {avail.reason}")
    else:
        result = _first_judged_case(backend, backend_name, kind, block_size, device, harness)
    _VERDICTS[key] = result
    return result


MAX_CASES_TRIED = 6


def _first_judged_case(backend, backend_name, kind, block_size, device, harness):
    """Run the plainest smoke cases until one is judged pass/fail/error.

    A case the backend cannot take (skip) or a declared known issue (xfail) moves on to the
    next case: the point is one case that the selected backend is expected to pass.
    """
    passed_over = []
    for case in _smoke_candidates(kind, block_size, harness.list_cases)[:MAX_CASES_TRIED]:
        v = harness.run_backend(backend, case, device=device)
        if v.status in ("skip", "xfail"):
            passed_over.append((v.status, f"{case}: {v.reason}"))
            continue
        text = f"{backend_name} on {case} ({device}): {v.status} {v.reason}\n{v.report}"
        return ("pass" if v.status == "pass" else "fail", text)
    if any(status == "xfail" for status, _ in passed_over):
        return ("xfail", f"{backend_name}: every case tried is a declared known issue here: "
                + "; ".join(t for _, t in passed_over[:3]))
    return ("skip", f"{backend_name}: no smoke {kind} case it can run: "
            + ("; ".join(t for _, t in passed_over[:5]) or "the catalogue has none"))


@pytest.mark.parametrize("row", SEED_ROWS, ids=lambda r: r.id)
def test_seed_selection_runs_a_smoke_golden(row, device):
    """``device`` is conftest's fixture (--device auto|cpu|cuda)."""
    sel = select_backend(**seed_inputs(row))
    status, text = _verdict_for(sel.backend, sel.kind, sel.block_size, device)
    if status == "skip":
        pytest.skip(text)
    if status == "xfail":
        pytest.xfail(text)
    assert status == "pass", f"{row.id} selects {sel.backend}:\n{text}"
