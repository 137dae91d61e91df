"""The spot engine: continuous batching over a vLLM-shaped paged KV cache, greedy decoding.

Each step (as vLLM's scheduler with chunked prefill does it):
  1. every running request that has finished its prompt decodes one token;
  2. requests with prompt left take chunks of it from the remaining token budget
     (``max_batch_tokens``); a chunk after the first is an "extend" (it has context);
  3. rows are ordered decode | extend | prefill, as vLLM's batches are;
  4. blocks are taken from a free list shuffled with a fixed seed as sequences grow, so block
     tables are scattered and grow step by step; the padding of a block-table row points at a
     poison block that is never written (NaN), and freed blocks are refilled with NaN;
  5. the model runs every layer through ``PagedAttention`` (the backend); the last row of a
     request whose pending tokens are all in samples greedily.
Loglikelihood requests only prefill and collect the log-probabilities of their continuation.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from attncheck.spot.attention import PagedAttention, StepMeta, default_block_size
from impl.batch import classify_rows


class EngineError(ValueError):
    pass


@dataclass
class Request:
    tokens: list  # the prompt, then every generated token
    max_new_tokens: int = 0
    stop: Optional[Callable[[list], bool]] = None  # called with the generated tokens after each one
    score_from: Optional[int] = None  # loglikelihood: score tokens[score_from:] given what precedes
    prompt_len: int = 0
    num_computed: int = 0  # tokens whose K/V are in the cache
    blocks: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    greedy: list = field(default_factory=list)
    done: bool = False

    def __post_init__(self):
        self.tokens = [int(t) for t in self.tokens]
        self.prompt_len = len(self.tokens)

    @property
    def generated(self) -> list:
        return self.tokens[self.prompt_len:]

    @property
    def max_len(self) -> int:
        return self.prompt_len + self.max_new_tokens


class Engine:
    def __init__(self, model, backend, *, device="cpu", block_size: Optional[int] = None,
                 max_batch_tokens: int = 256, max_seqs: int = 64, cache_tokens: int = 1 << 16, seed: int = 0):
        self.model, self.backend = model, backend
        self.device = torch.device(device)
        self.block_size = block_size or default_block_size(backend)
        if not backend.capabilities.block_sizes.accepts(self.block_size):
            raise EngineError(f"block_size: {backend.name} takes {backend.capabilities.block_sizes.describe()}, "
                              f"got {self.block_size}")
        if max_batch_tokens < 1 or max_seqs < 1:
            raise EngineError("max_batch_tokens/max_seqs: must be >= 1")
        self.max_batch_tokens, self.max_seqs = max_batch_tokens, max_seqs
        self.cache_tokens = cache_tokens
        self.rng = random.Random(seed)
        self.attention: Optional[PagedAttention] = None
        self.steps = 0
        self.row_kinds_seen: set = set()

    # ---- public API ---------------------------------------------------------------------------
    def generate(self, prompts: list, max_new_tokens: int, stop=None, progress=None) -> list:
        """Greedy continuations (token lists) of each prompt; ``stop(generated) -> bool`` ends one early."""
        reqs = [Request(list(p), max_new_tokens=max_new_tokens, stop=stop) for p in prompts]
        self.run(reqs, progress)
        return [r.generated for r in reqs]

    def loglikelihood(self, contexts: list, continuations: list, progress=None) -> list:
        """(sum of log p(continuation | context), continuation is the greedy one) per pair."""
        reqs = [Request(list(c) + list(x), score_from=len(c)) for c, x in zip(contexts, continuations)]
        for r, c in zip(reqs, contexts):
            if not c:
                raise EngineError("loglikelihood: a context needs at least one token (a BOS)")
        self.run(reqs, progress)
        return [(float(sum(r.logprobs)), all(r.greedy)) for r in reqs]

    # ---- the loop -----------------------------------------------------------------------------
    def run(self, requests: list, progress=None) -> None:
        for r in requests:
            if r.prompt_len == 0:
                raise EngineError("prompt: every request needs at least one token")
            if r.max_len > self.model.config.max_position_embeddings:
                raise EngineError(f"prompt: {r.max_len} tokens exceed the model's max_position_embeddings "
                                  f"{self.model.config.max_position_embeddings}")
        self._ensure_cache(requests)
        waiting, running = deque(requests), []
        reserved = 0
        while waiting or running:
            while waiting and len(running) < self.max_seqs and \
                    reserved + self._blocks_for(waiting[0].max_len) <= len(self.free):
                r = waiting.popleft()
                reserved += self._blocks_for(r.max_len)
                running.append(r)
            rows = self._schedule(running)
            self._step(rows)
            for r in [r for r in running if r.done]:
                running.remove(r)
                reserved -= self._blocks_for(r.max_len)
                self._free(r)
                if progress is not None:
                    progress.update(1)

    def _schedule(self, running: list) -> list:
        """[(request, q_len)] in vLLM order: decodes, then extends, then prefills."""
        budget = self.max_batch_tokens
        rows = []
        for r in running:  # decodes first: one token each
            if r.num_computed >= r.prompt_len and budget > 0:
                rows.append((r, 1))
                budget -= 1
        for r in running:  # then chunks of prompts, oldest first
            left = len(r.tokens) - r.num_computed
            if r.num_computed < r.prompt_len and budget > 0:
                rows.append((r, min(left, budget)))
                budget -= rows[-1][1]
        kinds = classify_rows([q for _, q in rows], [r.num_computed + q for r, q in rows])
        order = {"decode": 0, "extend": 1, "prefill": 2}
        self.row_kinds_seen.add(tuple(sorted(set(kinds))))
        return [row for _, row in sorted(zip(kinds, rows), key=lambda kr: order[kr[0]])]

    @torch.no_grad()
    def _step(self, rows: list) -> None:
        bs = self.block_size
        tokens, positions, slots, qsl, seq_lens, want_logits = [], [], [], [0], [], []
        for r, q in rows:
            start, end = r.num_computed, r.num_computed + q
            while len(r.blocks) * bs < end:  # the block table grows as the sequence does
                r.blocks.append(self.free.pop())
            tokens += r.tokens[start:end]
            positions += range(start, end)
            slots += [r.blocks[p // bs] * bs + p % bs for p in range(start, end)]
            qsl.append(qsl[-1] + q)
            seq_lens.append(end)
        width = max(len(r.blocks) for r, _ in rows)
        table = [r.blocks + [self.poison_block] * (width - len(r.blocks)) for r, _ in rows]
        dev = self.device
        meta = StepMeta(block_table=torch.tensor(table, dtype=torch.int32, device=dev),
                        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
                        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
                        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev))
        # logits wanted: the last row of a generating request that is caught up; every scored position
        for (r, q), row0 in zip(rows, qsl):
            for p in range(r.num_computed, r.num_computed + q):
                if r.score_from is not None and r.score_from <= p + 1 < len(r.tokens):
                    want_logits.append((r, row0 + p - r.num_computed, p + 1))
            if r.score_from is None and r.num_computed + q == len(r.tokens):
                want_logits.append((r, row0 + q - 1, None))
        first = [True]

        def attend(layer, q, k, v):
            validate, first[0] = first[0], False  # one validation per step (layers share the meta)
            return self.attention(layer, q, k, v, meta, validate)

        at = torch.tensor([i for _, i, _ in want_logits], dtype=torch.int64, device=dev)
        logits = self.model(torch.tensor(tokens, device=dev), torch.tensor(positions, device=dev), attend, at)
        self.steps += 1
        for r, q in rows:
            r.num_computed += q
        if not want_logits:
            return
        best = logits.argmax(-1).tolist()
        logp = torch.log_softmax(logits, -1)
        targets = [0 if p is None else r.tokens[p] for r, _, p in want_logits]
        picked = logp[torch.arange(len(targets), device=dev), torch.tensor(targets, device=dev)].tolist()
        for (r, _, p), target, b, lp in zip(want_logits, targets, best, picked):
            if p is not None:  # scoring
                r.logprobs.append(lp)
                r.greedy.append(b == target)
            else:
                r.tokens.append(b)
                if len(r.generated) >= r.max_new_tokens or (r.stop is not None and r.stop(r.generated)):
                    r.done = True
        for r, _ in rows:
            if r.score_from is not None and r.num_computed == len(r.tokens):
                r.done = True
            if r.score_from is None and r.max_new_tokens == 0 and r.num_computed == len(r.tokens):
                r.done = True

    # ---- blocks -------------------------------------------------------------------------------
    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _ensure_cache(self, requests: list) -> None:
        """Caches big enough for the longest request (and for ``cache_tokens``), blocks shuffled."""
        need = max(self._blocks_for(r.max_len) for r in requests)
        total = sum(self._blocks_for(r.max_len) for r in requests)
        blocks = max(need, min(total, self.cache_tokens // self.block_size)) + 1  # + the poison block
        cfg = self.model.config
        if self.attention is None or self.attention.num_blocks < blocks:
            dtype = next(self.model.parameters()).dtype
            self.attention = PagedAttention.for_backend(self.backend, cfg, blocks, self.block_size, dtype, self.device)
        ids = list(range(self.attention.num_blocks))
        self.rng.shuffle(ids)
        self.poison_block = ids.pop()  # never allocated: block-table padding points here
        self.free = ids

    def _free(self, r: Request) -> None:
        self.attention.poison(r.blocks)
        for b in r.blocks:  # back at random places, so later tables reuse blocks out of order
            self.free.insert(self.rng.randrange(len(self.free) + 1), b)
        r.blocks = []
