"""Repro bundles: one failing (or erroring) verdict as one self-contained safetensors file.

Tensor names inside a bundle (docs/debugging.md has the full table):

* the golden names, exactly as ``run_backend(..., tensors=...)`` takes them: the batch inputs
  (``query``, ``key_cache`` as BEFORE the run, ``block_table``, ...; MLA ``q_nope``, ``kv_cache``,
  ...), ``expected.*`` (float64 reference stored as float32) and ``budget.*``;
* ``actual.output``, ``actual.lse`` and ``actual.<cache>`` (the caches AFTER the run), when the
  backend returned at all.

fp8 tensors are stored as their raw bytes (uint8) and the logical dtype is recorded in the
metadata, as in the golden store. The metadata is one key, ``attncheck``, holding sorted JSON:
format/version, backend, provider, case kind and parameters, device, versions, the verdict
(status, reason, report, failing rows) and the logical dtypes. Nothing is pickled: a bundle is
read with ``safetensors`` alone.
"""

from __future__ import annotations

import dataclasses
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from attncheck import golden

FORMAT = "attncheck-bundle"
VERSION = 1
ACTUAL = "actual."


class BundleError(ValueError):
    """A bundle (or dump) that cannot be read or does not hold what its metadata says."""


@dataclass
class Bundle:
    case: object  # MHACase / MLACase rebuilt from the stored parameters
    tensors: dict  # inputs + expected.* + budget.* (what run_backend(tensors=...) takes)
    actual: dict = field(default_factory=dict)  # "output", "lse", cache field names -> tensors
    meta: dict = field(default_factory=dict)

    @property
    def backend(self) -> str:
        return self.meta.get("backend", "")

    @property
    def verdict(self) -> dict:
        return self.meta.get("verdict", {})


# ---- cases from their parameters ------------------------------------------------------------

def _case_classes() -> dict:
    from attncheck import cases
    mla = getattr(cases, "MLACase", None)
    if mla is None:  # the MLA record lives beside its generator in this version of the catalogue
        from attncheck.mla_case import MLACase as mla
    return {"MHA": cases.MHACase, "MLA": mla}


def case_class(kind: str):
    classes = _case_classes()
    if kind not in classes:
        raise BundleError(f"case kind {kind!r}: expected one of {sorted(classes)}")
    return classes[kind]


def case_spec(case) -> dict:
    return {"kind": case.kind, "params": json.loads(json.dumps(case.manifest_params()))}


def case_from_spec(spec: dict):
    """Rebuild a case object from ``case_spec``'s output (lists back to tuples)."""
    kind = spec.get("kind")
    cls = case_class(kind)
    params = spec.get("params", {})
    kw = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name not in params:
            continue
        value = params[f.name]
        kw[f.name] = tuple(value) if isinstance(value, list) else value
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise BundleError(f"case parameters do not form a {kind} case: {e}") from None


# ---- writing ----------------------------------------------------------------------------------

def versions() -> dict:
    from attncheck import runtime
    out = {**golden.provenance(), **runtime.environment()}
    try:
        from importlib.metadata import version
        out["attncheck"] = version("attncheck")
    except Exception:
        out["attncheck"] = None
    return out


def device_description(device) -> str:
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return f"{dev.type} ({platform.machine()})"


def to_bytes(tensors: dict, meta: dict) -> bytes:
    """safetensors bytes; fp8 as uint8 with the logical dtype added to ``meta['dtypes']``."""
    stored, dtypes = {}, {}
    for name, t in sorted(tensors.items()):
        if t is None:
            continue
        t = t.detach().cpu().contiguous()
        if t.dtype in golden._LOGICAL.values():
            dtypes[name] = golden._dtype_name(t.dtype)
        stored[name] = golden._storable(t)
    meta = dict(meta, dtypes=dtypes)
    return st_save(stored, metadata={"attncheck": json.dumps(meta, sort_keys=True, default=str)})


def write(path, tensors: dict, meta: dict) -> Path:
    """Write atomically (temp file + rename): a reader never sees half a file."""
    path = Path(path)
    golden._atomic_write(path, to_bytes(tensors, meta))
    return path


