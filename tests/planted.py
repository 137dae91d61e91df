"""A deliberately simple MHA "kernel" for testing the rule itself: float32 math over the
gathered paged K/V, output rounded to the model dtype, LSE returned. ``bug`` plants one of
the bug classes the rule must catch; ``bug=None`` is a correct implementation that must pass.

Bugs: "drop_last_key", "wrong_page" (one sequence reads one wrong page), "scale_1.01",
"causal_off_by_one" (each query also sees the next key), "wrong_gqa_group" (query head 0
reads the last KV head), "read_poisoned_slot" (0 * the next slot's value, which is NaN
poison), "lse_pos_inf" (the LSE of a row reported as +inf), "skip_cache_write",
"scale_ignored" (1/sqrt(head_size) instead of the batch's scale), "softcap_after_mask"
(masked keys capped to -c instead of staying -inf), "softcap_skipped_on_decode" / "_extend" /
"_prefill" (no cap on that row kind), "fp8_round_toward_zero" / "fp8_round_half_away" (the fp8
cache write rounds the wrong way), "fp8_no_saturation" (values beyond the fp8 range are cast
unclamped).

``pipeline="new_unquantised"`` is not a bug: the new tokens are attended from the batch's
unquantised K/V (as vLLM's prefill does) instead of being read back from an fp8 cache.
"""

from __future__ import annotations

import dataclasses

import torch

from impl.backend import Availability, BackendOutput, BlockSizes, Capabilities
from reference import mla as ref_mla

BUGS = ("drop_last_key", "wrong_page", "scale_1.01", "causal_off_by_one", "wrong_gqa_group",
        "read_poisoned_slot", "lse_pos_inf", "skip_cache_write", "scale_ignored", "softcap_after_mask",
        "softcap_skipped_on_decode", "softcap_skipped_on_extend", "softcap_skipped_on_prefill",
        "fp8_round_toward_zero", "fp8_round_half_away", "fp8_no_saturation")
PIPELINES = ("cache", "new_unquantised")


def quantise_fp8(x: torch.Tensor, scale: float, fp8_dtype: torch.dtype, bug=None) -> torch.Tensor:
    """fp8 = RNE(clamp(x.float() / scale, +-max)) (torch's cast rounds to nearest even), or the
    planted wrong rounding: toward zero, ties away from zero, or no clamp (a value beyond the range
    becomes NaN, the OCP non-saturating conversion; torch's own CPU cast saturates e4m3fn on some
    builds, so the NaN is written out)."""
    y = x.float() / scale
    fmax = torch.finfo(fp8_dtype).max
    if bug == "fp8_no_saturation":
        return torch.where(y.abs() > fmax, torch.full_like(y, float("nan")), y).to(fp8_dtype)
    y = y.clamp(-fmax, fmax)
    q = y.to(fp8_dtype)
    codes = q.view(torch.uint8).to(torch.int16)
    back = q.float()
    if bug == "fp8_round_toward_zero":  # rounded up in magnitude: take the code one step closer to 0
        codes = torch.where((back.abs() > y.abs()) & (back != 0), codes - 1, codes)
        codes = torch.where(codes & 0x7F == 0, torch.zeros_like(codes), codes)  # -0: fnuz has none
    elif bug == "fp8_round_half_away":  # an exact tie that went to the smaller magnitude: take the larger
        nxt = (codes + 1).clamp(max=255).to(torch.uint8).view(fp8_dtype).float()
        tie = (back.abs() < y.abs()) & ((nxt.abs() - y.abs()) == (y.abs() - back.abs()))
        codes = torch.where(tie, codes + 1, codes)
    return codes.to(torch.uint8).view(fp8_dtype)


