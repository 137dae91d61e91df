"""Tensors captured from a real run: the dump format, capture helpers, and ``check_dump``.

A dump is one safetensors file (no pickle) holding ONE attention call (docs/debugging.md):

    query [T, Hq, D], key / value [T, Hkv, D]            the call's new tokens (model dtype)
    key_cache / value_cache [n, bs, Hkv, D]  (NHD)       the blocks the batch reads, BEFORE the call
    key_cache_after / value_cache_after                  the same blocks AFTER the call (optional)
    block_table [B, m] int32, query_start_loc [B+1] int32, seq_lens [B] int32, slot_mapping [T] int64
    alibi_slopes [Hq] / sinks [Hq] float32               (optional knobs)
    output [T, Hq, D]                                    what the kernel returned
    lse [Hq, T] float32                                  (optional; natural log)

MLA dumps use the MLA batch's names instead (``q_nope``, ``q_pe``, ``kv_c``, ``k_pe``,
``kv_cache``, ``kv_cache_after``, ``w_uk``, ``w_uv``). The caches hold only the blocks the
batch uses, renumbered in order of first use, plus one NaN-poisoned block that the block-table
padding points at, so a dump of a call into a many-GB vLLM cache stays small. fp8 caches are
stored as raw bytes (uint8) with the logical dtype recorded.

The metadata key ``attncheck`` holds JSON: ``format`` "attncheck-dump", ``version`` 1, ``kind``
("MHA"/"MLA"), ``knobs`` (scale, causal, sliding_window in keys including the query's own,
softcap or null, kv_cache_dtype, k_scale, v_scale; MLA: kv_scale), ``cache_written_before``
(true when the BEFORE caches already hold the new tokens, e.g. captured after vLLM's separate
cache update), ``backend`` and ``source`` (free text), ``dtypes`` (the logical fp8 dtypes).

``check_dump`` rebuilds a case from those shapes and knobs, computes the float64 reference and
the budgets with the case kind's golden builder (``attncheck.debug.oracle``), and judges the
recorded output through the one case runner (``harness.run_backend``), so the report is the
one ``verify`` prints.

Capture:

* ``capture(path, **batch_and_knobs)``: a context manager around any attention call; the caches
  are snapshotted on entry and on exit, ``cap.record(output, lse)`` gives the result.
* ``CapturingBackend(backend, directory)``: any attncheck backend, dumping every call.
* ``capture_vllm_forward(impl, directory)``: wraps a vLLM attention impl's ``forward(layer,
  query, key, value, kv_cache, attn_metadata, output=...)`` (NHD caches: TRITON_ATTN,
  ROCM_AITER_UNIFIED_ATTN, ROCM_AITER_FA, FLEX_ATTENTION) and dumps its first calls.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Optional

import torch

from attncheck import harness
from attncheck.cases import DTYPES
from attncheck.debug import bundle as bundle_mod
from attncheck.debug import oracle
from impl.backend import Availability, BackendOutput, BlockSizes, Capabilities
from impl.batch import FP8_DTYPES

FORMAT = "attncheck-dump"
VERSION = 1
AFTER = "_after"
TOKEN_TENSORS = {"MHA": ("query", "key", "value"), "MLA": ("q_nope", "q_pe", "kv_c", "k_pe")}
CACHES = {"MHA": ("key_cache", "value_cache"), "MLA": ("kv_cache",)}
EXTRA = {"MHA": ("alibi_slopes", "sinks"), "MLA": ("w_uk", "w_uv")}
INDEX = ("block_table", "query_start_loc", "seq_lens", "slot_mapping")
MHA_KNOBS = ("scale", "causal", "sliding_window", "softcap", "kv_cache_dtype", "k_scale", "v_scale")
MLA_KNOBS = ("scale", "kv_cache_dtype", "kv_scale")


class DumpError(ValueError):
    """A dump (or a capture request) that does not hold what the format needs."""


# ---- compaction: only the blocks the batch reads --------------------------------------------------

class _Compactor:
    """Maps the blocks a batch uses onto a small cache: used blocks renumbered in order of first
    use, then one NaN-poisoned block that the block-table padding points at."""

    def __init__(self, block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int):
        self.block_size = block_size
        bt = block_table.detach().cpu().long()
        slens = seq_lens.detach().cpu().tolist()
        used, self.rows = [], []
        index = {}
        for b, s in enumerate(slens):
            n = -(-int(s) // block_size)
            if n > bt.shape[1]:
                raise DumpError(f"block_table: sequence {b} needs {n} blocks of {block_size}, the table has {bt.shape[1]}")
            row = []
            for blk in bt[b, :n].tolist():
                if blk not in index:
                    index[blk] = len(used)
                    used.append(blk)
                row.append(index[blk])
            self.rows.append(row)
        self.used = torch.tensor(used, dtype=torch.long)
        self.index = index
        self.poison = len(used)

    def cache(self, cache: torch.Tensor) -> torch.Tensor:
        if len(self.used) and int(self.used.max()) >= cache.shape[0]:
            raise DumpError(f"block_table: block {int(self.used.max())} is outside the cache of {cache.shape[0]} blocks")
        picked = cache.detach()[self.used.to(cache.device)].cpu().clone()
        pad = torch.full((1, *cache.shape[1:]), float("nan"), dtype=torch.float32).to(cache.dtype)
        return torch.cat([picked, pad])

    def block_table(self) -> torch.Tensor:
        width = max(len(r) for r in self.rows) + 1  # one padding column, as the goldens have
        bt = torch.full((len(self.rows), width), self.poison, dtype=torch.int32)
        for b, row in enumerate(self.rows):
            bt[b, :len(row)] = torch.tensor(row, dtype=torch.int32)
        return bt

    def slot_mapping(self, slot_mapping: torch.Tensor) -> torch.Tensor:
        slots = slot_mapping.detach().cpu().long()
        if len(slots) and int(slots.min()) < 0:
            raise DumpError("slot_mapping: holds negative (padding) slots; pass only the call's real tokens "
                            "(vLLM: slice to attn_metadata.num_actual_tokens)")
        blocks, offsets = slots // self.block_size, slots % self.block_size
        try:
            new = torch.tensor([self.index[int(b)] for b in blocks.tolist()], dtype=torch.long)
        except KeyError as e:
            raise DumpError(f"slot_mapping: a new token maps to block {e.args[0]}, which no sequence's "
                            "block-table entries use") from None
        return new * self.block_size + offsets


def _dtype_name(dtype: torch.dtype) -> str:
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise DumpError(f"model dtype {dtype} is not one of {sorted(DTYPES)}")


def _kv_cache_dtype_name(cache: torch.Tensor, declared: str) -> str:
    for name, dt in FP8_DTYPES.items():
        if cache.dtype == dt:
            return name
    if declared not in ("auto", None):
        raise DumpError(f"kv_cache_dtype: {declared!r} declared, but the cache has dtype {cache.dtype} "
                        "(pass fp8 caches viewed as their fp8 dtype)")
    return "auto"


# ---- capture ----------------------------------------------------------------------------------------

class capture:
    """Context manager around ONE attention call; writes a dump on exit.

        with capture("call.safetensors", kind="MHA", query=q, key=k, value=v,
                     key_cache=kc, value_cache=vc, block_table=bt, query_start_loc=qsl,
                     seq_lens=sl, slot_mapping=sm, scale=s) as cap:
            out = my_attention(...)
            cap.record(out, lse=None)

    The caches are snapshotted (only the blocks the batch reads) on entry and again on exit.
    ``cache_written_before=True`` says the caches given already hold the new tokens.
    """

    def __init__(self, path, *, kind: str = "MHA", backend: str = "", source: str = "",
                 cache_written_before: bool = False, **tensors_and_knobs):
        if kind not in TOKEN_TENSORS:
            raise DumpError(f"kind: expected 'MHA' or 'MLA', got {kind!r}")
        self.path, self.kind = Path(path), kind
        self.meta = {"backend": backend, "source": source, "cache_written_before": bool(cache_written_before)}
        names = TOKEN_TENSORS[kind] + CACHES[kind] + INDEX
        missing = [n for n in names if tensors_and_knobs.get(n) is None]
        if missing:
            raise DumpError(f"capture: missing {', '.join(missing)}")
        self.live = {n: tensors_and_knobs.pop(n) for n in names}
        self.extra = {n: tensors_and_knobs.pop(n) for n in EXTRA[kind] if tensors_and_knobs.get(n) is not None}
        for n in EXTRA[kind]:
            tensors_and_knobs.pop(n, None)
        knob_names = MHA_KNOBS if kind == "MHA" else MLA_KNOBS
        unknown = sorted(set(tensors_and_knobs) - set(knob_names))
        if unknown:
            raise DumpError(f"capture: unknown argument(s) {unknown}; knobs are {list(knob_names)}")
        if "scale" not in tensors_and_knobs:
            raise DumpError("capture: scale is required (the softmax scale the call used)")
        self.knobs = tensors_and_knobs
        first_cache = self.live[CACHES[kind][0]]
        self.compactor = _Compactor(self.live["block_table"], self.live["seq_lens"], int(first_cache.shape[1]))
        self.before = {n: self.compactor.cache(self.live[n]) for n in CACHES[kind]}
        self.result: Optional[tuple] = None

    def __enter__(self):
        return self

    def record(self, output: torch.Tensor, lse: Optional[torch.Tensor] = None) -> None:
        self.result = (output.detach().cpu().clone(), None if lse is None else lse.detach().cpu().clone())

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            return False  # the call raised: nothing to check, let the error through
        if self.result is None:
            raise DumpError(f"capture({self.path}): call cap.record(output, lse) inside the with-block")
        write_dump(self.path, self.kind, self._tensors(), self._meta())
        return False

    def _tensors(self) -> dict:
        c = self.compactor
        t = {n: self.live[n].detach().cpu().clone() for n in TOKEN_TENSORS[self.kind]}
        t.update({n: v.detach().cpu().clone() for n, v in self.extra.items()})
        t.update(self.before)
        t.update({n + AFTER: c.cache(self.live[n]) for n in CACHES[self.kind]})
        t["block_table"] = c.block_table()
        t["query_start_loc"] = self.live["query_start_loc"].detach().cpu().to(torch.int32)
        t["seq_lens"] = self.live["seq_lens"].detach().cpu().to(torch.int32)
        t["slot_mapping"] = c.slot_mapping(self.live["slot_mapping"])
        out, lse = self.result
        t["output"] = out
        if lse is not None:
            t["lse"] = lse
        return t

    def _meta(self) -> dict:
        knobs = dict(self.knobs)
        cache = self.live[CACHES[self.kind][0]]
        knobs["kv_cache_dtype"] = _kv_cache_dtype_name(cache, knobs.get("kv_cache_dtype", "auto"))
        return {**self.meta, "knobs": knobs}


def write_dump(path, kind: str, tensors: dict, meta: dict) -> Path:
    meta = {"format": FORMAT, "version": VERSION, "kind": kind, **meta, "versions": bundle_mod.versions()}
    return bundle_mod.write(path, tensors, meta)


class CapturingBackend:
    """Any attncheck backend, writing a dump of every call into ``directory``
    (``<backend>-call<N>.safetensors``); the wrapped backend's result is returned unchanged."""

    def __init__(self, backend, directory):
        self.inner = backend
        self.directory = Path(directory)
        self.name, self.kind = backend.name, backend.kind
        self.capabilities = backend.capabilities
        self.provider = getattr(backend, "provider", "")
        self.known_issues = getattr(backend, "known_issues", ())
        self.counter = itertools.count()
        self.paths: list = []

    def availability(self, device):
        return self.inner.availability(device)

    def run(self, batch) -> BackendOutput:
        path = self.directory / f"{self.name}-call{next(self.counter)}.safetensors"
        knobs = {"scale": batch.scale, "kv_cache_dtype": batch.kv_cache_dtype}
        if self.kind == "MHA":
            knobs.update(causal=batch.causal, sliding_window=batch.sliding_window, softcap=batch.softcap,
                         k_scale=batch.k_scale, v_scale=batch.v_scale)
        else:
            knobs.update(kv_scale=batch.kv_scale)
        fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)
                  if isinstance(getattr(batch, f.name), torch.Tensor)}
        with capture(path, kind=self.kind, backend=self.name, source="attncheck CapturingBackend",
                     **fields, **knobs) as cap:
            out = self.inner.run(batch)
            cap.record(out.output, out.lse)
        self.paths.append(path)
        return out


