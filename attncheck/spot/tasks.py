"""Spot-check tasks: items (prompt tokens + reference answer), a stop rule, and a 0/1 score.

    retrieval  the analytic retrieval model: chained needles in 16..4096-token prompts
    addition   the stored addition model: 0-shot 3-digit addition
    passkey    any checkpoint with tokenizer.json: a 5-digit pass key hidden in filler text
    PATH.jsonl any checkpoint with tokenizer.json: GSM8K-style {"question", "answer": "... #### 42"},
               n-shot "Question:/Answer:" prompts from the file's first items, last number extracted

``load(spec)`` turns a ``--model`` value into (model, default task name, tokenizer or None).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from attncheck.spot import addition, retrieval
from attncheck.spot.model import CheckpointError, load_checkpoint

BUILTIN_MODELS = ("retrieval", "addition")


@dataclass
class Item:
    prompt: list
    answer: list  # the expected generated tokens (retrieval, addition) or the answer text's tokens
    info: dict = field(default_factory=dict)


class Task:
    name = "task"
    version = 1
    n_shot = 0
    filter = "none"
    metric = "exact_match"
    max_new_tokens = 8

    def items(self, limit: int) -> list:
        raise NotImplementedError

    def stop(self, generated: list) -> bool:
        return False

    def score(self, item: Item, generated: list) -> float:
        return float(generated[:len(item.answer)] == item.answer)

    def text(self, tokens: list) -> str:
        return " ".join(str(t) for t in tokens)

    def describe(self, item: Item) -> str:
        return f"prompt {len(item.prompt)} tokens"


class RetrievalTask(Task):
    name = "retrieval"
    version = 1
    needles = 4

    def __init__(self, max_len: int = 4096, min_len: int = 16, block_size: int = 16, seed: int = 0):
        if not min_len <= max_len:
            raise ValueError(f"--max-len: must be >= {min_len}, got {max_len}")
        self.max_len, self.min_len, self.block_size, self.seed = max_len, min_len, block_size, seed
        self.max_new_tokens = self.needles

    def items(self, limit):
        # the prompt and its answer fit max_len
        lens = retrieval.prompt_lengths(limit, self.min_len, self.max_len - self.needles, self.seed)
        out = []
        for i, n in enumerate(lens):
            it = retrieval.make_item(i, n, self.needles, self.block_size, self.seed)
            out.append(Item(it["prompt"], it["answer"], {"needles": it["needles"], "placements": it["placements"]}))
        return out

    def text(self, tokens):
        return " ".join(retrieval.token_text(t) for t in tokens)

    def describe(self, item):
        where = ", ".join(f"{p} ({k})" for p, k in zip(item.info["needles"], item.info["placements"]))
        return f"prompt {len(item.prompt)} tokens, needles at {where}"


class AdditionTask(Task):
    name = "addition"
    version = 1
    max_new_tokens = 6

    def __init__(self, seed: int = 1):
        self.seed = seed

    def items(self, limit):
        return [Item(**addition.make_item(i, self.seed)) for i in range(limit)]

    def stop(self, generated):
        return generated[-1] == addition.NEWLINE

    def text(self, tokens):
        return repr(addition.decode(tokens))

    def describe(self, item):
        return f"prompt {addition.decode(item.prompt)!r}"


# ---- user checkpoints (text tasks through tokenizer.json) --------------------------------------

class TextTask(Task):
    def __init__(self, tokenizer):
        self.tok = tokenizer

    def encode(self, text: str) -> list:
        return self.tok.encode(text).ids

    def text(self, tokens):
        return repr(self.tok.decode(tokens))


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


class PasskeyTask(TextTask):
    """The pass-key retrieval test (Mohtashami & Jaggi 2023) at lengths up to ``max_len`` tokens."""

    name = "passkey"
    max_new_tokens = 12

    def __init__(self, tokenizer, max_len: int = 4096, seed: int = 0):
        super().__init__(tokenizer)
        self.max_len, self.seed = max_len, seed

    def items(self, limit):
        head = "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n"
        tail = "\nWhat is the pass key? The pass key is"
        filler_tokens = max(1, len(self.encode(FILLER * 4)) // 4)
        out = []
        for i in range(limit):
            rng = random.Random(f"passkey/{self.seed}/{i}")
            key = rng.randrange(10000, 100000)
            target = 64 + (self.max_len - 96) * (i + 1) // limit  # lengths spread up to max_len
            reps = max(1, (target - 48) // filler_tokens)
            at = rng.randrange(reps + 1)
            needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
            text = head + FILLER * at + needle + FILLER * (reps - at) + tail
            out.append(Item(self.encode(text), self.encode(f" {key}"), {"passkey": str(key), "depth": at / max(reps, 1)}))
        return out

    def score(self, item, generated):
        found = re.findall(r"\d+", self.tok.decode(generated))
        return float(bool(found) and found[0] == item.info["passkey"])

    def describe(self, item):
        return f"prompt {len(item.prompt)} tokens, pass key at depth {item.info['depth']:.2f}"


class Gsm8kJsonlTask(TextTask):
    """GSM8K-style JSONL, vLLM's and lm-eval's way: n-shot Question/Answer prompts, greedy,
    answer = the last number of the generation ("flexible-extract")."""

    filter = "flexible-extract"
    max_new_tokens = 256
    UNTIL = ("Question:", "</s>", "<|im_end|>", "\n\n")

    def __init__(self, tokenizer, path, n_shot: int = 5):
        super().__init__(tokenizer)
        self.path = Path(path)
        self.name = self.path.stem
        rows = []
        try:
            for n, line in enumerate(self.path.read_text().splitlines(), 1):
                if line.strip():
                    row = json.loads(line)
                    if not {"question", "answer"} <= set(row):
                        raise ValueError(f"line {n} lacks 'question'/'answer'")
                    rows.append(row)
        except (OSError, ValueError) as e:
            raise ValueError(f"--task {path}: expected a JSONL file of {{question, answer}} objects ({e})") from None
        if len(rows) <= n_shot:
            raise ValueError(f"--task {path}: needs more than {n_shot} items (the first {n_shot} are the shots)")
        self.shots, self.rows, self.n_shot = rows[:n_shot], rows[n_shot:], n_shot

    @staticmethod
    def number(text: str) -> Optional[str]:
        found = re.findall(r"-?[\d,]*\.?\d+", text)
        return found[-1].replace(",", "").rstrip(".") if found else None

    def items(self, limit):
        context = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in self.shots)
        return [Item(self.encode(context + f"Question: {r['question']}\nAnswer:"), self.encode(r["answer"]),
                     {"target": self.number(r["answer"].split("####")[-1])}) for r in self.rows[:limit]]

    def stop(self, generated):
        text = self.tok.decode(generated[-8:])
        return any(u in text for u in self.UNTIL)

    def score(self, item, generated):
        text = self.tok.decode(generated)
        for u in self.UNTIL:
            text = text.split(u)[0]
        return float(self.number(text) == item.info["target"])


# ---- --model values ----------------------------------------------------------------------------

def load_tokenizer(folder: Path):
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise CheckpointError(f"{folder}: reading tokenizer.json needs the 'tokenizers' package "
                              f"(pip install 'attncheck[spot]')") from None
    return Tokenizer.from_file(str(path))


def load_model(spec: str, dtype=torch.bfloat16, device="cpu"):
    """(model, tokenizer or None) for --model retrieval | addition | DIR."""
    if spec == "retrieval":
        return retrieval.load(dtype, device), None
    if spec == "addition":
        return addition.load(dtype, device), None
    folder = Path(spec)
    if not folder.is_dir():
        raise CheckpointError(f"--model {spec!r}: expected 'retrieval', 'addition' or a checkpoint folder")
    return load_checkpoint(folder, dtype=dtype, device=device), load_tokenizer(folder)


def make_task(model_spec: str, task: Optional[str], tokenizer, *, max_len: int, seed: int):
    if model_spec == "retrieval":
        _check_task(task, "retrieval", model_spec)
        return RetrievalTask(max_len=max_len, seed=seed)
    if model_spec == "addition":
        _check_task(task, "addition", model_spec)
        return AdditionTask(seed=seed + 1)
    if tokenizer is None:
        raise CheckpointError(f"--model {model_spec}: the text tasks need the checkpoint's tokenizer.json")
    if task in (None, "passkey"):
        return PasskeyTask(tokenizer, max_len=max_len, seed=seed)
    if task.endswith(".jsonl"):
        return Gsm8kJsonlTask(tokenizer, task)
    raise ValueError(f"--task {task!r}: expected 'passkey' or a GSM8K-style .jsonl file for a checkpoint folder")


def _check_task(task, only, model_spec):
    if task not in (None, only):
        raise ValueError(f"--task {task!r}: the {model_spec} model has only the task {only!r}")
