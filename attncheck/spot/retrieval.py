"""The analytic retrieval model: key-value recall that is exact by construction, no training.

Vocabulary: a *pair token* (key a, value b) for 128 keys x 256 values, and a *value token* for
each value b. A prompt is N pair tokens (distractors plus the needles) and one value token;
the model answers with value tokens, and every value token asks for the key ``b % 128``, so
the answer is a chain: start token -> needle 1's value -> needle 2's value -> ... Each answer
token is a decode step that retrieves a different needle from the paged cache.

One decoder layer, hidden 256, 8 query heads over 2 KV heads of dim 128:

    hidden  [0, 64)    key code of a pair token     (Hadamard row, sign = second half of the keys)
            [64, 128)  query code of a value token  (the code of key b % 128)
            [128, 136) the 8 value bits of a pair token, as +-1
            [136, 144) the answer bits, written by attention (query head h writes bit h)
    q_proj  every query head: the query code, into the RoPE dims that do not rotate
    k_proj  every KV head: the key code, into the same dims
    v_proj  KV head j: the bits of its query heads j*G .. j*G+G-1
    o_proj  query head h: its own bit (slot h % G of its KV head's value) -> answer dim h
    lm_head value token b: +-gamma on the answer dims, following b's bits; every other row 0

RoPE theta is 1e20, so the code dims (frequency index >= head_dim/4) turn by < 1e-6 rad at
4096 tokens: position does not disturb retrieval. The matching key scores +32 after scaling,
any other 0 (or -32 for its negation), so at 4096 tokens the needle holds all but 1e-10 of the
softmax. A query head that reads the wrong KV head (GQA mapping), misses the needle's block, or
reads a stale one flips its bit and so the answer; 1e-3 noise or bf16 rounding changes nothing.
"""

from __future__ import annotations

import math
import random

import torch

from attncheck.spot.model import ModelConfig, RopeConfig, Transformer, build

NUM_KEYS, NUM_VALUES, CODE = 128, 256, 64
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, HIDDEN = 8, 2, 128, 256
KEY_DIMS, QUERY_DIMS = slice(0, 64), slice(64, 128)
VALUE_BITS, ANSWER_BITS = 128, 136  # first dim of each 8-bit field
PAIR_TOKENS = NUM_KEYS * NUM_VALUES
VOCAB = PAIR_TOKENS + NUM_VALUES
MATCH_SCORE = 32.0  # scaled logit of the matching key
ANSWER_GAIN = 4.0  # lm_head weight: the correct value leads a one-bit-off value by ~25 logits


def pair_token(key: int, value: int) -> int:
    return key * NUM_VALUES + value


def value_token(value: int) -> int:
    return PAIR_TOKENS + value


def token_text(token: int) -> str:
    if token >= PAIR_TOKENS:
        return f"v{token - PAIR_TOKENS}"
    return f"({token // NUM_VALUES}:{token % NUM_VALUES})"


def hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def key_codes() -> torch.Tensor:
    """[128, 64] +-1: the 64 Hadamard rows and their negations (orthogonal or opposite)."""
    h = hadamard(CODE)
    return torch.cat([h, -h], 0)


def value_bits() -> torch.Tensor:
    """[256, 8] +-1: bit i of value b."""
    b = torch.arange(NUM_VALUES)[:, None]
    return ((b >> torch.arange(8)) & 1).float() * 2 - 1


def config() -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_layers=1,
                       num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, rms_norm_eps=1e-6,
                       rope=RopeConfig(theta=1e20), max_position_embeddings=8192)


