"""Bad input, as a user gives it: malformed invocations, plugins, manifests, golden files,
environment values, output paths and stored batches, each run through the real command line.

Every row must give a non-zero exit, a one-line message naming the argument and what was
expected (the row's needles all on one output line), no traceback, and leave the disk as it
was: the repository's tracked files and the golden store (hashed before and after), the working
directory (empty) and any output path named on the command line. An `attncheck verify` row must
be refused before the run starts (output paths, workers, the golden store are checked first).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

from attncheck import cases, golden
from tests.store_damage import MANIFEST_DAMAGE, copy_store, rewrite_case

pytestmark = pytest.mark.smoke

REPO = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("attncheck.__main__"):
    CLI = [sys.executable, "-m", "attncheck"]
else:  # until `python -m attncheck` exists
    CLI = [sys.executable, "-c", "import sys; from attncheck.cli import main; sys.exit(main())"]
# A correct command rejects these inputs within seconds; one still running after this is failing.
TIMEOUT_S = 120

PLUGINS = {
    "raises_at_import.py": 'raise RuntimeError("boom at import")\n',
    "syntax_error.py": "def broken(:\n",
    "factories.py": textwrap.dedent('''
        def raises():
            raise RuntimeError("factory failed")

        def needs_args(x, y):
            return None

        class NoName:
            name = None
            kind = "MHA"
            capabilities = None
            def availability(self, device): ...
            def run(self, batch): ...

        class BadKind(NoName):
            name = "BADKIND"
            kind = "GQA"

        class Builtin(NoName):
            name = "TRITON_ATTN"

        NONAME, BADKIND, BUILTIN, NOT_A_BACKEND = NoName(), BadKind(), Builtin(), 42
        '''),
}


@dataclass
class Row:
    id: str
    args: list  # after the command; "{tmp}" is replaced by the row's scratch directory
    needles: tuple  # all on one line of the output
    store: Optional[Callable] = None  # damages a private copy of the golden store
    env: dict = field(default_factory=dict)
    pytest_args: bool = False  # args are for `python -m pytest` (attncheck's plugin), not for attncheck
    runs: bool = False  # an `attncheck verify` row whose input is only found by running the case
    watch_named: bool = True  # hash the absolute paths it names (not for /tmp: other processes write there)


def _case_dir(name):
    def damage(root):
        path = golden.case_path(cases.get_case(name), root)
        path.unlink()
        path.mkdir()
    return damage


def _flip_byte(root):
    path = golden.case_path(cases.get_case("decode-h8x2-d64-bs16-bf16"), root)
    data = bytearray(path.read_bytes())
    data[-5] ^= 1
    path.write_bytes(bytes(data))


def _truncate_case(root):
    path = golden.case_path(cases.get_case("decode-h8x2-d64-bs16-bf16"), root)
    path.write_bytes(path.read_bytes()[:100])


def _orphan(root):
    (root / "mha" / "stray.safetensors").write_bytes(b"stray")


def _bad_journal(root):
    (root / golden.JOURNAL_NAME).write_bytes(b"\x00 not json")


def _manifest(kind):
    return lambda root: MANIFEST_DAMAGE[kind](root / golden.MANIFEST_NAME)


def _batch(mutate, name="mixed-h8x2-d64-bs16-bf16"):
    return lambda root: rewrite_case(root, name, mutate)


def _set(key, index, value):
    return lambda t: t[key].__setitem__(index, value)


VERIFY = ["verify", "--device", "cpu", "--backend", "TORCH_SDPA", "--case", "decode-h8x2-d64-bs16-bf16", "-n", "0"]

ROWS = [
    # ---- plugins ----
    Row("plugin-no-colon", ["verify", "--backend-plugin", "factories"], ("--backend-plugin", "expected 'module:attr'")),
    Row("plugin-no-such-module", ["verify", "--backend-plugin", "nomodule_xyz:B"],
        ("--backend-plugin", "cannot import module 'nomodule_xyz'")),
    Row("plugin-no-such-attr", ["verify", "--backend-plugin", "factories:nope"],
        ("--backend-plugin", "has no attribute 'nope'")),
    Row("plugin-empty-attr", ["verify", "--backend-plugin", "factories:"], ("--backend-plugin", "factories:")),
    Row("plugin-empty-module", ["verify", "--backend-plugin", ":X"], ("--backend-plugin", ":X")),
    Row("plugin-raises-at-import", ["verify", "--backend-plugin", "raises_at_import:B"],
        ("--backend-plugin", "raises_at_import", "boom at import")),
    Row("plugin-syntax-error", ["verify", "--backend-plugin", "syntax_error:B"],
        ("--backend-plugin", "syntax_error")),
    Row("plugin-factory-needs-args", ["verify", "--backend-plugin", "time:sleep"], ("--backend-plugin", "time:sleep")),
    Row("plugin-factory-needs-two-args", ["verify", "--backend-plugin", "factories:needs_args"],
        ("--backend-plugin", "factories:needs_args")),
    Row("plugin-factory-raises", ["verify", "--backend-plugin", "factories:raises"],
        ("--backend-plugin", "factories:raises", "factory failed")),
    Row("plugin-name-none", ["verify", "--backend-plugin", "factories:NONAME"],
        ("--backend-plugin", "factories:NONAME", "name")),
    Row("plugin-bad-kind", ["verify", "--backend-plugin", "factories:BADKIND"],
        ("--backend-plugin", "kind 'GQA'", "expected 'MHA' or 'MLA'")),
    Row("plugin-builtin-name", ["verify", "--backend-plugin", "factories:BUILTIN"],
        ("--backend-plugin", "TRITON_ATTN is a built-in")),
    Row("plugin-not-a-backend", ["verify", "--backend-plugin", "factories:NOT_A_BACKEND"],
        ("--backend-plugin", "is not a backend")),
    Row("pytest-plugin-no-such-module", ["--attncheck", "-p", "no:cacheprovider", "--attncheck-backend-plugin",
                                         "nomodule_xyz:B"], ("backend-plugin", "nomodule_xyz"), pytest_args=True),
    Row("pytest-plugin-raises-at-import", ["--attncheck", "-p", "no:cacheprovider", "--attncheck-backend-plugin",
                                           "raises_at_import:B"], ("backend-plugin", "boom at import"),
        pytest_args=True),
    # ---- arguments ----
    Row("verify-unknown-tier", ["verify", "--tier", "huge"], ("--tier", "invalid choice: 'huge'")),
    Row("verify-unknown-device", ["verify", "--device", "tpu"], ("--device", "invalid choice: 'tpu'")),
    Row("verify-unknown-backend", ["verify", "--device", "cpu", "--backend", "TRITON_ATN"],
        ("TRITON_ATN", "did you mean TRITON_ATTN")),
    Row("verify-device-cuda-without-gpu", ["verify", "--device", "cuda"], ("device cuda", "no CUDA device")),
    Row("verify-backend-without-name", ["verify", "--backend"], ("--backend", "expected at least one argument")),
    Row("verify-workers-not-a-number", ["verify", "-n", "abc"], ("-n", "a number of workers >= 0", "'abc'")),
    Row("verify-negative-workers", VERIFY[:-1] + ["-3"], ("-n", "a number of workers >= 0", "-3")),
    Row("cases-unknown-family", ["cases", "--family", "nope"], ("--family", "nope")),
    Row("cases-unknown-kind", ["cases", "--kind", "XYZ"], ("--kind", "invalid choice: 'XYZ'")),
    Row("golden-unknown-command", ["golden", "frob"], ("invalid choice: 'frob'",)),
    Row("regen-unknown-case", ["golden", "regen", "--case", "nope"], ("--case", "unknown stored case", "nope")),
    # ---- output paths ----
    Row("json-path-is-a-directory", VERIFY + ["--json", "{tmp}"], ("--json", "{tmp}")),
    Row("json-path-is-tmp", VERIFY + ["--json", "/tmp"], ("--json", "/tmp"), watch_named=False),
    Row("json-path-unwritable", VERIFY + ["--json", "/proc/attncheck-bad-input.json"],
        ("--json", "/proc/attncheck-bad-input.json")),
    Row("junit-path-unwritable", VERIFY + ["--junit", "/proc/attncheck-bad-input.xml"],
        ("--junit", "/proc/attncheck-bad-input.xml")),
    Row("junit-path-is-a-directory", VERIFY + ["--junit", "{tmp}"], ("--junit", "{tmp}")),
    # ---- manifests ----
    Row("verify-manifest-a-list", ["golden", "verify"], ("MANIFEST.json", "expected a JSON object"),
        store=_manifest("a-list")),
    Row("verify-manifest-cases-a-list", ["golden", "verify"], ("MANIFEST.json", "missing top-level key"),
        store=_manifest("cases-a-list")),
    Row("verify-manifest-full-cases-a-list", ["golden", "verify"], ("MANIFEST.json", "'cases' must be an object"),
        store=_manifest("full-manifest-cases-a-list")),
    Row("verify-manifest-random-bytes", ["golden", "verify"], ("MANIFEST.json", "expected UTF-8 JSON"),
        store=_manifest("random-bytes")),
    Row("verify-manifest-truncated", ["golden", "verify"], ("MANIFEST.json", "is not valid JSON"),
        store=_manifest("truncated")),
    Row("verify-manifest-a-directory", ["golden", "verify"], ("MANIFEST.json", "Is a directory"),
        store=_manifest("a-directory")),
    Row("verify-manifest-wrong-schema", ["golden", "verify"], ("MANIFEST.json", "schema_version 99, expected 1"),
        store=_manifest("wrong-schema")),
    Row("verify-manifest-path-outside", ["golden", "verify"], ("path must be a relative", "../../etc/passwd"),
        store=_manifest("path-outside-the-store")),
    Row("verify-manifest-sha-not-hex", ["golden", "verify"], ("file_sha256 must be 64 lowercase hex digits",),
        store=_manifest("sha-not-hex")),
    Row("regen-manifest-truncated", ["golden", "regen", "--case", "decode-h8x2-d64-bs16-bf16"],
        ("MANIFEST.json", "is not valid JSON"), store=_manifest("truncated")),
    Row("regen-check-manifest-a-list", ["golden", "regen", "--check"], ("MANIFEST.json", "expected a JSON object"),
        store=_manifest("a-list")),
    Row("regen-manifest-random-bytes", ["golden", "regen"], ("MANIFEST.json", "expected UTF-8 JSON"),
        store=_manifest("random-bytes")),
    Row("regen-manifest-entry-without-path", ["golden", "regen", "--case", "decode-h8x2-d64-bs16-bf16"],
        ("MANIFEST.json", "case x: manifest entry lacks"), store=_manifest("entry-without-path")),
    Row("regen-manifest-a-directory", ["golden", "regen", "--prune"], ("MANIFEST.json", "Is a directory"),
        store=_manifest("a-directory")),
    Row("verify-damaged-journal", ["golden", "verify"], (".regen-journal.json", "is not a regen journal"),
        store=_bad_journal),
    Row("regen-damaged-journal", ["golden", "regen", "--case", "decode-h8x2-d64-bs16-bf16"],
        (".regen-journal.json", "is not a regen journal"), store=_bad_journal),
    Row("attncheck-verify-manifest-truncated", VERIFY, ("MANIFEST.json", "is not valid JSON"),
        store=_manifest("truncated")),
    # ---- golden files ----
    Row("verify-flipped-byte", ["golden", "verify"], ("decode-h8x2-d64-bs16-bf16", "fails its hash", "tensor"),
        store=_flip_byte),
    Row("verify-truncated-golden-file", ["golden", "verify"], ("decode-h8x2-d64-bs16-bf16", "fails its hash"),
        store=_truncate_case),
    Row("verify-golden-file-a-directory", ["golden", "verify"], ("is a directory, expected a safetensors file",),
        store=_case_dir("decode-h8x2-d64-bs16-bf16")),
    Row("verify-orphan-file", ["golden", "verify"], ("orphan golden file", "stray.safetensors", "--prune"),
        store=_orphan),
    # ---- environment values ----
    Row("golden-dir-missing", ["golden", "verify"], ("golden dir", "does not exist", "ATTNCHECK_GOLDEN_DIR"),
        env={"ATTNCHECK_GOLDEN_DIR": "{tmp}/no-such-store"}),
    Row("golden-dir-a-file", ["golden", "verify"], ("golden dir", "is not a directory", "ATTNCHECK_GOLDEN_DIR"),
        env={"ATTNCHECK_GOLDEN_DIR": str(REPO / "README.md")}),
    Row("regen-golden-dir-a-file", ["golden", "regen", "--check"], ("golden dir", "is not a directory"),
        env={"ATTNCHECK_GOLDEN_DIR": str(REPO / "README.md")}),
    Row("attncheck-verify-golden-dir-missing", VERIFY, ("golden dir", "no-such-store", "does not exist"),
        env={"ATTNCHECK_GOLDEN_DIR": "{tmp}/no-such-store"}),
    Row("env-flag-not-boolean", ["select"], ("VLLM_ROCM_USE_AITER", "not a boolean"),
        env={"VLLM_ROCM_USE_AITER": "maybe"}),
    Row("env-option-flag-not-boolean", ["select", "--env", "VLLM_V1_USE_PREFILL_DECODE_ATTENTION=2"],
        ("VLLM_V1_USE_PREFILL_DECODE_ATTENTION", "not a boolean")),
    Row("env-option-without-equals", ["select", "--env", "NOEQUALS"], ("--env", "expected KEY=VALUE")),
    # the seeds' vLLM line reads VLLM_ATTENTION_BACKEND (0.33 ignores it with a warning): pinned, so that
    # the row holds whether or not a vLLM is installed
    Row("env-unknown-backend", ["select", "--vllm-version", "0.12.0"], ("NOPE", "Valid names"),
        env={"VLLM_ATTENTION_BACKEND": "NOPE"}),
    Row("env-unknown-arch", ["select"], ("ATTNCHECK_ARCH", "gfx999"), env={"ATTNCHECK_ARCH": "gfx999"}),
    Row("select-unknown-arch", ["select", "--arch", "gfx999"], ("--arch", "gfx999", "expected one of")),
    Row("select-negative-block-size", ["select", "--block-size", "-3"], ("--block-size", "positive integer")),
    Row("select-zero-head-size", ["select", "--head-size", "0"], ("head_size", "positive integer")),
    # ---- stored batches (hash-consistent store, content breaks the batch contract) ----
    Row("batch-block-out-of-range", ["golden", "verify"], ("block_table", "out of range"),
        store=_batch(_set("block_table", (1, 0), 10_000))),
    Row("batch-duplicate-slot", ["golden", "verify"], ("slot_mapping", "both write slot"),
        store=_batch(lambda t: t["slot_mapping"].__setitem__(1, int(t["slot_mapping"][0])))),
    Row("batch-seq-shorter-than-query", ["golden", "verify"], ("seq_lens", "need seq_len >= q_len"),
        store=_batch(lambda t: t.__setitem__("seq_lens", t["seq_lens"] - 100))),
    Row("batch-value-cache-dtype", ["golden", "verify"], ("value_cache", "got torch.float32"),
        store=_batch(lambda t: t.__setitem__("value_cache", t["value_cache"].float()))),
    Row("batch-query-start-loc-decreasing", ["golden", "verify"], ("query_start_loc",),
        store=_batch(lambda t: t.__setitem__("query_start_loc", t["query_start_loc"].flip(0)))),
    Row("batch-mla-q-pe-dtype", ["golden", "verify"], ("q_pe", "dtype must equal q_nope's"),
        store=_batch(lambda t: t.__setitem__("q_pe", t["q_pe"].float()), name="mla-mixed-h8-bs16-bf16")),
    Row("batch-run-by-attncheck-verify", VERIFY, ("the case's batch is invalid", "block_table", "out of range"),
        store=_batch(_set("block_table", (1, 0), 10_000), name="decode-h8x2-d64-bs16-bf16"), runs=True),
    Row("batch-missing-tensor", ["golden", "verify"], ("do not form a batch", "query"),
        store=_batch(lambda t: t.pop("query"))),
]


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("plugins")
    for name, text in PLUGINS.items():
        (d / name).write_text(text)
    return d


# What `attncheck verify` prints once its checks passed and the run starts (the row that runs
# proves this is still the line it prints).
RUN_STARTED = "attncheck verify: tier "


def _tracked_files() -> list:
    """The repository's tracked files (none outside a git checkout: then the store alone is hashed)."""
    try:
        r = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [REPO / p for p in r.stdout.decode().split("\0") if p] if r.returncode == 0 else []