def capture_vllm_forward(impl, directory, max_calls: int = 1, name: str = ""):
    """Wrap a vLLM attention impl's ``forward`` so that its first ``max_calls`` real calls are
    dumped into ``directory``. Use inside the model runner's process, e.g. on one layer:

        from attncheck.debug.dump import capture_vllm_forward
        capture_vllm_forward(model.model.layers[3].self_attn.attn.impl, "/tmp/dumps")

    Reads vLLM's names: ``kv_cache`` [num_blocks, 2, bs, Hkv, D] (or [2, num_blocks, ...]),
    ``attn_metadata.{query_start_loc, seq_lens, block_table, slot_mapping, num_actual_tokens}``,
    ``impl.{scale, sliding_window (vLLM's (W-1, 0) tuple), logits_soft_cap (0 = none),
    alibi_slopes, sinks, kv_cache_dtype}`` and ``layer._k_scale_float/_v_scale_float``.
    Caches in other layouts (ROCM_ATTN's split x-layout) must be converted to NHD and passed to
    ``capture`` directly.
    """
    directory = Path(directory)
    inner = impl.forward
    calls = itertools.count()
    label = name or type(impl).__name__

    def forward(layer, query, key, value, kv_cache, attn_metadata, output=None, *args, **kwargs):
        if attn_metadata is None or key is None:  # profiling run, or a KV-sharing layer
            return inner(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        n = next(calls)
        if n >= max_calls:
            return inner(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        T = int(getattr(attn_metadata, "num_actual_tokens", query.shape[0]))
        key_cache, value_cache = _split_vllm_kv_cache(kv_cache)
        if str(getattr(impl, "kv_cache_dtype", "auto")).startswith("fp8"):
            fp8 = getattr(impl, "fp8_dtype", torch.float8_e4m3fn)
            key_cache, value_cache = key_cache.view(fp8), value_cache.view(fp8)
        window = getattr(impl, "sliding_window", None)
        window = None if window is None or tuple(window)[0] < 0 else int(tuple(window)[0]) + 1
        softcap = getattr(impl, "logits_soft_cap", None) or None
        q = query[:T].view(T, -1, key_cache.shape[-1])
        with capture(directory / f"{label}-call{n}.safetensors", kind="MHA", backend=label,
                     source=f"vLLM {type(impl).__name__}.forward call {n}",
                     query=q, key=key[:T].view(T, -1, key_cache.shape[-1]),
                     value=value[:T].view(T, -1, value_cache.shape[-1]),
                     key_cache=key_cache, value_cache=value_cache, block_table=attn_metadata.block_table,
                     query_start_loc=attn_metadata.query_start_loc, seq_lens=attn_metadata.seq_lens,
                     slot_mapping=attn_metadata.slot_mapping[:T], scale=float(impl.scale), causal=True,
                     sliding_window=window, softcap=softcap, alibi_slopes=getattr(impl, "alibi_slopes", None),
                     sinks=getattr(impl, "sinks", None),
                     k_scale=float(getattr(layer, "_k_scale_float", 1.0)),
                     v_scale=float(getattr(layer, "_v_scale_float", 1.0))) as cap:
            result = inner(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
            got = result if result is not None else output
            cap.record(got[:T].reshape(q.shape))
        return result

    impl.forward = forward
    return impl


def _split_vllm_kv_cache(kv_cache: torch.Tensor):
    """vLLM's combined NHD cache: [num_blocks, 2, bs, Hkv, D] (v1 Triton/FA) or [2, num_blocks, ...]."""
    if kv_cache.dim() != 5:
        raise DumpError(f"kv_cache: expected a 5-D NHD cache [num_blocks, 2, bs, Hkv, D], got shape "
                        f"{tuple(kv_cache.shape)} (convert other layouts and call capture() directly)")
    if kv_cache.shape[1] == 2:
        return kv_cache.unbind(1)
    if kv_cache.shape[0] == 2:
        return kv_cache.unbind(0)
    raise DumpError(f"kv_cache: no K/V axis of size 2 in shape {tuple(kv_cache.shape)}")


# ---- checking -------------------------------------------------------------------------------------

class RecordedBackend:
    """Plays back a dump's recorded result through the harness (the kernel already ran)."""

    kind = "MHA"

    def __init__(self, name: str, kind: str, output, lse, caches_after: dict):
        self.name, self.kind = name or "DUMP", kind
        self.output, self.lse, self.caches_after = output, lse, caches_after
        fp8 = frozenset(FP8_DTYPES)
        self.capabilities = Capabilities(block_sizes=BlockSizes(multiple_of=1), sliding_window=True, softcap=True,
                                         alibi=True, sinks=True, fp8_kv=fp8, returns_lse=lse is not None)

    def availability(self, device):
        return Availability.yes("recorded result")

    def run(self, batch) -> BackendOutput:
        for name, after in self.caches_after.items():
            getattr(batch, name).copy_(after.to(getattr(batch, name).device))
        return BackendOutput(output=self.output.to(batch.block_table.device),
                             lse=None if self.lse is None else self.lse.to(batch.block_table.device),
                             info={"kernel": "recorded in a dump"})


@dataclasses.dataclass
class Dump:
    case: object
    inputs: dict
    output: torch.Tensor
    lse: Optional[torch.Tensor]
    caches_after: dict
    meta: dict


def read_dump(path) -> Dump:
    tensors, meta = bundle_mod.read_raw(path)
    if meta.get("format") != FORMAT:
        raise DumpError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}"
                        + (" (a bundle: use `attncheck replay`)" if meta.get("format") == bundle_mod.FORMAT else ""))
    if meta.get("version") != VERSION:
        raise DumpError(f"{path}: dump version {meta.get('version')}, this attncheck reads version {VERSION}")
    kind = meta.get("kind")
    if kind not in TOKEN_TENSORS:
        raise DumpError(f"{path}: kind {kind!r}, expected 'MHA' or 'MLA'")
    need = TOKEN_TENSORS[kind] + CACHES[kind] + INDEX + ("output",) + (EXTRA["MLA"] if kind == "MLA" else ())
    missing = [n for n in need if n not in tensors]
    if missing:
        raise DumpError(f"{path}: dump lacks tensors {missing}")
    after = {n: tensors[n + AFTER] for n in CACHES[kind] if n + AFTER in tensors}
    if not after and not meta.get("cache_written_before"):
        raise DumpError(f"{path}: holds neither the caches after the call ({', '.join(n + AFTER for n in CACHES[kind])}) "
                        "nor cache_written_before=true; the cache write cannot be checked")
    inputs = {n: tensors[n] for n in TOKEN_TENSORS[kind] + CACHES[kind] + INDEX + EXTRA[kind] if n in tensors}
    inputs["slot_mapping"] = inputs["slot_mapping"].to(torch.int64)
    case = case_of(Path(path).stem, kind, inputs, meta.get("knobs", {}))
    return Dump(case, inputs, tensors["output"], tensors.get("lse"), after, meta)


def case_of(name: str, kind: str, inputs: dict, knobs: dict):
    """The case object a dump's shapes and knobs describe (what the golden builder needs)."""
    qsl = inputs["query_start_loc"].tolist()
    common = dict(name=f"dump-{name}", seq_lens=tuple(int(s) for s in inputs["seq_lens"].tolist()),
                  query_lens=tuple(qsl[i + 1] - qsl[i] for i in range(len(qsl) - 1)),
                  kv_cache_dtype=knobs.get("kv_cache_dtype", "auto"), scale=float(knobs["scale"]),
                  tier="smoke", family="adhoc")
    try:
        cls = bundle_mod.case_class(kind)
        if kind == "MHA":
            q, kc = inputs["query"], inputs["key_cache"]
            return cls(**common, num_heads=q.shape[1], num_kv_heads=kc.shape[2], head_size=q.shape[2],
                           block_size=kc.shape[1], dtype=_dtype_name(q.dtype),
                           k_scale=float(knobs.get("k_scale", 1.0)), v_scale=float(knobs.get("v_scale", 1.0)),
                           causal=bool(knobs.get("causal", True)), sliding_window=knobs.get("sliding_window"),
                           softcap=knobs.get("softcap"), alibi="alibi_slopes" in inputs, sinks="sinks" in inputs)
        qn, qp, kv = inputs["q_nope"], inputs["q_pe"], inputs["kv_cache"]
        return cls(**common, num_heads=qn.shape[1], kv_lora_rank=inputs["kv_c"].shape[1], rope_dim=qp.shape[2],
                       nope_dim=qn.shape[2], v_dim=inputs["w_uv"].shape[2], block_size=kv.shape[1],
                       dtype=_dtype_name(qn.dtype), kv_scale=float(knobs.get("kv_scale", 1.0)))
    except (TypeError, ValueError) as e:
        raise DumpError(f"dump {name}: shapes and knobs do not form a {kind} case: {e}") from None


def check_dump(path, device="cpu"):
    """(verdict, tensors, dump): the recorded result judged against the float64 reference."""
    d = read_dump(path)
    tensors = oracle.expected_and_budgets(d.case, d.inputs)
    recorded = RecordedBackend(d.meta.get("backend") or "DUMP", d.case.kind, d.output, d.lse, d.caches_after)
    verdict = harness.run_backend(recorded, d.case, device=device, tensors=tensors, keep_artifacts=True)
    return verdict, tensors, d
