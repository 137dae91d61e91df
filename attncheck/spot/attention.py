"""Paged attention for the spot engine: one cache per layer, any registered backend.

``PagedAttention.for_backend(backend, ...)`` returns the object the engine calls for every layer
of every step with that step's q/k/v and its ``StepMeta`` (block table, query_start_loc,
seq_lens, slot mapping). It builds the batch the backend's kind expects, hands it to
``backend.run`` (which writes the new K/V into the layer's cache itself) and returns the output.

* MHA backends get an ``impl.batch.AttentionBatch`` over NHD caches ``[blocks, block_size, Hkv, D]``.
* MLA backends (TRITON_MLA, ROCM_AITER_MLA) get an ``MLABatch`` that is the same GQA attention
  written exactly as MLA: the latent of a token is ``[k_0 .. k_{Hkv-1} | v_0 .. v_{Hkv-1}]`` (zero
  padded to DeepSeek's 512), ``W_UK`` / ``W_UV`` are 0/1 matrices that pick query head h's KV group
  h // G out of it, and the rope part (64 wide) is zero. Scores and values are then exactly the
  model's, so a model runs through the MLA backends' real pipelines (absorbed decode, up-projected
  prefill, context chunks merged) over a paged latent cache.
* ``REFERENCE`` is attncheck's float64 oracle (``reference.mha.paged_attention``) behind the same
  protocol: the run every backend is compared with.

Every cache starts as NaN and blocks are NaN again when freed, so a kernel that reads a slot its
sequence has not written produces NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from impl.backend import Availability, BackendOutput, BlockSizes, Capabilities, CaseParams
from impl.batch import AttentionBatch, MLABatch
from reference.mha import paged_attention
from reference.paged import write_kv

MLA_LATENT, MLA_ROPE, MLA_HEAD = 512, 64, 128  # DeepSeek's kv_lora_rank, rope dim, nope/v dim


@dataclass
class StepMeta:
    """Where the tokens of one engine step live in the paged cache (shared by every layer)."""

    block_table: torch.Tensor  # int32 [B, max_blocks], padded with the NaN-filled poison block
    query_start_loc: torch.Tensor  # int32 [B + 1]
    seq_lens: torch.Tensor  # int32 [B]
    slot_mapping: torch.Tensor  # int64 [T]


class ReferenceBackend:
    """attncheck's float64 reference attention as a backend (the run every backend is compared with)."""

    name = "REFERENCE"
    kind = "MHA"
    capabilities = Capabilities(block_sizes=BlockSizes(), sliding_window=True, softcap=True, alibi=True,
                                sinks=True, returns_lse=True)
    # keys x queries x heads above which the streaming (online-softmax) path bounds memory
    STREAMING_ABOVE = 1 << 24

    def availability(self, device) -> Availability:
        return Availability.yes("reference.mha.paged_attention in float64")

    def run(self, batch: AttentionBatch) -> BackendOutput:
        write_kv(batch.key, batch.value, batch.key_cache, batch.value_cache, batch.slot_mapping)
        qlens = batch.query_lens()
        streaming = max(q * s for q, s in zip(qlens, batch.seq_lens.tolist())) * batch.num_heads > self.STREAMING_ABOVE
        out, lse = paged_attention(batch.query, batch.key_cache, batch.value_cache, batch.block_table,
                                   batch.query_start_loc, batch.seq_lens, scale=batch.scale, causal=batch.causal,
                                   sliding_window=batch.sliding_window, compute_dtype=torch.float64,
                                   streaming=streaming)
        return BackendOutput(out.to(batch.dtype), lse.float())


REFERENCE = ReferenceBackend()


def default_block_size(backend) -> int:
    """16 (vLLM's default) where the backend takes it, else the smallest size it declares."""
    sizes = backend.capabilities.block_sizes
    if sizes.accepts(16):
        return 16
    if sizes.allowed:
        return min(sizes.allowed)
    return max(sizes.minimum, sizes.multiple_of)


