"""What the selection tests share: the seed examples, the seed documents (optional), and the
exhaustive matrix of configurations.

The seed documents are not part of the repository. Tests that compare quotes with them read
the folder named by ``ATTNCHECK_SEEDS_DIR`` and skip, with the reason, when it is not set or
a document is missing there.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from attncheck import seed_examples
from impl.selection import SELECTION_FLAGS, VALID_BACKENDS, SelectionError, select_backend

AITER = "VLLM_ROCM_USE_AITER"
AITER_MHA = "VLLM_ROCM_USE_AITER_MHA"
AITER_UNIFIED = "VLLM_ROCM_USE_AITER_UNIFIED_ATTENTION"
PREFILL_DECODE = "VLLM_V1_USE_PREFILL_DECODE_ATTENTION"
AITER_MLA = "VLLM_ROCM_USE_AITER_MLA"
BACKEND = "VLLM_ATTENTION_BACKEND"

SEEDS = seed_examples.load()
SEEDS_DIR_VAR = "ATTNCHECK_SEEDS_DIR"


def seed_id(example) -> str:
    return example.id


def seed_documents_dir() -> Path:
    """The folder of seed documents, or skip the calling test (with the reason)."""
    folder = os.environ.get(SEEDS_DIR_VAR)
    if not folder:
        pytest.skip(f"{SEEDS_DIR_VAR} is not set: the quotes are checked only where the seed "
                    "documents are available")
    return Path(folder)


def seed_document_lines(doc: str) -> list:
    path = seed_documents_dir() / doc
    if not path.is_file():
        pytest.skip(f"seed document {doc} is not in {SEEDS_DIR_VAR}={path.parent}")
    return path.read_text(encoding="utf-8").splitlines()


# ---- the exhaustive matrix -------------------------------------------------------------------

FLAG_NAMES = tuple(SELECTION_FLAGS)
FLAG_VALUES = (None, "0", "1")  # None = unset
EXPLICIT_CHOICES = (None,) + VALID_BACKENDS + ("NOT_A_BACKEND",)
ARCHS = ("gfx90a", "gfx942", "gfx950", "gfx1100", "gfx1201")
KINDS = ("MHA", "MLA")
BLOCKS = (None, 1, 16, 64)  # None = the user gave none (default chosen by the policy)
GFX9 = {"gfx90a", "gfx942", "gfx950"}


def env_of(values: tuple) -> dict:
    return {n: v for n, v in zip(FLAG_NAMES, values) if v is not None}


def matrix_keys(flag_values=FLAG_VALUES, explicit=EXPLICIT_CHOICES, archs=ARCHS, kinds=KINDS,
                blocks=BLOCKS):
    for vals in itertools.product(flag_values, repeat=len(FLAG_NAMES)):
        for key in itertools.product(explicit, archs, kinds, blocks):
            yield (vals,) + key


def evaluate(key, select=None, **extra):
    """The policy's outcome for one matrix key: a Selection or the SelectionError."""
    select = select_backend if select is None else select
    vals, explicit, arch, kind, block = key
    try:
        return select(env_of(vals), explicit, arch=arch, kind=kind, block_size=block, **extra)
    except SelectionError as e:
        return e


def compute_matrix(keys, select=None, **extra) -> dict:
    return {key: evaluate(key, select, **extra) for key in keys}


def describe(key) -> str:
    vals, explicit, arch, kind, block = key
    env = " ".join(f"{k}={v}" for k, v in env_of(vals).items()) or "(no flags)"
    return f"[{env} | backend={explicit} | {arch} {kind} block={block}]"


def report(violations: list, limit: int = 15) -> str:
    more = f"\n... and {len(violations) - limit} more" if len(violations) > limit else ""
    return f"{len(violations)} violations:\n" + "\n".join(violations[:limit]) + more
