"""Every knob of the batch has a stored case on which a wrong value of it fails (issue 9 item 3).

For each field of ``impl.batch.AttentionBatch`` and ``MLABatch`` the table below names a smoke
case and a planted bug: a correct plain-torch backend (tests.planted) handed a wrong value of
that one field, as a kernel that misreads the knob would compute. The verdict must be a fail.
docs/knobs.md is this table for people; a test keeps the two equal.
"""

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from attncheck import harness
from impl.batch import AttentionBatch, MLABatch
from tests.planted import PlantedBackend, PlantedMLABackend, WrongKnob

pytestmark = pytest.mark.smoke
DOC = Path(__file__).resolve().parent.parent / "docs" / "knobs.md"


def _rolled(t, dim=0):
    return torch.roll(t, 1, dims=dim)


def _other_fp8(batch):
    """The fp8 cache bytes read (and written) as the other e4m3 flavour (fn <-> fnuz)."""
    other = {"fp8_e4m3fn": ("fp8_e4m3fnuz", torch.float8_e4m3fnuz),
             "fp8_e4m3fnuz": ("fp8_e4m3fn", torch.float8_e4m3fn)}[batch.kv_cache_dtype]
    fields = ("key_cache", "value_cache") if isinstance(batch, AttentionBatch) else ("kv_cache",)
    return {"kv_cache_dtype": other[0], **{f: getattr(batch, f).view(other[1]) for f in fields}}


def _qsl_shifted(batch):
    qsl = batch.query_start_loc.clone()
    qsl[1] += 1  # sequence 0 takes sequence 1's first query token
    return qsl