class PlantedBackend:
    kind = "MHA"
    capabilities = Capabilities(block_sizes=BlockSizes(multiple_of=1), sliding_window=True, softcap=True,
                                alibi=True, sinks=True, fp8_kv=frozenset({"fp8_e4m3fn", "fp8_e4m3fnuz"}),
                                returns_lse=True)

    def __init__(self, bug=None, name=None, pipeline="cache"):
        if bug is not None and bug not in BUGS:
            raise ValueError(f"bug: expected one of {BUGS}, got {bug!r}")
        if pipeline not in PIPELINES:
            raise ValueError(f"pipeline: expected one of {PIPELINES}, got {pipeline!r}")
        self.bug, self.pipeline = bug, pipeline
        self.name = name or ("PLANTED_" + (bug or "NONE").upper().replace(".", "_"))

    def availability(self, device):
        return Availability.yes("plain torch")

    def _write(self, batch):
        if self.bug == "skip_cache_write":
            return
        Hkv, D = batch.num_kv_heads, batch.head_size
        for cache, new, scale in ((batch.key_cache, batch.key, batch.k_scale),
                                  (batch.value_cache, batch.value, batch.v_scale)):
            flat = cache.view(-1, Hkv, D)
            if batch.is_fp8:
                flat[batch.slot_mapping] = quantise_fp8(new, scale, cache.dtype, self.bug)
            else:
                flat[batch.slot_mapping] = new.to(cache.dtype)

    def _gather(self, cache, batch, b, seq_len, scale, extra_slot=False):
        bs = batch.block_size
        n = -(-seq_len // bs)
        blocks = batch.block_table[b, :n].long().clone()
        if self.bug == "wrong_page" and b == 0 and n >= 1:
            others = batch.block_table[1:, 0].long() if batch.num_seqs > 1 else blocks
            blocks[-1] = int(others[0]) if int(others[0]) != int(blocks[-1]) else int(blocks[0])
        flat = cache[blocks].reshape(-1, batch.num_kv_heads, batch.head_size)
        keys = seq_len + 1 if extra_slot else seq_len
        if extra_slot and flat.shape[0] < keys:  # poisoned tail lives in the padding block
            pad = cache[batch.block_table[b, n].long()].reshape(-1, batch.num_kv_heads, batch.head_size)
            flat = torch.cat([flat, pad])
        return flat[:keys].float() * (scale if batch.is_fp8 else 1.0)

    def run(self, batch) -> BackendOutput:
        self._write(batch)
        out = torch.empty_like(batch.query)
        dev = batch.query.device  # the masks and indices live beside the batch (CPU or GPU)
        lse_all = torch.empty(batch.num_heads, batch.query.shape[0], dtype=torch.float32, device=dev)
        qsl = batch.query_start_loc.tolist()
        group = batch.num_heads // batch.num_kv_heads
        scale = batch.scale * (1.01 if self.bug == "scale_1.01" else 1.0)
        if self.bug == "scale_ignored":
            scale = batch.head_size ** -0.5
        kinds = batch.row_kinds()
        for b, seq_len in enumerate(batch.seq_lens.tolist()):
            q = batch.query[qsl[b]:qsl[b + 1]].float()
            extra = self.bug == "read_poisoned_slot"
            k = self._gather(batch.key_cache, batch, b, seq_len, batch.k_scale, extra)
            v = self._gather(batch.value_cache, batch, b, seq_len, batch.v_scale, extra)
            if self.pipeline == "new_unquantised":  # the new tokens straight from the batch
                ctx = seq_len - q.shape[0]
                k[ctx:seq_len] = batch.key[qsl[b]:qsl[b + 1]].float()
                v[ctx:seq_len] = batch.value[qsl[b]:qsl[b + 1]].float()
            kv_head = torch.arange(batch.num_heads, device=dev) // group
            if self.bug == "wrong_gqa_group":
                kv_head[0] = batch.num_kv_heads - 1 if batch.num_kv_heads > 1 else 0
            kh, vh = k[:, kv_head], v[:, kv_head]  # [S, Hq, D]
            s = torch.einsum("qhd,khd->hqk", q, kh) * scale
            cap = batch.softcap if self.bug != f"softcap_skipped_on_{kinds[b]}" else None
            if cap and self.bug != "softcap_after_mask":
                s = cap * torch.tanh(s / cap)
            q_len = q.shape[0]
            qpos = torch.arange(seq_len - q_len, seq_len, device=dev)[:, None]
            kpos = torch.arange(kh.shape[0], device=dev)[None, :]
            if batch.alibi_slopes is not None:
                s = s - batch.alibi_slopes[:, None, None] * (qpos - kpos).abs().float()
            allowed = torch.ones(q_len, kh.shape[0], dtype=torch.bool, device=dev)
            if batch.causal:
                allowed &= kpos <= qpos + (1 if self.bug == "causal_off_by_one" else 0)
            allowed &= kpos < seq_len
            if self.bug == "drop_last_key":
                allowed &= kpos < seq_len - 1
            if batch.sliding_window:
                allowed &= (qpos - kpos) < batch.sliding_window
            s = s.masked_fill(~allowed, float("-inf"))
            if cap and self.bug == "softcap_after_mask":  # masked keys become -cap, not -inf
                s = cap * torch.tanh(s / cap)
            if extra:
                s[..., -1] = 0.0  # "masked" by a zero weight below, but reads the NaN slot
            m = s.amax(-1, keepdim=True)
            if batch.sinks is not None:
                m = torch.maximum(m, batch.sinks[:, None, None])
            p = torch.exp(s - m)
            denom = p.sum(-1, keepdim=True)
            if batch.sinks is not None:
                denom = denom + torch.exp(batch.sinks[:, None, None] - m)
            if extra:
                p = p.clone()
                p[..., -1] = 0.0
            o = torch.einsum("hqk,khd->qhd", p / denom, vh)
            lse = (torch.log(p.sum(-1)) + m[..., 0])
            if self.bug == "lse_pos_inf" and b == batch.num_seqs - 1:
                lse[:, -1] = float("inf")
            out[qsl[b]:qsl[b + 1]] = o.to(out.dtype)
            lse_all[:, qsl[b]:qsl[b + 1]] = lse
        return BackendOutput(output=out, lse=lse_all)


class PlantedMLABackend:
    """A plain MLA "kernel" for testing the rule: the latent written (fp8: RNE, saturated), then
    reference.mla's absorbed path in float32 over the cache, output rounded to the model dtype,
    LSE returned. Correct: it must pass every MLA case."""

    kind = "MLA"
    capabilities = Capabilities(block_sizes=BlockSizes(multiple_of=1), fp8_kv=frozenset({"fp8_e4m3fn", "fp8_e4m3fnuz"}),
                                returns_lse=True, non_causal=False)

    def __init__(self, name="PLANTED_MLA"):
        self.name = name

    def availability(self, device):
        return Availability.yes("plain torch")

    def run(self, batch) -> BackendOutput:
        latent = torch.cat([batch.kv_c, batch.k_pe], dim=-1)
        flat = batch.kv_cache.view(-1, batch.kv_cache.shape[-1])
        if batch.is_fp8:
            flat[batch.slot_mapping] = quantise_fp8(latent, batch.kv_scale, batch.kv_cache.dtype)
        else:
            flat[batch.slot_mapping] = latent.to(batch.kv_cache.dtype)
        out, lse = ref_mla.paged_mla(batch.q_nope, batch.q_pe, batch.kv_cache, batch.w_uk, batch.w_uv,
                                     batch.block_table, batch.query_start_loc, batch.seq_lens, scale=batch.scale,
                                     kv_scale=batch.kv_scale, path="absorbed", compute_dtype=torch.float32)
        return BackendOutput(output=out.to(batch.dtype), lse=lse.float())


class WrongKnob:
    """A correct backend given a wrong value of one batch field (``mutate(batch)`` returns the
    replacement value, or a dict of fields to replace): what a kernel that misreads that knob
    computes. The batch's own caches stay the ones written, unless the knob is a cache."""

    def __init__(self, base, field: str, mutate, what: str):
        self.base, self.field, self.mutate, self.what = base, field, mutate, what
        self.name = f"WRONG_{field.upper()}"
        self.kind, self.capabilities = base.kind, base.capabilities

    def availability(self, device):
        return self.base.availability(device)

    def run(self, batch) -> BackendOutput:
        changes = self.mutate(batch)
        return self.base.run(dataclasses.replace(batch, **(changes if isinstance(changes, dict) else
                                                           {self.field: changes})))


def unguarded_merge(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse=None, *_, **__):
    """``merge_attn_states`` without the guard for two -inf LSEs (research notes, bug 12: vLLM's
    Triton merge on ROCm once lacked it): -inf - -inf gives NaN weights. Drop-in for the
    project's and vLLM's merge (their extra arguments are ignored)."""
    m = torch.maximum(prefix_lse, suffix_lse)
    wp, ws = torch.exp(prefix_lse - m), torch.exp(suffix_lse - m)  # -inf - -inf = NaN
    s = (wp + ws).transpose(0, 1)[..., None]
    out = prefix_output.float() * (wp.transpose(0, 1)[..., None] / s) + \
        suffix_output.float() * (ws.transpose(0, 1)[..., None] / s)
    output.copy_(out.to(output.dtype))
    if output_lse is not None:
        output_lse.copy_(m + torch.log(wp + ws))
