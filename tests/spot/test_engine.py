"""The spot engine: HF checkpoints load and match transformers, batches are vLLM-shaped,
and the MLA embedding of a GQA model is exact."""

from __future__ import annotations

import json
import math

import pytest
import torch

from attncheck.backends import get_backend
from attncheck.spot import retrieval
from attncheck.spot.attention import REFERENCE
from attncheck.spot.engine import Engine, Request
from attncheck.spot.model import CheckpointError, RopeConfig, load_checkpoint
from impl.backend import Availability, BackendOutput, BlockSizes, Capabilities
from impl.batch import classify_rows
from reference.mla import paged_mla, write_latent

ATOL = 2e-4  # float32 engine vs transformers, per next-token log-probability
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


def tiny_hf_checkpoint(tmp_path, kind: str):
    """A random tiny checkpoint written by transformers itself; returns (folder, hf model)."""
    transformers = pytest.importorskip("transformers", reason="the transformers comparison needs "
                                       "the test extra: pip install -e '.[test]'")
    torch.manual_seed(0)
    common = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)
    if kind == "qwen2":  # q/k/v biases and tied embeddings
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1e6)
        hf = transformers.Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # biases start at zero: make them matter
            for layer in hf.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    else:
        cfg = transformers.LlamaConfig(**common, head_dim=32, rope_theta=10000.0,
                                       rope_scaling=LLAMA3_SCALING if kind in ("llama3", "sharded") else None)
        hf = transformers.LlamaForCausalLM(cfg)
    hf.eval()
    folder = tmp_path / kind
    hf.save_pretrained(folder, max_shard_size="60KB" if kind == "sharded" else "5GB")
    return folder, hf


def engine_logprobs(model, backend, prompts, **kw) -> list:
    """log p(token t | tokens < t) for t >= 1 of each prompt, through the paged engine."""
    reqs = [Request(p, score_from=1) for p in prompts]
    Engine(model, backend, **kw).run(reqs)
    return [torch.tensor(r.logprobs) for r in reqs]


def hf_logprobs(hf, prompts) -> list:
    with torch.no_grad():
        out = []
        for p in prompts:
            lp = torch.log_softmax(hf(torch.tensor([p])).logits[0].float(), -1)
            out.append(lp[:-1].gather(-1, torch.tensor(p[1:])[:, None])[:, 0])
    return out


@pytest.mark.parametrize("kind", ["llama", "llama3", "qwen2", "sharded"])
def test_logits_match_transformers(tmp_path, kind):
    """Every next-token log-probability equals transformers' (float32), through chunked prefill."""
    folder, hf = tiny_hf_checkpoint(tmp_path, kind)
    if kind == "sharded":
        assert (folder / "model.safetensors.index.json").exists()
    model = load_checkpoint(folder, dtype=torch.float32)
    prompts = [torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 77, 200)]
    want = hf_logprobs(hf, prompts)
    got = engine_logprobs(model, REFERENCE, prompts, max_batch_tokens=48)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=ATOL)


def test_llama3_scaling_is_seen(tmp_path):
    """The comparison above can fail: the llama3 checkpoint read with plain RoPE differs."""
    folder, hf = tiny_hf_checkpoint(tmp_path, "llama3")
    model = load_checkpoint(folder, dtype=torch.float32)
    model.inv_freq = RopeConfig(theta=10000.0).inv_freq(model.config.head_dim)  # the planted bug
    prompt = [torch.randint(0, 101, (200,), generator=torch.Generator().manual_seed(1)).tolist()]
    diff = (engine_logprobs(model, REFERENCE, prompt)[0] - hf_logprobs(hf, prompt)[0]).abs().max()
    assert diff > 10 * ATOL


