"""The golden store: one safetensors file per case plus ``golden/MANIFEST.json``.

* ``regen`` (single process) generates every stored case twice and requires identical bytes,
  prints a per-case diff against what is on disk, and replaces the store all or nothing (staged
  files + a journal, under a file lock; see "regen: all or nothing" below). It refuses a store
  whose manifest it cannot read, and deletes stale or orphan case files only with ``prune``.
* ``verify`` checks the manifest schema, every file's and every tensor's sha256, that every
  stored batch satisfies the batch contract, that no file is missing or orphaned, and that the
  manifest matches the catalogue; ``recover`` first
  completes (or discards) an interrupted regen.
* ``load`` reads a case read-only (xdist workers need no locks); the file hash is checked once
  per process.

fp8 tensors are stored as uint8 views with the logical dtype recorded in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from attncheck import cases as catalogue

SCHEMA_VERSION = 1
REFERENCE_VERSION = "1.0.0"
MANIFEST_NAME = "MANIFEST.json"
CONVENTIONS = {
    "causal_alignment": "bottom_right",
    "lse_base": "e",
    "lse_layout": "[num_heads, num_tokens]",
    "empty_row_output": "zeros",
    "empty_row_lse": "-inf",
    "sliding_window": "W keys including the query's own (FlashAttention window (W-1, 0))",
    "softcap": "c*tanh(s/c) on the scaled score, before masking",
    "alibi": "-slope*|q_pos - k_pos|",
    "sinks": "raw per-head logit in the softmax denominator; excluded from the LSE",
    "kv_cache_layout": "NHD [num_blocks, block_size, num_kv_heads, head_size]",
    "fp8": "stored = RNE(clamp(x.float()/scale, -max, max)); read = stored*scale; e4m3fn max 448, e4m3fnuz max 240",
    "poison": "unused cache slots, spare blocks and block-table padding hold NaN",
    "reference_precision": "float64 on CPU, one thread; stored as float32",
    "budget": "pt = same math in the input dtype, both op orders (K pre-scaled; scores scaled), the larger "
              "error per row (max over the head dim); MHA adds out_step, a bound on what any correct kernel's "
              "float32 arithmetic does (golden/README.md, Budgets)",
}
_LOGICAL = {
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e4m3fnuz": torch.float8_e4m3fnuz,
}


class GoldenError(Exception):
    """A golden file or the manifest is missing, corrupt, stale or inconsistent."""


def golden_dir() -> Path:
    """``ATTNCHECK_GOLDEN_DIR``, else the store shipped in the package: ``attncheck/goldens`` is
    a link to the repository's ``golden/`` in a checkout and holds a copy of it in a wheel."""
    env = os.environ.get("ATTNCHECK_GOLDEN_DIR")
    return Path(env) if env else (Path(__file__).parent / "goldens").resolve()


