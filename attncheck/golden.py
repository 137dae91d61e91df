"""The golden store: one safetensors file per case plus ``golden/MANIFEST.json``.

* ``regen`` (single process) generates every stored case twice and requires identical bytes,
  prints a per-case diff against what is on disk, and writes files and manifest atomically
  (temp file + ``os.replace``) under a file lock. Nothing is ever half-written.
* ``verify`` checks the manifest schema, every file's and every tensor's sha256, that no file
  is missing or orphaned, and that the manifest matches the catalogue.
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
              "error per row (max over the head dim)",
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

def read_manifest(root: Optional[Path] = None) -> dict:
    root = root or golden_dir()
    path = root / MANIFEST_NAME
    if not path.exists():
        raise GoldenError(f"{path} is missing: run `attncheck golden regen`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise GoldenError(f"{path} is not valid JSON: {e}") from None


_VERIFIED: dict = {}
_MANIFESTS: dict = {}  # (path, mtime, size) -> parsed manifest: every case load reads it


def _manifest_for_load(root: Path) -> dict:
    path = root / MANIFEST_NAME
    try:
        st = path.stat()
    except OSError:
        return read_manifest(root)  # its error names the file
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _MANIFESTS:
        _MANIFESTS.clear()
        _MANIFESTS[key] = read_manifest(root)
    return _MANIFESTS[key]


def load(case, root: Optional[Path] = None, check_hash: bool = True) -> dict:
    """Read a stored case (read-only). Raises GoldenError naming the file on any mismatch."""
    root = root or golden_dir()
    path = case_path(case, root)
    manifest = _manifest_for_load(root)
    entry = manifest.get("cases", {}).get(case.name)
    if entry is None:
        raise GoldenError(f"case {case.name} is not in {root / MANIFEST_NAME}: run `attncheck golden regen`")
    if not path.exists():
        raise GoldenError(f"golden file {path} is missing")
    key = (str(path), entry["file_sha256"])
    if check_hash and key not in _VERIFIED:
        digest = _sha(path.read_bytes())
        if digest != entry["file_sha256"]:
            raise GoldenError(f"golden file {path} fails its hash (sha256 {digest[:12]}..., manifest "
                              f"{entry['file_sha256'][:12]}...): {_which_tensors_differ(path, entry)}")
        _VERIFIED[key] = True
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            logical = entry["tensors"].get(name, {}).get("logical_dtype")
            if logical in _LOGICAL:
                t = t.view(_LOGICAL[logical])
            out[name] = t
    return out


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

_ENTRY_KEYS = {"kind", "tier", "family", "path", "file_sha256", "size_bytes", "params", "tensors", "provenance",
               "rule"}


def stored_models(root: Path) -> dict:
    """Spot-check model weights under golden/models/ (not cases): path -> sha256 from its MODELS.json."""
    index = root / "models" / "MODELS.json"
    if not index.exists():
        return {}
    return {(index.parent / rel).resolve(): e["sha256"] for rel, e in json.loads(index.read_text()).items()}


def verify(root: Optional[Path] = None) -> list[str]:
    """All problems found (empty list = the store is sound)."""
    root = root or golden_dir()
    problems: list[str] = []
    try:
        manifest = read_manifest(root)
    except GoldenError as e:
        return [str(e)]
    for key in ("schema_version", "reference_version", "conventions", "cases"):
        if key not in manifest:
            problems.append(f"manifest: missing top-level key {key!r}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"manifest: schema_version {manifest.get('schema_version')} != {SCHEMA_VERSION}")
    entries = manifest.get("cases", {})
    if list(entries) != sorted(entries):
        problems.append("manifest: cases are not sorted by name")
    expected = {c.name: c for c in stored_cases()}
    for name in sorted(set(expected) - set(entries)):
        problems.append(f"case {name}: in the catalogue but not in the manifest (run `attncheck golden regen`)")
    for name in sorted(set(entries) - set(expected)):
        problems.append(f"case {name}: in the manifest but not in the catalogue (stale; run `attncheck golden regen`)")
    for name, entry in sorted(entries.items()):
        missing = _ENTRY_KEYS - set(entry)
        if missing:
            problems.append(f"case {name}: manifest entry lacks {sorted(missing)}")
            continue
        case = expected.get(name)
        if case is not None and entry["params"] != json.loads(json.dumps(case.manifest_params())):
            problems.append(f"case {name}: manifest parameters differ from the catalogue (regenerate)")
        path = root / entry["path"]
        if not path.exists():
            problems.append(f"case {name}: file {path} is missing")
            continue
        blob = path.read_bytes()
        if _sha(blob) != entry["file_sha256"]:
            problems.append(f"case {name}: {path} fails its hash: {_which_tensors_differ(path, entry)}")
            continue
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("attncheck", "{}"))
        if meta.get("case_id") != name:
            problems.append(f"case {name}: file metadata names case {meta.get('case_id')!r}")
    models = stored_models(root)
    for path, sha in sorted(models.items()):
        if not path.exists() or _sha(path.read_bytes()) != sha:
            problems.append(f"model {path}: missing or fails its sha256 in golden/models/MODELS.json")
    listed = {(root / e["path"]).resolve() for e in entries.values() if "path" in e} | set(models)
    for f in sorted(root.rglob("*.safetensors")):
        if f.resolve() not in listed:
            problems.append(f"orphan golden file {f} (not in the manifest)")
    return problems


# ---- regen ----------------------------------------------------------------------------------

def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; goldens are shared read-only data
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _diff_line(name: str, old_entry: Optional[dict], new_entry: dict, old_path: Path, new_tensors: dict) -> str:
    if old_entry is None:
        return f"  new        {name} ({new_entry['size_bytes'] / 1024:.0f} KiB)"
    if old_entry.get("file_sha256") == new_entry["file_sha256"]:
        return f"  unchanged  {name}"
    changed = [k for k, v in new_entry["tensors"].items() if old_entry.get("tensors", {}).get(k, {}).get("sha256") != v["sha256"]]
    detail = ", ".join(changed) if changed else "metadata"
    extra = ""
    if "expected.output" in changed and old_path.exists():
        try:
            with safe_open(str(old_path), framework="pt") as f:
                old = f.get_tensor("expected.output")
            new = new_tensors["expected.output"]
            if old.shape == new.shape:
                extra = f"; expected.output max |new-old| = {float((new.double() - old.double()).abs().max()):.3e}"
        except Exception:
            pass
    return f"  changed    {name}: {detail}{extra}"


def regen(names: Optional[Iterable[str]] = None, root: Optional[Path] = None, out=None,
          check_only: bool = False) -> int:
    """Regenerate stored goldens. Returns the number of cases that changed."""
    out = out or sys.stdout
    root = root or golden_dir()
    if os.environ.get("PYTEST_XDIST_WORKER") and root.resolve() == golden_dir().resolve():
        raise GoldenError("golden regen must run in a single process, not inside a pytest-xdist worker")
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    todo = stored_cases()
    if names:
        wanted = set(names)
        unknown = wanted - {c.name for c in todo}
        if unknown:
            raise GoldenError(f"unknown stored case(s): {sorted(unknown)}")
        todo = [c for c in todo if c.name in wanted]
    with FileLock(str(root / ".lock")):
        try:
            old_manifest = read_manifest(root)
        except GoldenError:
            old_manifest = {"cases": {}}
        old_entries = old_manifest.get("cases", {})
        new_entries = dict(old_entries) if names else {}
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
            blobs[case.name] = (case, blob1)
            new_entries[case.name] = entry
        removed = sorted(set(old_entries) - set(new_entries)) if not names else []
        for name in removed:
            print(f"  removed    {name}", file=out)
            changed += 1
        if check_only:
            return changed
        for name, (case, blob) in blobs.items():
            path = case_path(case, root)
            if not path.exists() or _sha(path.read_bytes()) != new_entries[name]["file_sha256"]:
                _atomic_write(path, blob)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "reference_version": REFERENCE_VERSION,
            "conventions": CONVENTIONS,
            "regenerate_with": "attncheck golden regen",
            "cases": {k: new_entries[k] for k in sorted(new_entries)},
        }
        _atomic_write(root / MANIFEST_NAME, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
        for name in removed:
            p = root / old_entries[name].get("path", "")
            if p.is_file():
                p.unlink()
        listed = {(root / e["path"]).resolve() for e in new_entries.values()} | set(stored_models(root))
        for f in root.rglob("*.safetensors"):
            if f.resolve() not in listed:
                print(f"  orphan removed: {f}", file=out)
                f.unlink()
    return changed