def test_both_rope_config_forms(tmp_path):
    """transformers 5's rope_parameters and the older rope_theta + rope_scaling give the same frequencies."""
    new = RopeConfig.from_hf({"rope_parameters": {"rope_theta": 500000.0, **LLAMA3_SCALING}})
    old = RopeConfig.from_hf({"rope_theta": 500000.0, "rope_scaling": {**LLAMA3_SCALING, "type": "llama3"}})
    assert new == old and new.rope_type == "llama3"
    plain = RopeConfig.from_hf({"rope_theta": 500000.0})
    assert not torch.equal(new.inv_freq(128), plain.inv_freq(128))
    with pytest.raises(CheckpointError, match="rope type 'yarn'"):
        RopeConfig.from_hf({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_bad_checkpoint_folders(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="model_type 'gpt2'"):
        load_checkpoint(tmp_path)


class RecordingBackend:
    """TORCH_SDPA, recording every batch it is given (and checking what it sees on the way)."""

    kind = "MHA"

    def __init__(self):
        self.inner = get_backend("TORCH_SDPA")
        self.capabilities = self.inner.capabilities
        self.name = "RECORDING"
        self.batches = []

    def availability(self, device):
        return Availability.yes()

    def run(self, batch):
        batch.validate()  # shapes, ranges and the decode | extend | prefill order
        bs = batch.block_size
        for b, s in enumerate(batch.seq_lens.tolist()):
            used = -(-s // bs)
            pad = batch.block_table[b, used:].long()
            assert torch.isnan(batch.key_cache[pad].float()).all(), "padding must point at NaN blocks"
            if s % bs:  # slots past the sequence in its last block are unwritten: NaN
                last = int(batch.block_table[b, used - 1])
                written = set(batch.slot_mapping.tolist())
                tail = [o for o in range(s % bs, bs) if last * bs + o not in written]
                assert torch.isnan(batch.key_cache[last, tail].float()).all()
        self.batches.append((batch.query_lens(), batch.seq_lens.tolist(), batch.block_table.clone()))
        return self.inner.run(batch)


def test_batches_are_vllm_shaped():
    """Chunked prefill, mixed decode + extend + prefill steps, shuffled growing block tables, NaN padding."""
    model = retrieval.load()
    items = [retrieval.make_item(i, n, 4, 16, 0) for i, n in enumerate([16, 40, 100, 150, 33, 70])]
    rec = RecordingBackend()
    engine = Engine(model, rec, max_batch_tokens=64, max_seqs=4)
    out = engine.generate([it["prompt"] for it in items], 4)
    assert out == [it["answer"] for it in items]
    kinds = [tuple(classify_rows(q, s)) for q, s, _ in rec.batches]
    assert any({"decode", "extend"} <= set(k) for k in kinds), kinds
    assert any({"decode", "prefill"} <= set(k) for k in kinds), kinds
    tables = [t[i, :-(-s // 16)].tolist() for q, ss, t in rec.batches for i, s in enumerate(ss)]
    assert any(row != sorted(row) for row in tables if len(row) > 2), "block tables should be scattered"


class MLAReferenceBackend:
    """Float64 MLA over the latent cache (reference.mla): shows the GQA->MLA embedding is exact."""

    name = "MLA_REFERENCE"
    kind = "MLA"
    capabilities = Capabilities(block_sizes=BlockSizes())

    def availability(self, device):
        return Availability.yes()

    def run(self, batch):
        write_latent(batch.kv_c, batch.k_pe, batch.kv_cache, batch.slot_mapping)
        out, _ = paged_mla(batch.q_nope, batch.q_pe, batch.kv_cache, batch.w_uk, batch.w_uv, batch.block_table,
                           batch.query_start_loc, batch.seq_lens, scale=batch.scale)
        return BackendOutput(out.to(batch.dtype))


def test_mla_embedding_is_exact(tmp_path):
    """A GQA model through an MLA backend (latent = [k | v], 0/1 W_UK/W_UV) gives the MHA result."""
    folder, _ = tiny_hf_checkpoint(tmp_path, "llama")
    model = load_checkpoint(folder, dtype=torch.float32)
    prompts = [torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 60)]
    mha = engine_logprobs(model, REFERENCE, prompts, max_batch_tokens=32)
    mla = engine_logprobs(model, MLAReferenceBackend(), prompts, max_batch_tokens=32)
    for a, b in zip(mha, mla):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_retrieval_model_is_exact_by_construction():
    """The analytic model's margins: the needle holds all but ~1e-10 of the softmax at 4096 tokens."""
    codes = retrieval.key_codes()
    assert torch.equal(codes @ codes.T, torch.diag(torch.full((128,), 64.0)) - torch.diag(torch.full((64,), 64.0), 64)
                       - torch.diag(torch.full((64,), 64.0), -64))
    inv = retrieval.config().rope.inv_freq(retrieval.HEAD_DIM)
    frozen = retrieval.frozen_rope_dims()
    assert float(inv[frozen[:64] % 64].max()) * 4096 < 1e-5  # radians turned at 4096 tokens
    assert 4096 * math.exp(-retrieval.MATCH_SCORE) < 1e-9
