"""The example commands of the seed documents, as data (``seed_examples.json``).

Each example is one command quoted verbatim from a seed document, with the document's name and
the line where it starts, and the result the seeds' vLLM line gives for it (``expect``:
backend, deciding rule, effective block size, and one substring per expected warning). The
commands are parsed here, never executed: leading ``K=V`` assignments (or ``export K=V``) are
the environment, the model says MHA or MLA, and ``--block-size`` / ``-tp`` are read.

``attncheck select --compare-versions`` and the selection tests read this file; the documents
themselves are not needed (``tests/selection/test_seed_rows.py`` checks the quotes against
them only where ``ATTNCHECK_SEEDS_DIR`` points to them).
"""

from __future__ import annotations

import functools
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

DATA = Path(__file__).with_name("seed_examples.json")

# The models the seed commands serve, and their attention kind.
MODEL_KINDS = {
    "meta-llama/Llama-3.1-8B-Instruct": "MHA",  # Llama: multi-head (GQA) attention
    "deepseek-ai/DeepSeek-R1": "MLA",  # DeepSeek-V3/R1: multi-head latent attention
}
SEED_ARCH = "gfx942"  # the seeds were written for MI300X

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


@dataclass(frozen=True)
class Expected:
    backend: str
    rule: str  # the deciding rule id
    block_size: int
    warnings: tuple  # one substring per expected warning (no other warnings allowed)


@dataclass(frozen=True)
class SeedExample:
    doc: str  # file name of the seed document
    line: int  # 1-based line where the command starts
    command: str  # verbatim (backslash-newline continuations kept)
    expect: Expected  # on SEED_ARCH, for the seeds' vLLM line
    kind: Optional[str] = None  # only where the command names no model
    draft_not_yet: bool = False  # the draft marks it as "does not work yet"
    note: str = ""

    @property
    def id(self) -> str:
        return f"{self.doc.split('.')[0]}:{self.line}"

    def parsed(self) -> Command:
        return parse_command(self.command)

    def inputs(self) -> dict:
        """Keyword arguments of ``impl.selection.select_backend`` for this example."""
        cmd = self.parsed()
        kind = self.kind if self.kind is not None else MODEL_KINDS[cmd.model]
        return dict(env=cmd.env, arch=SEED_ARCH, kind=kind, block_size=cmd.block_size)


@functools.lru_cache(maxsize=1)
def load() -> tuple:
    """Every seed example, in document order."""
    rows = json.loads(DATA.read_text(encoding="utf-8"))
    out = []
    for row in rows:
        e = row.pop("expect")
        out.append(SeedExample(expect=Expected(e["backend"], e["rule"], e["block_size"],
                                               tuple(e["warnings"])), **row))
    return tuple(out)