def case_path(case, root: Optional[Path] = None) -> Path:
    root = root or golden_dir()
    return root / case.kind.lower() / f"{case.name}.safetensors"


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _storable(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous()
    if t.dtype in _LOGICAL.values():
        return t.view(torch.uint8)
    return t


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def tensor_sha(t: torch.Tensor) -> str:
    """sha256 of the raw bytes (any dtype, bf16 and fp8 included)."""
    return _sha(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def serialize(case, tensors: dict) -> tuple[bytes, dict]:
    """Bytes of the safetensors file and the manifest entry describing them."""
    stored = {k: _storable(v) for k, v in sorted(tensors.items())}
    # One metadata key holding sorted JSON: safetensors 0.8 writes a multi-key __metadata__ map
    # in a random order, which would make identical goldens differ byte-wise.
    meta = {"attncheck": json.dumps({"case_id": case.name, "schema_version": SCHEMA_VERSION,
                                     "reference_version": REFERENCE_VERSION}, sort_keys=True)}
    blob = st_save(stored, metadata=meta)
    tinfo = {}
    for k, v in sorted(tensors.items()):
        tinfo[k] = {"dtype": _dtype_name(stored[k].dtype), "logical_dtype": _dtype_name(v.dtype),
                    "shape": list(v.shape), "sha256": tensor_sha(v)}
    entry = {
        "kind": case.kind, "tier": case.tier, "family": case.family,
        "path": str(case_path(case, Path(".")).as_posix()),
        "file_sha256": _sha(blob), "size_bytes": len(blob),
        "params": case.manifest_params(),
        "tensors": tinfo,
    }
    return blob, entry


def provenance() -> dict:
    import numpy
    import safetensors
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "safetensors": safetensors.__version__, "platform": platform.platform(),
            "reference_version": REFERENCE_VERSION, "reference_precision": "float64-cpu-1thread"}


def case_module(case):
    """The generator of the case's kind (``build_golden``, ``build_live``, ``batch_from_tensors``,
    ``rule_factors``, ``CACHE_FIELDS``): a property of the case kind, see attncheck.cases."""
    return type(case).generator


def generate(case) -> dict:
    """The golden tensors of one case: single thread, CPU, float64 reference."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return case_module(case).build_golden(case)
    finally:
        torch.set_num_threads(threads)


def stored_cases() -> list:
    return [c for c in catalogue.all_cases() if c.tier in catalogue.STORED_TIERS]


# ---- reading --------------------------------------------------------------------------------

_ENTRY_KEYS = {"kind", "tier", "family", "path", "file_sha256", "size_bytes", "params", "tensors", "provenance",
               "rule"}


def _type_name(x) -> str:
    return {dict: "an object", list: "a list", str: "a string"}.get(type(x), type(x).__name__)


def manifest_top_problems(manifest) -> list[str]:
    """Problems with the manifest as a whole; any of them makes the store unreadable."""
    if not isinstance(manifest, dict):
        return [f"expected a JSON object with 'schema_version' and 'cases', got {_type_name(manifest)}"]
    problems = [f"missing top-level key {k!r}" for k in ("schema_version", "reference_version", "conventions",
                                                         "cases") if k not in manifest]
    if "schema_version" in manifest and manifest["schema_version"] != SCHEMA_VERSION:
        problems.append(f"schema_version {manifest['schema_version']!r}, expected {SCHEMA_VERSION}")
    if "cases" in manifest and not isinstance(manifest["cases"], dict):
        problems.append(f"'cases' must be an object mapping case name to entry, got {_type_name(manifest['cases'])}")
    return problems


def entry_problem(name: str, entry) -> Optional[str]:
    """What is wrong with one manifest entry (None if it is well-formed)."""
    if not isinstance(entry, dict):
        return f"case {name}: manifest entry must be an object, got {_type_name(entry)}"
    missing = _ENTRY_KEYS - set(entry)
    if missing:
        return f"case {name}: manifest entry lacks {sorted(missing)}"
    rel = entry["path"]
    if not isinstance(rel, str) or not rel.endswith(".safetensors") or Path(rel).is_absolute() or ".." in Path(rel).parts:
        return f"case {name}: path must be a relative '<kind>/<name>.safetensors' inside the store, got {rel!r}"
    sha = entry["file_sha256"]
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        return f"case {name}: file_sha256 must be 64 lowercase hex digits, got {sha!r}"
    if not isinstance(entry["tensors"], dict):
        return f"case {name}: 'tensors' must be an object, got {_type_name(entry['tensors'])}"
    return None


def _no_store(root: Path) -> Optional[str]:
    """Why ``root`` is not a golden store at all (None: it is a directory)."""
    if root.is_dir():
        return None
    return (f"golden dir {root} {'is not a directory' if root.exists() else 'does not exist'}"
            " (set ATTNCHECK_GOLDEN_DIR to a golden store, or unset it)")


def _manifest_json(root: Path) -> dict:
    """The manifest's JSON, whose top level is sound; GoldenError (one line) otherwise."""
    if _no_store(root):
        raise GoldenError(_no_store(root))
    path = root / MANIFEST_NAME
    if not path.exists():
        raise GoldenError(f"{path} is missing: run `attncheck golden regen`")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise GoldenError(f"{path}: cannot read the manifest ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise GoldenError(f"{path} is not a manifest: expected UTF-8 JSON, got binary data") from None
    except json.JSONDecodeError as e:
        raise GoldenError(f"{path} is not valid JSON ({e}); restore it from version control") from None
    problems = manifest_top_problems(manifest)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise GoldenError(f"{path} is not a valid manifest: {problems[0]}{more}")
    return manifest


def read_manifest(root: Optional[Path] = None) -> dict:
    """The manifest, checked: raises GoldenError (one line naming the file) if it is missing,
    unreadable, not JSON, or not a manifest (wrong schema, a malformed entry)."""
    root = root or golden_dir()
    manifest = _manifest_json(root)
    for name, entry in manifest["cases"].items():
        problem = entry_problem(name, entry)
        if problem:
            raise GoldenError(f"{root / MANIFEST_NAME} is not a valid manifest: {problem}")
    return manifest


def stored_models(root: Path) -> dict:
    """Spot-check model weights under golden/models/ (not cases): path -> sha256 from its MODELS.json."""
    index = root / "models" / "MODELS.json"
    if not index.exists():
        return {}
    try:
        models = json.loads(index.read_bytes().decode("utf-8"))
        return {(index.parent / rel).resolve(): e["sha256"] for rel, e in models.items()}
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as e:
        raise GoldenError(f"{index} is not a model index ({type(e).__name__}: {e}); "
                          "restore it from version control") from None


def _stray_files(root: Path, listed: set) -> list[Path]:
    """Safetensors files under the store that neither a manifest entry nor MODELS.json names."""
    listed = listed | set(stored_models(root))
    return sorted(f for f in root.rglob("*.safetensors") if f.resolve() not in listed)


_VERIFIED: dict = {}
_MANIFESTS: dict = {}  # (path, mtime, size) -> parsed manifest: every case load reads it


def _manifest_for_load(root: Path) -> dict:
    path = root / MANIFEST_NAME
    try:
        st = path.stat()
    except OSError:
        return read_manifest(root)  # its error names the file
    key = (str(path), st.st_ino, st.st_mtime_ns, st.st_size)  # a regen replaces it: a new inode
    if key not in _MANIFESTS:
        _MANIFESTS.clear()
        _MANIFESTS[key] = read_manifest(root)
    return _MANIFESTS[key]


def _read_bytes(path: Path, what: str = "golden file") -> bytes:
    if path.is_dir():
        raise GoldenError(f"{what} {path} is a directory, expected a safetensors file")
    try:
        return path.read_bytes()
    except OSError as e:
        raise GoldenError(f"{what} {path}: cannot read it ({e.strerror or e})") from None


def load(case, root: Optional[Path] = None, check_hash: bool = True) -> dict:
    """Read a stored case (read-only). Raises GoldenError naming the file on any mismatch."""
    root = root or golden_dir()
    _refuse_pending_regen(root)
    path = case_path(case, root)
    manifest = _manifest_for_load(root)
    entry = manifest["cases"].get(case.name)
    if entry is None:
        raise GoldenError(f"case {case.name} is not in {root / MANIFEST_NAME}: run `attncheck golden regen`")
    if not path.exists():
        raise GoldenError(f"golden file {path} is missing")
    key = (str(path), entry["file_sha256"])
    if check_hash and key not in _VERIFIED:
        digest = _sha(_read_bytes(path))
        if digest != entry["file_sha256"]:
            raise GoldenError(f"golden file {path} fails its hash (sha256 {digest[:12]}..., manifest "
                              f"{entry['file_sha256'][:12]}...): {_which_tensors_differ(path, entry)}")
        _VERIFIED[key] = True
    return _read_tensors(path, entry)


def _read_tensors(path: Path, entry: dict) -> dict:
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            logical = entry["tensors"].get(name, {}).get("logical_dtype")
            if logical in _LOGICAL:
                t = t.view(_LOGICAL[logical])
            out[name] = t
    return out


def _stored_batch_problem(case, path: Path, entry: dict) -> Optional[str]:
    """A stored MHA/MLA case must hold a batch that satisfies the batch contract (impl.batch)."""
    module = case_module(case)
    if not hasattr(module, "batch_from_tensors"):
        return None
    from impl.batch import BatchError
    try:
        batch = module.batch_from_tensors(case, _read_tensors(path, entry), "cpu")
        batch.validate(allow_unordered=getattr(case, "unordered", False))
    except BatchError as e:
        return f"case {case.name}: the stored batch is invalid: {e}"
    except Exception as e:  # a missing or misshapen tensor
        return f"case {case.name}: the stored tensors do not form a batch ({type(e).__name__}: {e})"
    return None


def _which_tensors_differ(path: Path, entry: dict) -> str:
    try:
        bad = []
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            for name, info in entry["tensors"].items():
                if name not in names:
                    bad.append(f"{name} missing")
                    continue
                t = f.get_tensor(name)
                logical = info.get("logical_dtype")
                if logical in _LOGICAL:
                    t = t.view(_LOGICAL[logical])
                if tensor_sha(t) != info["sha256"]:
                    bad.append(f"tensor {name} changed")
            bad += [f"unexpected tensor {n}" for n in sorted(names - set(entry["tensors"]))]
        return "; ".join(bad) if bad else "header or metadata bytes changed"
    except Exception as e:  # a corrupt header is itself the finding
        return f"file unreadable ({type(e).__name__}: {e})"


# ---- verify ---------------------------------------------------------------------------------

def verify(root: Optional[Path] = None) -> list[str]:
    """All problems found, one line each (empty list = the store is sound). Reads only;
    `recover()` completes or discards an interrupted regen first (the CLI does both)."""
    root = root or golden_dir()
    if _no_store(root):
        return [_no_store(root)]
    problems: list[str] = []
    if (root / JOURNAL_NAME).exists():
        problems.append(f"{root / JOURNAL_NAME}: an interrupted regen is pending "
                        "(`attncheck golden verify` or the next regen completes it)")
    problems += [f"{f}: left over from an interrupted regen (`attncheck golden verify` removes it)"
                 for f in _leftovers(root)]
    try:
        manifest = _manifest_json(root)
    except GoldenError as e:
        return problems + [str(e)]
    entries = manifest["cases"]
    if list(entries) != sorted(entries):
        problems.append("manifest: cases are not sorted by name")
    expected = {c.name: c for c in stored_cases()}
    for name in sorted(set(expected) - set(entries)):
        problems.append(f"case {name}: in the catalogue but not in the manifest (run `attncheck golden regen`)")
    for name in sorted(set(entries) - set(expected)):
        problems.append(f"case {name}: in the manifest but not in the catalogue (stale; "
                        "`attncheck golden regen --prune` removes it)")
    malformed = {n: entry_problem(n, e) for n, e in entries.items() if entry_problem(n, e)}
    problems += list(malformed.values())
    entries = {n: e for n, e in entries.items() if n not in malformed}
    for name, entry in sorted(entries.items()):
        case = expected.get(name)
        if case is not None and entry["params"] != json.loads(json.dumps(case.manifest_params())):
            problems.append(f"case {name}: manifest parameters differ from the catalogue (regenerate)")
        path = root / entry["path"]
        if not path.exists():
            problems.append(f"case {name}: file {path} is missing")
            continue
        try:
            blob = _read_bytes(path)
        except GoldenError as e:
            problems.append(f"case {name}: {e}")
            continue
        if _sha(blob) != entry["file_sha256"]:
            problems.append(f"case {name}: {path} fails its hash: {_which_tensors_differ(path, entry)}")
            continue
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("attncheck", "{}"))
        if meta.get("case_id") != name:
            problems.append(f"case {name}: file metadata names case {meta.get('case_id')!r}")
        elif case is not None and (batch_problem := _stored_batch_problem(case, path, entry)):
            problems.append(batch_problem)
    try:
        models = stored_models(root)
    except GoldenError as e:
        return problems + [str(e)]
    for path, sha in sorted(models.items()):
        if not path.is_file() or _sha(path.read_bytes()) != sha:
            problems.append(f"model {path}: missing or fails its sha256 in golden/models/MODELS.json")
    for f in _stray_files(root, {(root / e["path"]).resolve() for e in entries.values()}):
        problems.append(f"orphan golden file {f} (not in the manifest; `attncheck golden regen --prune` "
                        "deletes it)")
    return problems


# ---- regen: all or nothing ------------------------------------------------------------------
#
# A regen stages every new file beside its target (".<name>.staged"), then commits by writing
# one journal file atomically: the list of renames (staged -> target, the manifest last) and
# deletions. Before the journal exists an interruption leaves the old store plus staged files,
# which `recover` discards; once it exists, `recover` finishes the renames and deletions. Either
# way the store ends as the old one or the new one, never a mix (tests/test_golden_integrity.py
# kills a regen after each of its file operations to prove it).

JOURNAL_NAME = ".regen-journal.json"
_STAGED_SUFFIX = ".staged"


def _leftovers(root: Path) -> list[Path]:
    """Staged files and temp files of an interrupted regen (hidden names only we create)."""
    return sorted(f for pattern in (f".*{_STAGED_SUFFIX}", ".*.tmp") for f in root.rglob(pattern)
                  if f.is_file() and f.name != JOURNAL_NAME)


def _write_and_close(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd``, flush it to disk, close it. Plain ``os.write`` calls so
    that the kill-injection test sees (and kills after) every single write."""
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new_file(path: Path, data: bytes) -> None:
    """Create ``path`` (must not exist) with ``data``, flushed to disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_and_close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), data)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write one file atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        _write_and_close(fd, data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; goldens are shared read-only data
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _apply_journal(root: Path, journal: dict) -> int:
    """Finish a committed regen; idempotent (a step already done is skipped)."""
    done = 0
    for staged, target in journal["renames"]:
        if (root / staged).exists():
            os.replace(root / staged, root / target)
            done += 1
    for rel in journal["deletes"]:
        if (root / rel).is_file():
            os.unlink(root / rel)
            done += 1
    os.unlink(root / JOURNAL_NAME)
    return done


def _read_journal(root: Path) -> dict:
    path = root / JOURNAL_NAME
    try:
        journal = json.loads(path.read_bytes().decode("utf-8"))
        ok = isinstance(journal, dict) and all(
            isinstance(journal.get(k), list) for k in ("renames", "deletes"))
        ok = ok and all(isinstance(r, list) and len(r) == 2 for r in journal["renames"])
        paths = [p for r in journal["renames"] for p in r] + journal["deletes"] if ok else []
        ok = ok and all(isinstance(p, str) and not Path(p).is_absolute() and ".." not in Path(p).parts
                        for p in paths)
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise GoldenError(f"{path} is not a regen journal; restore the golden store from version control "
                          "and delete the journal")
    return journal


def _refuse_pending_regen(root: Path) -> None:
    if (root / JOURNAL_NAME).exists():
        raise GoldenError(f"{root}: an interrupted regen is pending; run `attncheck golden verify` to complete it")


def recover(root: Optional[Path] = None) -> list[str]:
    """Complete a committed but interrupted regen, or discard an uncommitted one.
    Returns what was done (empty: nothing to do; a read-only store is never locked then)."""
    root = root or golden_dir()
    if not root.is_dir() or not ((root / JOURNAL_NAME).exists() or _leftovers(root)):
        return []
    if (root / JOURNAL_NAME).exists():
        _read_journal(root)  # a damaged journal: refuse before touching anything (not even the lock)
    from filelock import FileLock
    with FileLock(str(root / ".lock")):
        return _recover_locked(root)


def _recover_locked(root: Path) -> list[str]:
    actions = []
    if (root / JOURNAL_NAME).exists():
        n = _apply_journal(root, _read_journal(root))
        actions.append(f"completed an interrupted regen ({n} file operations were left to do)")
    for f in _leftovers(root):
        os.unlink(f)
        actions.append(f"discarded {f} (from an interrupted regen that never committed)")
    return actions


def _diff_line(name: str, old_entry: Optional[dict], new_entry: dict, old_path: Path, new_tensors: dict) -> str:
    if old_entry is None:
        return f"  new        {name} ({new_entry['size_bytes'] / 1024:.0f} KiB)"
    if old_entry.get("file_sha256") == new_entry["file_sha256"]:
        return f"  unchanged  {name}"
    changed = [k for k, v in new_entry["tensors"].items() if old_entry.get("tensors", {}).get(k, {}).get("sha256") != v["sha256"]]
    detail = ", ".join(changed) if changed else "metadata"
    extra = ""
    if "expected.output" in changed and old_path.is_file():
        try:
            with safe_open(str(old_path), framework="pt") as f:
                old = f.get_tensor("expected.output")
            new = new_tensors["expected.output"]
            if old.shape == new.shape:
                extra = f"; expected.output max |new-old| = {float((new.double() - old.double()).abs().max()):.3e}"
        except Exception:
            pass
    return f"  changed    {name}: {detail}{extra}"


def _store_root(root: Optional[Path]) -> Path:
    root = root or golden_dir()
    if root.exists() and _no_store(root):  # a store that does not exist yet is created
        raise GoldenError(_no_store(root))
    return root


def regen(names: Optional[Iterable[str]] = None, root: Optional[Path] = None, out=None,
          check_only: bool = False, prune: bool = False) -> int:
    """Regenerate stored goldens, all or nothing. Returns the number of cases that changed
    (or would change). Refuses a store whose manifest it cannot read. Deletes stale case files
    and orphans only with ``prune``; otherwise says what it would delete and keeps them."""
    out = out or sys.stdout
    root = _store_root(root)
    if os.environ.get("PYTEST_XDIST_WORKER") and root.resolve() == golden_dir().resolve():
        raise GoldenError("golden regen must run in a single process, not inside a pytest-xdist worker")
    todo = stored_cases()
    if names:
        wanted = set(names)
        unknown = wanted - {c.name for c in todo}
        if unknown:
            raise GoldenError(f"--case: unknown stored case(s) {sorted(unknown)}; `attncheck cases` lists them")
        todo = [c for c in todo if c.name in wanted]
    if check_only:
        _refuse_pending_regen(root)
        return _regenerate(todo, bool(names), root, out, True, prune)
    # Refuse an unreadable store before touching anything (not even the lock).
    if (root / JOURNAL_NAME).exists():
        _read_journal(root)
    elif (root / MANIFEST_NAME).exists():
        read_manifest(root)
    from filelock import FileLock
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(root / ".lock"))
        lock.acquire()
    except OSError as e:
        raise GoldenError(f"golden dir {root}: cannot lock it for writing ({e.strerror or e})") from None
    try:
        for action in _recover_locked(root):
            print(f"  {action}", file=out)
        return _regenerate(todo, bool(names), root, out, False, prune)
    finally:
        lock.release()