def _state(path: Path) -> dict:
    """What a path holds: every file's sha256 (a file, or all files under a folder)."""
    if not path.exists():
        return {}
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {p.relative_to(path).as_posix() + ("/" if p.is_dir() else ""):
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir" for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_is_a_one_line_error_and_changes_nothing(row, tmp_path, plugin_dir):
    if row.id == "verify-device-cuda-without-gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    scratch, cwd = tmp_path / "scratch", tmp_path / "cwd"
    scratch.mkdir()
    cwd.mkdir()
    fill = lambda s: s.replace("{tmp}", str(scratch))  # noqa: E731
    store = golden.golden_dir()
    if row.store is not None:
        store = copy_store(tmp_path / "store")
        row.store(store)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VLLM_", "ATTNCHECK_"))}
    env.update(PYTHONPATH=os.pathsep.join([str(plugin_dir), str(REPO)]), ATTNCHECK_GOLDEN_DIR=str(store))
    env.update({k: fill(v) for k, v in row.env.items()})
    args = [fill(a) for a in row.args]
    named = [a for a in args if a.startswith("/") and not a.startswith(str(REPO))] + \
            [v for v in map(fill, row.env.values()) if v.startswith("/")]
    tracked = [p for p in _tracked_files() if not p.resolve().is_relative_to(store.resolve())]  # store: hashed whole
    watched = [store, cwd, scratch] + [Path(a) for a in named if row.watch_named] + tracked
    before = {str(p): _state(p) for p in watched}

    cmd = [sys.executable, "-m", "pytest", *args] if row.pytest_args else [*CLI, *args]
    try:
        r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        output = r.stdout + r.stderr
        needles = [fill(n) for n in row.needles]
        assert r.returncode != 0, f"exit 0 for bad input:\n{output}"
        if args[0] == "verify" and not row.pytest_args:
            assert (RUN_STARTED in output) == row.runs, \
                f"{'refused before' if row.runs else 'started'} the run, expected the opposite:\n{output}"
        assert "Traceback" not in output and "INTERNALERROR" not in output, output
        assert any(all(n in line for n in needles) for line in output.splitlines()), \
            f"no line names {needles}:\n{output}"
        assert {str(p): _state(p) for p in watched} == before, "bad input changed files on disk"
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {TIMEOUT_S} s: bad input must be rejected before any work starts")
    finally:
        if row.store is not None:
            shutil.rmtree(store, ignore_errors=True)  # 40 MB per row: do not keep it in pytest's tmp


def test_the_table_is_large_and_covers_every_kind_of_input():
    assert len(ROWS) >= 40 and len({r.id for r in ROWS}) == len(ROWS)
    kinds = {r.id.split("-")[0] for r in ROWS}
    assert {"plugin", "verify", "regen", "golden", "env", "batch", "json", "junit"} <= kinds
