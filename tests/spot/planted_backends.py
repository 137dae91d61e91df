"""Backends with one planted bug each, loaded through the public plugin interface:

    attncheck spot --backend-plugin tests.spot.planted_backends:BACKENDS --backend SPOT_WRONG_GQA

A plain float32 paged attention (gather the sequence's keys through its block table, bottom-right
causal mask, softmax) that is correct as ``SPOT_CORRECT`` and wrong in one way otherwise:

    SPOT_WRONG_GQA          query head h reads KV head h % Hkv instead of h // G (interleaved vs blocked)
    SPOT_SKIP_FIRST_BLOCK   the keys of block 0 are ignored once a sequence has more than one block
    SPOT_STALE_BLOCK_TABLE  a block added to a sequence since the previous call is read through the
                            previous call's table entry (metadata not refreshed as the table grows)
    SPOT_WINDOW_128         a spurious 128-key sliding window
    SPOT_DROP_PARTIAL_BLOCK the keys of a partially filled last block are ignored
"""

from __future__ import annotations

import torch

from impl.backend import Availability, BackendOutput, BlockSizes, Capabilities

BUGS = {
    None: "SPOT_CORRECT",
    "wrong_gqa": "SPOT_WRONG_GQA",
    "skip_first_block": "SPOT_SKIP_FIRST_BLOCK",
    "stale_block_table": "SPOT_STALE_BLOCK_TABLE",
    "window_128": "SPOT_WINDOW_128",
    "drop_partial_block": "SPOT_DROP_PARTIAL_BLOCK",
}


class PlantedSpotBackend:
    kind = "MHA"
    capabilities = Capabilities(dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
                                block_sizes=BlockSizes(multiple_of=1))

    def __init__(self, bug=None):
        self.bug = bug
        self.name = BUGS[bug]
        self.seen_tables: dict = {}  # first block id -> the row used in the previous call

    def availability(self, device):
        return Availability.yes("plain torch")

    def _row(self, batch, b: int, n_blocks: int) -> torch.Tensor:
        row = batch.block_table[b, :n_blocks].long().clone()
        if self.bug == "stale_block_table":
            key = int(row[0])
            old = self.seen_tables.get(key)
            self.seen_tables[key] = batch.block_table[b].long().clone()
            if old is not None:
                m = min(n_blocks, old.shape[0])
                row[:m] = old[:m]  # entries added since then keep the old (padding) value
        return row

    def run(self, batch) -> BackendOutput:
        hkv, d, bs = batch.num_kv_heads, batch.head_size, batch.block_size
        batch.key_cache.view(-1, hkv, d)[batch.slot_mapping] = batch.key
        batch.value_cache.view(-1, hkv, d)[batch.slot_mapping] = batch.value
        group = batch.num_heads // hkv
        heads = torch.arange(batch.num_heads, device=batch.query.device)
        kv_head = heads % hkv if self.bug == "wrong_gqa" else heads // group
        out = torch.empty_like(batch.query)
        qsl = batch.query_start_loc.tolist()
        for b, seq_len in enumerate(batch.seq_lens.tolist()):
            n_blocks = -(-seq_len // bs)
            row = self._row(batch, b, n_blocks)
            k = batch.key_cache[row].reshape(-1, hkv, d)[:seq_len].float()[:, kv_head]
            v = batch.value_cache[row].reshape(-1, hkv, d)[:seq_len].float()[:, kv_head]
            q = batch.query[qsl[b]:qsl[b + 1]].float()
            qpos = torch.arange(seq_len - q.shape[0], seq_len, device=q.device)[:, None]
            kpos = torch.arange(seq_len, device=q.device)[None, :]
            visible = kpos <= qpos
            if self.bug == "skip_first_block" and n_blocks > 1:
                visible &= kpos >= bs
            if self.bug == "window_128":
                visible &= qpos - kpos < 128
            if self.bug == "drop_partial_block" and seq_len % bs:
                visible &= kpos < (seq_len // bs) * bs
            s = torch.einsum("qhd,khd->hqk", q, k) * batch.scale
            s = s.masked_fill(~visible, float("-inf"))
            p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row that sees nothing -> 0
            out[qsl[b]:qsl[b + 1]] = torch.einsum("hqk,khd->qhd", p, v).to(out.dtype)
        return BackendOutput(output=out)


BACKENDS = [PlantedSpotBackend(bug) for bug in BUGS]