MHA = "mixed-h8x2-d64-bs16-bf16"
MLA = "mla-mixed-h8-mini-bs16-bf16-fp8e4m3fn"
# (field, case, what the wrong value is, mutate(batch) -> the wrong value or a dict of fields)
KNOBS = {
    "MHA": [
        ("query", MHA, "query rows shifted by one token", lambda b: _rolled(b.query)),
        ("key", MHA, "new keys of the wrong token (cache write and attention)", lambda b: _rolled(b.key)),
        ("value", MHA, "new values of the wrong token", lambda b: _rolled(b.value)),
        ("key_cache", MHA, "a copy written instead of the batch's key cache", lambda b: b.key_cache.clone()),
        ("value_cache", MHA, "a copy written instead of the batch's value cache", lambda b: b.value_cache.clone()),
        ("block_table", MHA, "each sequence reads the next one's block table", lambda b: _rolled(b.block_table)),
        ("query_start_loc", MHA, "sequence boundary off by one token", _qsl_shifted),
        ("seq_lens", MHA, "every sequence one key short", lambda b: b.seq_lens - 1),
        ("slot_mapping", MHA, "new tokens written one slot late", lambda b: b.slot_mapping + 1),
        ("scale", "mixed-h8x2-d64-bs16-bf16-scale0.3", "1/sqrt(head_size) instead of the given scale",
         lambda b: b.head_size ** -0.5),
        ("causal", "prefill-h8x2-d64-bs16-bf16", "causal mask ignored", lambda b: False),
        ("sliding_window", "decode-h8x2-d128-bs16-fp16-window7", "window one key too wide",
         lambda b: b.sliding_window + 1),
        ("softcap", "mixed-h8x2-d64-bs16-bf16-softcap50", "softcap ignored", lambda b: None),
        ("alibi_slopes", "mixed-h8x2-d64-bs16-fp16-alibi", "slopes in reverse head order",
         lambda b: b.alibi_slopes.flip(0)),
        ("sinks", "mixed-h8x2-d64-bs16-bf16-sinks", "sinks ignored", lambda b: None),
        ("kv_cache_dtype", "mixed-h8x2-d64-bs16-fp16-fp8e4m3fnuz", "e4m3fnuz bytes read as e4m3fn", _other_fp8),
        ("k_scale", "mixed-h8x2-d64-bs16-bf16-fp8e4m3fn", "k_scale ignored (1.0)", lambda b: 1.0),
        ("v_scale", "mixed-h8x2-d64-bs16-bf16-fp8e4m3fn", "v_scale ignored (1.0)", lambda b: 1.0),
    ],
    "MLA": [
        ("q_nope", MLA, "nope query rows shifted by one token", lambda b: _rolled(b.q_nope)),
        ("q_pe", MLA, "rope query rows shifted by one token", lambda b: _rolled(b.q_pe)),
        ("kv_c", MLA, "new latents of the wrong token", lambda b: _rolled(b.kv_c)),
        ("k_pe", MLA, "new rope keys of the wrong token", lambda b: _rolled(b.k_pe)),
        ("kv_cache", MLA, "a copy written instead of the batch's latent cache", lambda b: b.kv_cache.clone()),
        ("w_uk", MLA, "W_UK of the wrong head", lambda b: _rolled(b.w_uk, 1)),
        ("w_uv", MLA, "W_UV of the wrong head", lambda b: _rolled(b.w_uv, 1)),
        ("block_table", MLA, "each sequence reads the next one's block table", lambda b: _rolled(b.block_table)),
        ("query_start_loc", MLA, "sequence boundary off by one token", _qsl_shifted),
        ("seq_lens", MLA, "every sequence one key short", lambda b: b.seq_lens - 1),
        ("slot_mapping", MLA, "new tokens written one slot late", lambda b: b.slot_mapping + 1),
        ("scale", MLA, "1/sqrt(576) (the latent width) instead of the layer scale (vLLM PR #41569)",
         lambda b: 576 ** -0.5),
        ("kv_cache_dtype", "mla-mixed-h8-mini-bs16-fp16-fp8e4m3fnuz", "e4m3fnuz bytes read as e4m3fn", _other_fp8),
        ("kv_scale", MLA, "kv_scale ignored (1.0)", lambda b: 1.0),
    ],
}
# A knob whose wrong value cannot change a correct result, and what exercises it instead.
RESULT_INVARIANT = {
    "context_chunk_tokens": "a test-only override of how a pipeline chunks the context: any value gives the same "
                            "math. Chunking bugs fail the chunked cases instead: the context LSE not returned to "
                            "the merge (tests/backends/test_rocm_aiter_fa_planted.py, planted-extend-lse) and the "
                            "merge without its -inf guard (tests/backends/test_mla_planted.py)",
}
ROWS = [(kind, *row) for kind, rows in KNOBS.items() for row in rows]


def _backend(kind, field, mutate, what):
    return WrongKnob(PlantedBackend(None) if kind == "MHA" else PlantedMLABackend(), field, mutate, what)


@pytest.mark.parametrize("kind,field,case,what,mutate", ROWS, ids=[f"{r[0]}-{r[1]}" for r in ROWS])
def test_a_wrong_value_of_each_knob_fails(kind, field, case, what, mutate):
    assert harness.run_backend(PlantedBackend(None) if kind == "MHA" else PlantedMLABackend(), case).status == "pass"
    v = harness.run_backend(_backend(kind, field, mutate, what), case)
    assert v.status == "fail", f"{field} ({what}) passed {case}: {v.report}"


@pytest.mark.parametrize("kind,batch_type", [("MHA", AttentionBatch), ("MLA", MLABatch)])
def test_every_batch_field_is_in_the_table(kind, batch_type):
    fields = {f.name for f in dataclasses.fields(batch_type)}
    covered = {row[0] for row in KNOBS[kind]} | set(RESULT_INVARIANT)
    assert fields == covered, f"{kind}: no wrong-value case for {sorted(fields - covered)}"


def test_docs_table_is_this_table():
    text = DOC.read_text()
    rows = re.findall(r"^\| (MHA|MLA) \| `(\w+)` \| `([\w.-]+)` \| (.+?) \|$", text, flags=re.M)
    assert [(k, f, c, w) for k, f, c, w in rows] == [(k, f, c, w) for k, f, c, w, _ in ROWS]
    for field in RESULT_INVARIANT:
        assert f"`{field}`" in text
