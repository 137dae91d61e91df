"""lm-evaluation-harness adapter (``pip install 'attncheck[lmeval]'``): the spot engine as an ``LM``.

    import attncheck.spot.lmeval  # registers the model name "attncheck" (lm-eval 0.4 has no entry points)
    lm_eval.simple_evaluate(model="attncheck",
                            model_args="pretrained=DIR,backend=TRITON_ATTN,device=cuda", tasks=["gsm8k"])

``pretrained`` is an HF checkpoint folder with tokenizer.json (or ``addition``); ``backend`` any
registered attncheck backend or ``REFERENCE`` (the float64 attention). Greedy decoding only.
``generate_until`` cuts each generation at the first ``until`` string (the harness does not);
``loglikelihood`` scores the continuation's tokens given the context, as HF models in lm-eval do
(context and continuation tokenised together, the continuation being the tokens past the context).
"""

from __future__ import annotations

import os

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from attncheck.spot.attention import REFERENCE
from attncheck.spot.engine import Engine


@register_model("attncheck")
class AttncheckLM(LM):
    def __init__(self, pretrained: str, backend: str = "TRITON_ATTN", device: str = None, dtype: str = "bfloat16",
                 block_size: int = None, max_batch_tokens: int = None, backend_plugin: str = None,
                 batch_size=None, max_batch_size=None, **unused):
        super().__init__()
        from attncheck import backends
        from attncheck.spot import tasks

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cpu":
            os.environ.setdefault("TRITON_INTERPRET", "1")
        if backend_plugin:
            backends.load_plugin(backend_plugin)
        attention = REFERENCE if backend == "REFERENCE" else backends.get_backend(backend)
        avail = attention.availability(torch.device(device))
        if not avail.ok:
            raise ValueError(f"backend {backend} cannot run on {device}: {avail.reason}")
        self.model, self.tokenizer = tasks.load_model(str(pretrained), dtype=getattr(torch, dtype), device=device)
        if self.tokenizer is None:
            raise ValueError(f"pretrained={pretrained}: lm-eval needs text, so the checkpoint needs a tokenizer.json")
        self.engine = Engine(self.model, attention, device=device, block_size=block_size,
                             max_batch_tokens=int(max_batch_tokens or (1024 if device == "cpu" else 16384)),
                             max_seqs=256)
        self.max_length = self.model.config.max_position_embeddings
        eos = self.model.config.eos_token_id
        self.prefix_token = eos if eos is not None else 0

    def _encode(self, text: str) -> list:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _pair(self, context: str, continuation: str):
        """As lm-eval's HF model: trailing context spaces join the continuation; encode both together."""
        if not context:
            return [self.prefix_token], self._encode(continuation)
        stripped = context.rstrip(" ")
        continuation = context[len(stripped):] + continuation
        ctx = self._encode(stripped)
        return ctx, self._encode(stripped + continuation)[len(ctx):]

    def loglikelihood(self, requests) -> list:
        pairs = [self._pair(*r.args) for r in requests]
        return self.engine.loglikelihood([c for c, _ in pairs], [x for _, x in pairs])

    def loglikelihood_rolling(self, requests) -> list:
        out = []
        for r in requests:
            tokens = self._encode(r.args[0])[: self.max_length - 1]
            out.append(self.engine.loglikelihood([[self.prefix_token]], [tokens])[0][0])
        return out

    def generate_until(self, requests) -> list:
        texts = []
        groups: dict = {}
        for i, r in enumerate(requests):  # one engine run per distinct (until, max tokens)
            context, kw = r.args
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if kw.get("do_sample"):
                raise ValueError("generate_until: attncheck decodes greedily only (do_sample=False)")
            key = (tuple(until), int(kw.get("max_gen_toks", 256)))
            groups.setdefault(key, []).append((i, context))
        texts = [None] * len(requests)
        for (until, max_new), members in groups.items():
            def stop(generated, until=until):
                text = self.tokenizer.decode(generated)
                return any(u in text for u in until)
            prompts = [self._encode(c)[-(self.max_length - max_new):] or [self.prefix_token] for _, c in members]
            for (i, _), gen in zip(members, self.engine.generate(prompts, max_new, stop=stop)):
                text = self.tokenizer.decode(gen)
                for u in until:  # the harness does not cut at `until`: the model must
                    text = text.split(u)[0]
                texts[i] = text
        return texts