def _regenerate(todo: list, partial: bool, root: Path, out, check_only: bool, prune: bool) -> int:
    manifest_path = root / MANIFEST_NAME
    if manifest_path.exists() or manifest_path.is_symlink():
        old_entries = read_manifest(root)["cases"]  # unreadable: GoldenError, nothing touched
    else:
        old_entries = {}  # a new store
    new_entries = dict(old_entries) if partial else {}
    blobs = {}
    changed = 0
    prov = provenance()
    for case in sorted(todo, key=lambda c: c.name):
        first = generate(case)
        blob1, entry = serialize(case, first)
        second = generate(case)
        blob2, entry2 = serialize(case, second)
        if blob1 != blob2:
            differ = [k for k in entry["tensors"] if entry2["tensors"].get(k, {}).get("sha256") != entry["tensors"][k]["sha256"]]
            raise GoldenError(f"case {case.name}: two generations differ byte-wise in {differ or 'metadata'} "
                              "(non-deterministic generator); nothing was written")
        entry["provenance"] = prov
        entry["rule"] = case_module(case).rule_factors(case)
        line = _diff_line(case.name, old_entries.get(case.name), entry, case_path(case, root), first)
        print(line, file=out)
        if not line.lstrip().startswith("unchanged"):
            changed += 1
        blobs[entry["path"]] = blob1
        new_entries[case.name] = entry

    # What a full regen leaves behind: cases no longer in the catalogue, and case files that no
    # manifest entry names. Deleted only with --prune; a file written in this run is never here.
    stale = sorted(set(old_entries) - set(new_entries)) if not partial else []
    keep = {**new_entries, **({} if prune else {n: old_entries[n] for n in stale})}
    listed = {(root / e["path"]).resolve() for e in {**new_entries, **old_entries}.values()}
    stale_files = [root / old_entries[n]["path"] for n in stale if (root / old_entries[n]["path"]).is_file()]
    orphans = _stray_files(root, listed)
    for name in stale:
        print(f"  {'removed   ' if prune else 'stale     '} {name} (not in the catalogue)", file=out)
    if prune or check_only:  # without --prune a regen leaves them as they are
        changed += len(stale) + len(orphans)
    verb = "would delete" if check_only or not prune else "delete"
    for f in stale_files + orphans:
        why = "stale case" if f in stale_files else "orphan: in no manifest entry"
        print(f"  {verb} {f} ({why}{'' if prune else '; pass --prune to delete it'})", file=out)
    if check_only:
        return changed

    to_delete = [f.relative_to(root).as_posix() for f in stale_files + orphans] if prune else []
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "reference_version": REFERENCE_VERSION,
        "conventions": CONVENTIONS,
        "regenerate_with": "attncheck golden regen",
        "cases": {k: keep[k] for k in sorted(keep)},
    }
    manifest_bytes = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    wanted = {**blobs, MANIFEST_NAME: manifest_bytes}  # the manifest last: dicts keep insertion order
    for rel in wanted:
        if (root / rel).exists() and not (root / rel).is_file():
            raise GoldenError(f"{root / rel} is not a regular file; move it away (nothing was written)")
    writes = {rel: data for rel, data in wanted.items()
              if not (root / rel).is_file() or _read_bytes(root / rel) != data}
    if not writes and not to_delete:
        return changed
    renames = []
    try:
        for rel, data in writes.items():
            target = Path(rel)
            staged = target.parent / f".{target.name}{_STAGED_SUFFIX}"
            renames.append([staged.as_posix(), target.as_posix()])
            _write_new_file(root / staged, data)
    except BaseException:
        for staged, _ in renames:
            if (root / staged).exists():
                os.unlink(root / staged)
        raise
    # The commit point: once the journal exists the regen will be completed, before it nothing changed.
    journal = {"renames": renames, "deletes": to_delete}
    _atomic_write(root / JOURNAL_NAME, json.dumps(journal, indent=1).encode())
    _apply_journal(root, journal)
    return changed