def frozen_rope_dims() -> torch.Tensor:
    """The 64 head dims whose RoPE frequency index is >= head_dim / 4 (theta 1e20: they stay put)."""
    half = HEAD_DIM // 2
    idx = torch.arange(half // 2, half)
    return torch.cat([idx, idx + half])


def weights() -> dict:
    """The HF-named tensors of the model (float32)."""
    cfg = config()
    codes, bits = key_codes(), value_bits()
    group = NUM_HEADS // NUM_KV_HEADS
    embed = torch.zeros(VOCAB, HIDDEN)
    keys = torch.arange(PAIR_TOKENS) // NUM_VALUES
    vals = torch.arange(PAIR_TOKENS) % NUM_VALUES
    embed[:PAIR_TOKENS, KEY_DIMS] = codes[keys]
    embed[:PAIR_TOKENS, VALUE_BITS:VALUE_BITS + 8] = bits[vals]
    embed[PAIR_TOKENS:, QUERY_DIMS] = codes[torch.arange(NUM_VALUES) % NUM_KEYS]
    # RMSNorm scales a value token by 1/rms = sqrt(HIDDEN / 64) and a pair token by sqrt(HIDDEN / 72).
    q_gain = MATCH_SCORE / (cfg.scale * CODE * math.sqrt(HIDDEN / 64) * math.sqrt(HIDDEN / 72))
    dims = frozen_rope_dims()
    q = torch.zeros(NUM_HEADS, HEAD_DIM, HIDDEN)
    k = torch.zeros(NUM_KV_HEADS, HEAD_DIM, HIDDEN)
    v = torch.zeros(NUM_KV_HEADS, HEAD_DIM, HIDDEN)
    o = torch.zeros(HIDDEN, NUM_HEADS, HEAD_DIM)
    eye = torch.eye(CODE)
    for h in range(NUM_HEADS):
        q[h][dims, QUERY_DIMS] = q_gain * eye
        o[ANSWER_BITS + h, h, h % group] = 1.0
    for j in range(NUM_KV_HEADS):
        k[j][dims, KEY_DIMS] = eye
        for r in range(group):
            v[j, r, VALUE_BITS + j * group + r] = 1.0
    lm_head = torch.zeros(VOCAB, HIDDEN)
    lm_head[PAIR_TOKENS:, ANSWER_BITS:ANSWER_BITS + 8] = ANSWER_GAIN * bits
    zeros_mlp = {f"model.layers.0.mlp.{n}.weight": torch.zeros(s) for n, s in
                 (("gate_proj", (64, HIDDEN)), ("up_proj", (64, HIDDEN)), ("down_proj", (HIDDEN, 64)))}
    return {"model.embed_tokens.weight": embed,
            "model.layers.0.input_layernorm.weight": torch.ones(HIDDEN),
            "model.layers.0.self_attn.q_proj.weight": q.reshape(-1, HIDDEN),
            "model.layers.0.self_attn.k_proj.weight": k.reshape(-1, HIDDEN),
            "model.layers.0.self_attn.v_proj.weight": v.reshape(-1, HIDDEN),
            "model.layers.0.self_attn.o_proj.weight": o.reshape(HIDDEN, -1),
            "model.layers.0.post_attention_layernorm.weight": torch.ones(HIDDEN),
            **zeros_mlp,
            "model.norm.weight": torch.ones(HIDDEN),
            "lm_head.weight": lm_head}


def load(dtype=torch.bfloat16, device="cpu") -> Transformer:
    return build(config(), weights(), dtype=dtype, device=device, where="retrieval model")


# ---- items -------------------------------------------------------------------------------------

PLACEMENTS = ("block0", "middle", "last_partial", "split_boundary")
SPLIT_PERIOD = 256  # needles at +-1 of multiples of 256: the partition edges of split-KV kernels


def needle_position(kind: str, num_pairs: int, prompt_len: int, block_size: int, rng: random.Random) -> int:
    """A context position (< num_pairs) of the given placement kind (falls back to any position)."""
    blocks = -(-prompt_len // block_size)
    if kind == "block0":
        lo, hi = 0, min(block_size, num_pairs)
    elif kind == "middle" and blocks >= 3:
        b = rng.randrange(1, blocks - 1)
        lo, hi = b * block_size, min((b + 1) * block_size, num_pairs)
    elif kind == "last_partial" and prompt_len % block_size:
        lo, hi = (prompt_len // block_size) * block_size, num_pairs
    elif kind == "split_boundary" and num_pairs > SPLIT_PERIOD:
        edge = SPLIT_PERIOD * rng.randrange(1, (num_pairs - 1) // SPLIT_PERIOD + 1)
        return min(edge + rng.choice((-1, 0)), num_pairs - 1)
    else:
        lo, hi = 0, num_pairs
    if hi <= lo:
        lo, hi = 0, num_pairs
    return rng.randrange(lo, hi)


def make_item(index: int, prompt_len: int, num_needles: int, block_size: int, seed: int) -> dict:
    """One item: ``prompt_len`` tokens (pairs + the start token), answer = the chain of ``num_needles`` values."""
    rng = random.Random(f"retrieval/{seed}/{index}")
    num_pairs = prompt_len - 1
    if num_pairs < num_needles:
        raise ValueError(f"prompt_len: {prompt_len} leaves no room for {num_needles} needles")
    chain = rng.sample(range(NUM_KEYS), num_needles)  # keys a_1 .. a_m
    values = [chain[i + 1] + NUM_KEYS * rng.randrange(2) for i in range(num_needles - 1)]
    values.append(rng.randrange(NUM_VALUES))
    start = chain[0] + NUM_KEYS * rng.randrange(2)
    others = [k for k in range(NUM_KEYS) if k not in chain]
    tokens = [pair_token(rng.choice(others), rng.randrange(NUM_VALUES)) for _ in range(num_pairs)]
    positions, kinds = [], []
    for i in range(num_needles):
        kind = PLACEMENTS[(index + i) % len(PLACEMENTS)]
        pos = needle_position(kind, num_pairs, prompt_len, block_size, rng)
        while pos in positions:
            pos = rng.randrange(num_pairs)
        positions.append(pos)
        kinds.append(kind)
        tokens[pos] = pair_token(chain[i], values[i])
    return {"prompt": tokens + [value_token(start)], "answer": [value_token(v) for v in values],
            "needles": positions, "placements": kinds}


def prompt_lengths(n: int, min_len: int, max_len: int, seed: int) -> list:
    """Log-uniform lengths from min_len to max_len; both ends are always included."""
    rng = random.Random(f"retrieval-lengths/{seed}")
    if n == 1:
        return [max_len]
    lens = [min_len, max_len] + [int(round(math.exp(rng.uniform(math.log(min_len), math.log(max_len)))))
                                 for _ in range(n - 2)]
    return lens[:n]
