"""Train the stored addition model once, on the CPU, and record its hash.

    python -m attncheck.spot.train_addition [--out golden/models/addition] [--steps N]

Fixed seed, AdamW 1e-3, a constant learning rate then a linear decay over the last 30% of the
steps (research notes: a cosine schedule stays under 10% exact match at this budget). With
3e-3, the research notes' rate, training stalled here (0.8% exact match after 1000 steps);
1e-3 passed 40% by step 250. A sequence is one problem, ``"\\n417+385=0802\\n"`` (the
sum always four digits); the loss is on the answer tokens only. One torch thread (faster than
two on a shared 2-core machine). Writes
config.json + model.safetensors (bf16) + tokenizer.json and the file's sha256 into golden/models/MODELS.json,
then reports exact match of the stored bf16 weights under the float64 reference attention.
Training is not part of any test: tests and ``attncheck spot`` load the stored file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from attncheck.spot import addition
from attncheck.spot.model import ModelConfig, RopeConfig, Transformer

SEED = 20261130
CONFIG = ModelConfig(vocab_size=addition.VOCAB, hidden_size=192, intermediate_size=448, num_layers=4,
                     num_heads=4, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-5, rope=RopeConfig(theta=10000.0),
                     max_position_embeddings=4096, eos_token_id=addition.NEWLINE)
STEPS, BATCH, LR, WEIGHT_DECAY, WARMUP, DECAY_FRACTION = 1000, 128, 1e-3, 0.1, 50, 0.3
PAD = addition.VOCAB - 1


def learning_rate(step: int, steps: int) -> float:
    """Warm-up, constant, then linear decay to 0 over the last DECAY_FRACTION of the steps."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    decay_from = int(steps * (1 - DECAY_FRACTION))
    if step < decay_from:
        return LR
    return LR * (steps - step) / (steps - decay_from)


def batch(rng: random.Random, size: int):
    """tokens [B, S], targets [B, S] (-100 where no loss: operands, '=' predictions of non-answers, padding)."""
    seqs, masks = [], []
    for _ in range(size):
        q, a = addition.problem(rng)
        seqs.append(addition.encode("\n" + q + a))
        masks.append([False] * (1 + len(q)) + [True] * len(a))
    width = max(len(s) for s in seqs)
    tokens = torch.full((size, width), PAD)
    targets = torch.full((size, width), -100)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        tokens[i, :len(s)] = torch.tensor(s)
        tgt = torch.tensor(s[1:])
        keep = torch.tensor(m[1:])
        targets[i, :len(s) - 1] = torch.where(keep, tgt, torch.full_like(tgt, -100))
    return tokens, targets


def causal_attention(batch_size: int, seq_len: int, group: int):
    """The model's attention callable for training: causal SDPA over [B, S] (q_len == k_len)."""
    def attend(layer, q, k, v):
        def heads(x):
            return x.view(batch_size, seq_len, x.shape[1], x.shape[2]).transpose(1, 2)
        kk = heads(k).repeat_interleave(group, dim=1)
        vv = heads(v).repeat_interleave(group, dim=1)
        o = F.scaled_dot_product_attention(heads(q), kk, vv, is_causal=True)
        return o.transpose(1, 2).reshape(batch_size * seq_len, q.shape[1], q.shape[2])
    return attend


@torch.no_grad()
def teacher_forced_exact(model, tokens, targets) -> float:
    """Fraction of sequences whose every answer token is the argmax (= greedy exact match)."""
    b, s = tokens.shape
    group = CONFIG.num_heads // CONFIG.num_kv_heads
    logits = model(tokens.reshape(-1), torch.arange(s).repeat(b), causal_attention(b, s, group))
    right = (logits.argmax(-1).view(b, s) == targets) | (targets == -100)
    return right.all(dim=1).float().mean().item()


def init_weights(model: Transformer, gen: torch.Generator) -> None:
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            torch.nn.init.ones_(p)
        else:
            torch.nn.init.normal_(p, std=0.02, generator=gen)


def train(steps: int = STEPS, log_every: int = 100) -> Transformer:
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    rng = random.Random(SEED)
    model = Transformer(CONFIG)
    init_weights(model, gen)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                             {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.98))
    group = CONFIG.num_heads // CONFIG.num_kv_heads
    t0 = time.time()
    eval_tokens, eval_targets = batch(random.Random(SEED + 1), 256)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = learning_rate(step, steps)
        tokens, targets = batch(rng, BATCH)
        b, s = tokens.shape
        positions = torch.arange(s).repeat(b)
        logits = model(tokens.reshape(-1), positions, causal_attention(b, s, group))
        loss = F.cross_entropy(logits, targets.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {learning_rate(step, steps):.2e}  "
                  f"teacher-forced exact match {teacher_forced_exact(model, eval_tokens, eval_targets):.3f}  "
                  f"{time.time() - t0:.0f}s", flush=True)
    return model.eval()


def exact_match(model: Transformer, n: int, backend=None, seed: int = 1) -> float:
    from attncheck.spot.attention import REFERENCE
    from attncheck.spot.engine import Engine

    items = [addition.make_item(i, seed) for i in range(n)]
    engine = Engine(model, backend or REFERENCE, max_batch_tokens=2048, max_seqs=256)
    outs = engine.generate([it["prompt"] for it in items], max_new_tokens=6,
                           stop=lambda g: g[-1] == addition.NEWLINE)
    return sum(o == it["answer"] for o, it in zip(outs, items)) / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(addition.MODEL_DIR))
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--eval", type=int, default=500, help="items for the final exact-match check")
    args = p.parse_args(argv)
    model = train(args.steps, log_every=50)
    from attncheck.spot.model import load_checkpoint, save_checkpoint
    out = Path(args.out)
    save_checkpoint(out, model, dtype=torch.bfloat16)
    addition.tokenizer().save(str(out / "tokenizer.json"))
    stored = load_checkpoint(out, dtype=torch.bfloat16)
    acc = exact_match(stored, args.eval)
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    index = addition.MODELS_DIR / "MODELS.json"
    index.parent.mkdir(parents=True, exist_ok=True)
    models = json.loads(index.read_text()) if index.exists() else {}
    models[f"{out.name}/model.safetensors"] = {
        "sha256": digest, "parameters": sum(p.numel() for p in model.parameters()),
        "trained_with": "python -m attncheck.spot.train_addition", "seed": SEED, "steps": args.steps,
        "torch": torch.__version__, "exact_match_bf16_reference": round(acc, 4), "eval_items": args.eval}
    index.write_text(json.dumps(models, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}/model.safetensors sha256 {digest}; bf16 exact match {acc:.4f} on {args.eval} items")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
