"""A deliberately simple MHA "kernel" for testing the rule itself: float32 math over the
gathered paged K/V, output rounded to the model dtype, LSE returned. ``bug`` plants one of
the bug classes the rule must catch; ``bug=None`` is a correct implementation that must pass.

Bugs: "drop_last_key", "wrong_page" (one sequence reads one wrong page), "scale_1.01",
"causal_off_by_one" (each query also sees the next key), "wrong_gqa_group" (query head 0
reads the last KV head), "read_poisoned_slot" (0 * the next slot's value, which is NaN
poison), "lse_pos_inf" (the LSE of a row reported as +inf), "skip_cache_write".
"""

from __future__ import annotations

import torch

from impl.backend import Availability, BackendOutput, BlockSizes, Capabilities

BUGS = ("drop_last_key", "wrong_page", "scale_1.01", "causal_off_by_one", "wrong_gqa_group",
        "read_poisoned_slot", "lse_pos_inf", "skip_cache_write")


class PlantedBackend:
    kind = "MHA"
    capabilities = Capabilities(block_sizes=BlockSizes(multiple_of=1), sliding_window=True, softcap=True,
                                alibi=True, sinks=True, fp8_kv=frozenset({"fp8_e4m3fn", "fp8_e4m3fnuz"}),
                                returns_lse=True)

    def __init__(self, bug=None, name=None):
        if bug is not None and bug not in BUGS:
            raise ValueError(f"bug: expected one of {BUGS}, got {bug!r}")
        self.bug = bug
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
                fmax = torch.finfo(cache.dtype).max
                flat[batch.slot_mapping] = (new.float() / scale).clamp(-fmax, fmax).to(cache.dtype)
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
        for b, seq_len in enumerate(batch.seq_lens.tolist()):
            q = batch.query[qsl[b]:qsl[b + 1]].float()
            extra = self.bug == "read_poisoned_slot"
            k = self._gather(batch.key_cache, batch, b, seq_len, batch.k_scale, extra)
            v = self._gather(batch.value_cache, batch, b, seq_len, batch.v_scale, extra)
            kv_head = torch.arange(batch.num_heads, device=dev) // group
            if self.bug == "wrong_gqa_group":
                kv_head[0] = batch.num_kv_heads - 1 if batch.num_kv_heads > 1 else 0
            kh, vh = k[:, kv_head], v[:, kv_head]  # [S, Hq, D]
            s = torch.einsum("qhd,khd->hqk", q, kh) * scale
            if batch.softcap:
                s = batch.softcap * torch.tanh(s / batch.softcap)
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