class PagedAttention:
    """Per-layer paged caches and the batch a backend of kind MHA expects."""

    def __init__(self, backend, cfg, num_blocks: int, block_size: int, dtype: torch.dtype, device):
        self.backend, self.cfg, self.block_size = backend, cfg, block_size
        self.caches = [self._new_cache(num_blocks, dtype, device) for _ in range(cfg.num_layers)]
        self.device_type = torch.device(device).type
        self.known_issues_seen: dict = {}  # issue -> steps whose batch it applies to

    @staticmethod
    def for_backend(backend, cfg, num_blocks, block_size, dtype, device) -> "PagedAttention":
        cls = MLAPagedAttention if backend.kind == "MLA" else PagedAttention
        return cls(backend, cfg, num_blocks, block_size, dtype, device)

    @property
    def num_blocks(self) -> int:
        return int(self._tensors(0)[0].shape[0])

    def _new_cache(self, num_blocks, dtype, device):
        shape = (num_blocks, self.block_size, self.cfg.num_kv_heads, self.cfg.head_dim)
        return (torch.full(shape, float("nan"), dtype=dtype, device=device),
                torch.full(shape, float("nan"), dtype=dtype, device=device))

    def _tensors(self, layer: int) -> tuple:
        return self.caches[layer]

    def poison(self, blocks: list) -> None:
        """Freed blocks hold NaN again, so a stale read is never a plausible number."""
        if blocks:
            idx = torch.tensor(blocks, device=self._tensors(0)[0].device)
            for layer in range(len(self.caches)):
                for cache in self._tensors(layer):
                    cache[idx] = float("nan")

    def note_known_issues(self, meta: StepMeta, dtype: torch.dtype) -> None:
        """Record the backend's declared KnownIssues that apply to this step's batch (the harness's
        case parameters, from the batch): a spot-check failure they explain is an expected one."""
        issues = [k for k in getattr(self.backend, "known_issues", ()) or () if k.backend == self.backend.name]
        if not issues:
            return
        qsl = meta.query_start_loc.tolist()
        params = CaseParams(kind="MHA", family="adhoc", tier="spot",
                            dtype={torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype),
                            kv_cache_dtype="auto", query_lens=tuple(b - a for a, b in zip(qsl, qsl[1:])),
                            seq_lens=tuple(meta.seq_lens.tolist()), num_heads=self.cfg.num_heads,
                            num_kv_heads=self.cfg.num_kv_heads, head_size=self.cfg.head_dim,
                            block_size=self.block_size)
        for k in issues:
            if k.applies(params, self.device_type):
                self.known_issues_seen[k] = self.known_issues_seen.get(k, 0) + 1

    def __call__(self, layer: int, q, k, v, meta: StepMeta, validate: bool) -> torch.Tensor:
        key_cache, value_cache = self.caches[layer]
        batch = AttentionBatch(query=q, key=k, value=v, key_cache=key_cache, value_cache=value_cache,
                               block_table=meta.block_table, query_start_loc=meta.query_start_loc,
                               seq_lens=meta.seq_lens, slot_mapping=meta.slot_mapping, scale=self.cfg.scale)
        if validate:
            batch.validate()
            self.note_known_issues(meta, q.dtype)
        return self.backend.run(batch).output


class MLAPagedAttention(PagedAttention):
    """The model's GQA attention written exactly as MLA (module docstring), over latent caches."""

    def __init__(self, backend, cfg, num_blocks, block_size, dtype, device):
        hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.latent = max(MLA_LATENT, 2 * hkv * d)
        self.head = max(MLA_HEAD, d)
        group = hq // hkv
        # W_UK picks k of head h's group from the latent, W_UV its v; both 0/1, so exact in bf16.
        w_uk = torch.zeros(self.latent, hq, self.head, dtype=dtype)
        w_uv = torch.zeros(self.latent, hq, self.head, dtype=dtype)
        eye = torch.eye(d, dtype=dtype)
        for h in range(hq):
            j = h // group
            w_uk[j * d:(j + 1) * d, h, :d] = eye
            w_uv[(hkv + j) * d:(hkv + j + 1) * d, h, :d] = eye
        self.w_uk, self.w_uv = w_uk.to(device), w_uv.to(device)
        super().__init__(backend, cfg, num_blocks, block_size, dtype, device)

    def _new_cache(self, num_blocks, dtype, device):
        return torch.full((num_blocks, self.block_size, self.latent + MLA_ROPE), float("nan"), dtype=dtype,
                          device=device)

    def _tensors(self, layer: int) -> tuple:
        return (self.caches[layer],)

    def __call__(self, layer: int, q, k, v, meta: StepMeta, validate: bool) -> torch.Tensor:
        t, hq, d = q.shape
        hkv = k.shape[1]
        q_nope = q.new_zeros(t, hq, self.head)
        q_nope[..., :d] = q
        kv_c = q.new_zeros(t, self.latent)
        kv_c[:, :hkv * d] = k.reshape(t, -1)
        kv_c[:, hkv * d:2 * hkv * d] = v.reshape(t, -1)
        batch = MLABatch(q_nope=q_nope, q_pe=q.new_zeros(t, hq, MLA_ROPE), kv_c=kv_c, k_pe=q.new_zeros(t, MLA_ROPE),
                         kv_cache=self.caches[layer], w_uk=self.w_uk, w_uv=self.w_uv,
                         block_table=meta.block_table, query_start_loc=meta.query_start_loc,
                         seq_lens=meta.seq_lens, slot_mapping=meta.slot_mapping, scale=self.cfg.scale)
        if validate:
            batch.validate()
            self.note_known_issues(meta, q.dtype)
        return self.backend.run(batch).output[..., :d]
