"""The stored addition model: a small Llama trained on 3-digit addition, and its task.

Text is characters: digits, ``+``, ``=`` and newline (one token each). An item is a 0-shot
prompt ``"\\n131+270="``; the model answers ``0401\\n`` (always four digits) and the score is
exact match of the answer (digits and the closing newline). The model was trained on single
problems only (a small CPU budget), so its prompts are short: long contexts are the retrieval
model's job; this one brings four layers of trained weights and five decode steps per item.
Weights: golden/models/addition/ (HF folder: config.json + model.safetensors, bf16), trained once
on the CPU by ``python -m attncheck.spot.train_addition`` (fixed seed and schedule; the file's
sha256 is recorded in golden/models/MODELS.json and checked on every load).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch

from attncheck.spot.model import CheckpointError, Transformer, load_checkpoint

CHARS = "0123456789+=\n"
VOCAB = 16  # 13 characters, padded
NEWLINE = CHARS.index("\n")
MODELS_DIR = Path(__file__).resolve().parents[2] / "golden" / "models"
MODEL_DIR = MODELS_DIR / "addition"


def encode(text: str) -> list:
    return [CHARS.index(c) for c in text]


def decode(tokens) -> str:
    return "".join(CHARS[t] if 0 <= t < len(CHARS) else "?" for t in tokens)


def problem(rng: random.Random) -> tuple:
    """``("531+470=", "1001\\n")``: operands 100..999, the sum zero-padded to 4 digits."""
    a, b = rng.randrange(100, 1000), rng.randrange(100, 1000)
    return f"{a}+{b}=", f"{a + b:04d}\n"


def make_item(index: int, seed: int) -> dict:
    q, a = problem(random.Random(f"addition/{seed}/{index}"))
    return {"prompt": encode("\n" + q), "answer": encode(a)}


def tokenizer():
    """The character vocabulary as a ``tokenizers.Tokenizer`` (saved as tokenizer.json beside the
    weights, so the stored model is a complete HF folder for --model DIR and lm-eval)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(CHARS)}, unk_token="\n"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok


def recorded_sha256() -> str:
    entry = json.loads((MODELS_DIR / "MODELS.json").read_text())["addition/model.safetensors"]
    return entry["sha256"]


def load(dtype=torch.bfloat16, device="cpu") -> Transformer:
    """The stored weights, after checking their hash against golden/models/MODELS.json."""
    path = MODEL_DIR / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path}: the stored addition model is missing (regenerate: "
                              f"python -m attncheck.spot.train_addition)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != recorded_sha256():
        raise CheckpointError(f"{path}: sha256 {digest[:12]}... differs from golden/models/MODELS.json")
    return load_checkpoint(MODEL_DIR, dtype=dtype, device=device)