def bundle_name(backend: str, case: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{backend}__{case}")
    return f"{safe}.safetensors"


def actual_of(verdict) -> dict:
    """What the backend returned ("output", "lse", caches after the run by field name), from a
    verdict run with ``keep_artifacts=True``; empty when it raised before returning."""
    art = getattr(verdict, "artifacts", None) or {}
    out = {name: art[name] for name in ("output", "lse") if art.get(name) is not None}
    out.update(art.get("caches") or {})
    return out


def from_verdict(verdict, backend, case, device, tensors: Optional[dict] = None) -> tuple[dict, dict]:
    """Tensors and metadata of a bundle for a verdict produced with ``keep_artifacts=True``."""
    from attncheck import harness

    if tensors is None:  # the artifacts hold the inputs only; expected values and budgets are the case's
        tensors = harness.golden_tensors(case, "cpu")
    out = dict(tensors)
    out.update({ACTUAL + name: t for name, t in actual_of(verdict).items()})
    meta = {
        "format": FORMAT, "version": VERSION,
        "backend": verdict.backend,
        "provider": getattr(verdict, "provider", "") or getattr(backend, "provider", "") or "",
        "case": case_spec(case), "device": device_description(device), "versions": versions(),
        "verdict": verdict.as_dict(),
    }
    return out, meta


def save_verdict(directory, verdict, backend, case, device, tensors: Optional[dict] = None) -> Path:
    """Write a failing or erroring verdict's bundle into ``directory``; returns the path.
    Called where the verdict is produced (a pytest-xdist worker, the replay command).
    ``case`` is a case object or a catalogue name; ``backend`` may be None."""
    if isinstance(case, str):
        from attncheck.cases import get_case
        case = get_case(case)
    tensors_out, meta = from_verdict(verdict, backend, case, device, tensors)
    return write(Path(directory) / bundle_name(verdict.backend, case.name), tensors_out, meta)


# ---- reading ----------------------------------------------------------------------------------

def read_raw(path) -> tuple[dict, dict]:
    """(tensors with fp8 restored, metadata) of any attncheck safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = (f.metadata() or {}).get("attncheck")
            if raw_meta is None:
                raise BundleError(f"{path}: no 'attncheck' metadata (not an attncheck bundle or dump)")
            meta = json.loads(raw_meta)
            dtypes = meta.get("dtypes", {})
            tensors = {}
            for name in f.keys():
                t = f.get_tensor(name)
                if name in dtypes:
                    if dtypes[name] not in golden._LOGICAL:
                        raise BundleError(f"{path}: tensor {name} has unknown logical dtype {dtypes[name]!r}")
                    t = t.view(golden._LOGICAL[dtypes[name]])
                tensors[name] = t
    except (SafetensorError, OSError) as e:
        raise BundleError(f"{path}: not a readable safetensors file ({e})") from None
    except json.JSONDecodeError as e:
        raise BundleError(f"{path}: metadata is not valid JSON ({e})") from None
    return tensors, meta


def read(path) -> Bundle:
    tensors, meta = read_raw(path)
    if meta.get("format") != FORMAT:
        raise BundleError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}"
                          + (" (a dump: use `attncheck check-dump`)" if meta.get("format") == "attncheck-dump" else ""))
    if meta.get("version") != VERSION:
        raise BundleError(f"{path}: bundle version {meta.get('version')}, this attncheck reads version {VERSION}")
    case = case_from_spec(meta.get("case", {}))
    actual = {k[len(ACTUAL):]: v for k, v in tensors.items() if k.startswith(ACTUAL)}
    inputs = {k: v for k, v in tensors.items() if not k.startswith(ACTUAL)}
    missing = [k for k in ("expected.output", "budget.pt_err_row", "query_start_loc", "seq_lens") if k not in inputs]
    if missing:
        raise BundleError(f"{path}: bundle lacks tensors {missing}")
    return Bundle(case=case, tensors=inputs, actual=actual, meta=meta)
