"""Ways to damage a copy of the golden store, shared by the golden-integrity and bad-input tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from attncheck import cases, golden


def copy_store(dest: Path) -> Path:
    shutil.copytree(golden.golden_dir(), dest, ignore=shutil.ignore_patterns(".lock"))
    return dest


def files(root: Path) -> dict:
    """Every file under ``root`` with its bytes (hidden ones too: staged, journal, temp)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:300])


def _edit(path: Path, change) -> None:
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _first_entry(manifest: dict) -> dict:
    return manifest["cases"][sorted(manifest["cases"])[0]]


MANIFEST_DAMAGE = {
    "truncated": _truncate,
    "random-bytes": lambda p: p.write_bytes(bytes(range(256)) * 4),
    "a-list": lambda p: p.write_text("[]"),
    "cases-a-list": lambda p: p.write_text('{"cases": []}'),
    "full-manifest-cases-a-list": lambda p: _edit(p, lambda m: m.update(cases=[])),
    "wrong-schema": lambda p: _edit(p, lambda m: m.update(schema_version=99)),
    "entry-without-path": lambda p: _edit(p, lambda m: m["cases"].update(x={"kind": "MHA"})),
    "path-outside-the-store": lambda p: _edit(p, lambda m: _first_entry(m).update(path="../../etc/passwd")),
    "sha-not-hex": lambda p: _edit(p, lambda m: _first_entry(m).update(file_sha256="abc")),
    "a-directory": lambda p: (p.unlink(), p.mkdir()),
}


def rewrite_case(root: Path, name: str, mutate) -> None:
    """Change a stored case's tensors and re-hash it in the manifest, so the store is
    consistent and only the content is wrong (e.g. a batch that breaks the batch contract)."""
    case = cases.get_case(name)
    tensors = golden.load(case, root)
    mutate(tensors)
    blob, entry = golden.serialize(case, tensors)
    golden.case_path(case, root).write_bytes(blob)
    manifest_path = root / golden.MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["cases"][name].update({k: entry[k] for k in ("file_sha256", "size_bytes", "tensors")})
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
