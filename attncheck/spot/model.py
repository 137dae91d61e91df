"""A Llama/Qwen2-style decoder in HF tensor naming, with attention left to the caller.

    h = embed_tokens[tokens]
    for each layer:  x = input_layernorm(h);  q, k, v = q_proj(x), k_proj(x), v_proj(x)
                     q, k = rope(q, positions), rope(k, positions)
                     h = h + o_proj(attention(layer, q, k, v))      # <- paged, any backend
                     h = h + down_proj(silu(gate_proj(y)) * up_proj(y)),  y = post_attention_layernorm(h)
    logits = lm_head(norm(h))

The model holds no cache: ``forward`` gets the flat token batch of one engine step and an
``attention(layer, q, k, v)`` callable (the engine's paged cache + a backend), so the same
weights run through the float64 reference and every backend. Checkpoints are HF folders:
config.json + model.safetensors (or shards listed in model.safetensors.index.json). Both RoPE
config forms are read: transformers 5's ``rope_parameters`` and the older ``rope_theta`` +
``rope_scaling`` (types default, linear and Llama-3.1's llama3). q/k/v (and any other) biases
are used where the checkpoint has them (Qwen2); a missing ``lm_head`` means tied embeddings.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
ROPE_TYPES = ("default", "linear", "llama3")


class CheckpointError(ValueError):
    """A checkpoint folder this engine cannot load; the message says what and where."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only

    @classmethod
    def from_hf(cls, cfg: dict) -> "RopeConfig":
        """transformers 5 writes ``rope_parameters``; older checkpoints ``rope_theta`` + ``rope_scaling``."""
        params = dict(cfg.get("rope_parameters") or {})
        if not params:
            params = dict(cfg.get("rope_scaling") or {})
            params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise CheckpointError(f"config.json: rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
        keep = {k: params[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                        "original_max_position_embeddings") if k in params}
        return cls(theta=float(params.get("rope_theta", 10000.0)), rope_type=rope_type, **keep)

    def inv_freq(self, head_dim: int) -> torch.Tensor:
        """float32 [head_dim // 2]: the rotation frequency of each (i, i + head_dim/2) pair."""
        inv = 1.0 / (self.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        if self.rope_type == "linear":
            inv = inv / self.factor
        elif self.rope_type == "llama3":  # Llama 3.1: slow the low frequencies, blend the middle ones
            old = self.original_max_position_embeddings
            wavelen = 2 * math.pi / inv
            low_wavelen, high_wavelen = old / self.low_freq_factor, old / self.high_freq_factor
            scaled = torch.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (old / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
            blended = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            inv = torch.where(medium, blended, scaled)
        return inv


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    model_type: str = "llama"
    max_position_embeddings: int = 4096
    eos_token_id: Optional[int] = None

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5

    @classmethod
    def from_hf(cls, cfg: dict, where: str = "config.json") -> "ModelConfig":
        mt = cfg.get("model_type", "llama")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(f"{where}: model_type {mt!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        if cfg.get("use_sliding_window") or (mt == "mistral" and cfg.get("sliding_window")):
            raise CheckpointError(f"{where}: sliding-window models are not supported by the spot engine")
        try:
            heads = int(cfg["num_attention_heads"])
            eos = cfg.get("eos_token_id")
            return cls(
                vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
                intermediate_size=int(cfg["intermediate_size"]), num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope=RopeConfig.from_hf(cfg),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), model_type=mt,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                eos_token_id=eos[0] if isinstance(eos, list) else eos)
        except KeyError as e:
            raise CheckpointError(f"{where}: missing field {e.args[0]!r}") from None

    def to_hf(self) -> dict:
        """A config.json transformers 5 loads as LlamaForCausalLM (rope in ``rope_parameters``)."""
        rope = {"rope_type": self.rope.rope_type, "rope_theta": self.rope.theta}
        if self.rope.rope_type != "default":
            rope.update({k: v for k, v in asdict(self.rope).items() if k not in ("theta", "rope_type")})
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
                "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "rms_norm_eps": self.rms_norm_eps, "rope_parameters": rope, "hidden_act": "silu",
                "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": False,
                "max_position_embeddings": self.max_position_embeddings, "eos_token_id": self.eos_token_id,
                "torch_dtype": "bfloat16"}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # as HF: normalise in float32
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, hq, hkv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(d, hq * hd, bias=False)
        self.k_proj = nn.Linear(d, hkv * hd, bias=False)
        self.v_proj = nn.Linear(d, hkv * hd, bias=False)
        self.o_proj = nn.Linear(hq * hd, d, bias=False)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


class Backbone(nn.Module):  # "model." in HF names
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.inv_freq = cfg.rope.inv_freq(cfg.head_dim)  # float32, a plain attribute: never cast to bf16

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin [T, 1, head_dim] (computed in float32, as HF does, then cast)."""
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attention: AttentionFn,
                logits_at: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens, positions [T] -> logits [len(logits_at) or T, vocab] (float32)."""
        cfg = self.config
        h = self.model.embed_tokens(tokens)
        cos, sin = self.rope(positions, h.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer.input_layernorm(h)
            a = layer.self_attn
            q = a.q_proj(x).view(-1, cfg.num_heads, cfg.head_dim)
            k = a.k_proj(x).view(-1, cfg.num_kv_heads, cfg.head_dim)
            v = a.v_proj(x).view(-1, cfg.num_kv_heads, cfg.head_dim)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            o = attention(i, q.contiguous(), k.contiguous(), v.contiguous())
            h = h + a.o_proj(o.reshape(-1, cfg.num_heads * cfg.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        if logits_at is not None:
            h = h[logits_at]
        return self.lm_head(self.model.norm(h)).float()


# ---- checkpoints ------------------------------------------------------------------------------

def _linear_with_bias(module: nn.Module, name: str) -> None:
    """Give ``module.<name>`` a bias (Qwen2's q/k/v, Llama's attention_bias/mlp_bias)."""
    lin = getattr(module, name)
    setattr(module, name, nn.Linear(lin.in_features, lin.out_features, bias=True, device="meta"))


def build(cfg: ModelConfig, weights: dict, dtype: torch.dtype = torch.bfloat16, device="cpu",
          where: str = "checkpoint") -> Transformer:
    """A Transformer holding ``weights`` (HF names). Missing or unexpected tensors are an error."""
    with torch.device("meta"):
        model = Transformer(cfg)
    for name in weights:
        if name.endswith(".bias"):
            owner, _, attr = name[: -len(".bias")].rpartition(".")
            try:
                _linear_with_bias(model.get_submodule(owner), attr)
            except AttributeError:
                raise CheckpointError(f"{where}: unexpected tensor {name}") from None
    weights = dict(weights)
    if "lm_head.weight" not in weights:
        if "model.embed_tokens.weight" not in weights:
            raise CheckpointError(f"{where}: has neither model.embed_tokens.weight nor lm_head.weight")
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]  # tied embeddings
    expected = dict(model.named_parameters())
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected) - {"model.rotary_emb.inv_freq"})
    if missing or unexpected:
        raise CheckpointError(f"{where}: missing tensors {missing[:4]}, unexpected {unexpected[:4]}")
    for name, p in expected.items():
        if tuple(weights[name].shape) != tuple(p.shape):
            raise CheckpointError(f"{where}: {name} has shape {tuple(weights[name].shape)}, "
                                  f"config.json implies {tuple(p.shape)}")
    model = model.to_empty(device=device).to(dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in weights.items() if k in expected}, strict=True)
    model.inv_freq = cfg.rope.inv_freq(cfg.head_dim)  # was built on the meta device
    return model.eval()


def load_weights(folder: Path) -> dict:
    """Every tensor of an HF checkpoint folder, sharded (index.json) or not."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    weights = {}
    for fname in files:
        path = folder / fname
        if not path.exists():
            raise CheckpointError(f"{folder}: shard {fname} listed in the index is missing")
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                weights[name] = f.get_tensor(name)
    return weights


def load_checkpoint(folder, dtype: torch.dtype = torch.bfloat16, device="cpu") -> Transformer:
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder}: not a checkpoint folder (no config.json)")
    cfg = ModelConfig.from_hf(json.loads(cfg_path.read_text()), where=str(cfg_path))
    return build(cfg, load_weights(folder), dtype=dtype, device=device, where=str(folder))


def save_checkpoint(folder, model: Transformer, dtype: torch.dtype = torch.bfloat16, max_shard_bytes: Optional[int] = None,
                    extra_config: Optional[dict] = None) -> list:
    """Write config.json + safetensors (sharded with an index when ``max_shard_bytes`` is given)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()
               if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    cfg = {**model.config.to_hf(), **(extra_config or {})}
    (folder / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    if max_shard_bytes is None:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += nbytes
    shards.append(current)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    return names
