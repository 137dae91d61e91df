"""Bad input gets a clear error naming the argument and what was expected."""

import pytest
import torch

from attncheck import golden
from attncheck.cases import get_case
from attncheck.mha_case import batch_from_tensors
from impl.batch import BatchError

pytestmark = pytest.mark.smoke


@pytest.fixture
def batch():
    case = get_case("mixed-h8x2-d64-bs16-bf16")
    return batch_from_tensors(case, golden.load(case), "cpu")


def test_stored_batch_is_valid(batch):
    batch.validate()


@pytest.mark.parametrize("mutate,needle", [
    (lambda b: setattr(b, "query", b.query[:, :, :32]), "key: expected"),
    (lambda b: setattr(b, "query", b.query.float()), "key/value: dtype must equal query"),
    (lambda b: setattr(b, "key_cache", b.key_cache.permute(0, 2, 1, 3)), "key_cache: expected [num_blocks, block_size, 2, 64] (NHD)"),
    (lambda b: b.block_table.__setitem__((1, 0), 10_000), "block_table: sequence 1 uses block 10000, out of range"),
    (lambda b: b.block_table.__setitem__((0, 0), -3), "block_table: sequence 0 uses block -3"),
    (lambda b: setattr(b, "query_start_loc", b.query_start_loc.flip(0)), "query_start_loc"),
    (lambda b: setattr(b, "seq_lens", b.seq_lens - 10), "seq_lens: sequence"),
    (lambda b: setattr(b, "slot_mapping", b.slot_mapping[:-1]), "slot_mapping: expected"),
    (lambda b: setattr(b, "block_table", b.block_table.float()), "block_table: expected int32 or int64"),
    (lambda b: setattr(b, "kv_cache_dtype", "fp8"), "kv_cache_dtype: expected 'auto', 'fp8_e4m3fn' or 'fp8_e4m3fnuz'"),
    (lambda b: setattr(b, "sliding_window", 0), "sliding_window: expected a whole number of keys >= 1"),
    (lambda b: setattr(b, "alibi_slopes", torch.ones(3)), "alibi_slopes: expected float32 [8]"),
    # a cache with block size 0 (ZeroDivisionError before)
    (lambda b: (setattr(b, "key_cache", b.key_cache[:, :0]), setattr(b, "value_cache", b.value_cache[:, :0])),
     "key_cache: block_size (dim 1) must be >= 1"),
    (lambda b: setattr(b, "scale", float("nan")), "scale: expected a positive finite number, got nan"),
    (lambda b: setattr(b, "scale", -0.125), "scale: expected a positive finite number, got -0.125"),
    (lambda b: setattr(b, "scale", "0.125"), "scale: expected a positive finite number, got str '0.125'"),
    (lambda b: setattr(b, "k_scale", float("inf")), "k_scale: expected a positive finite number, got inf"),
    (lambda b: setattr(b, "v_scale", 0.0), "v_scale: expected a positive finite number, got 0.0"),
    (lambda b: setattr(b, "sliding_window", 2.7), "sliding_window: expected a whole number of keys >= 1 (or None), got 2.7"),
    (lambda b: setattr(b, "softcap", float("nan")), "softcap: expected a positive finite number, got nan"),
    (lambda b: b.slot_mapping.__setitem__(1, int(b.slot_mapping[0])), "slot_mapping: tokens 0 and 1 both write slot"),
    (lambda b: b.slot_mapping.__setitem__(0, int(b.block_table[1, 0]) * b.block_size),
     "slot_mapping: token 0 (sequence 0, position"),
    (lambda b: setattr(b, "value_cache", b.value_cache.float()),
     "value_cache: kv_cache_dtype 'auto' needs dtype torch.bfloat16 (the model dtype), got torch.float32"),
])
def test_bad_batch_is_rejected_with_the_argument_named(batch, mutate, needle):
    mutate(batch)
    with pytest.raises(BatchError) as e:
        batch.validate()
    assert needle in str(e.value)


def test_a_slot_in_another_sequences_block_is_not_a_duplicate(batch):
    """The planted row above must fail for the right reason: the slot it picks is no other new
    token's slot (so only the own-block check can catch it)."""
    slot = int(batch.block_table[1, 0]) * batch.block_size
    assert slot not in batch.slot_mapping.tolist()


@pytest.fixture
def mla_batch():
    case = get_case("mla-mixed-h8-mini-bs16-bf16-fp8e4m3fn")
    return golden.case_module(case).batch_from_tensors(case, golden.load(case), "cpu")


def test_stored_mla_batch_is_valid(mla_batch):
    mla_batch.validate()


@pytest.mark.parametrize("mutate,needle", [
    (lambda b: setattr(b, "q_nope", b.q_nope.tolist()), "q_nope: expected a torch.Tensor [tokens, heads, P], got list"),
    (lambda b: setattr(b, "kv_scale", -1.0), "kv_scale: expected a positive finite number, got -1.0"),
    (lambda b: setattr(b, "kv_scale", float("inf")), "kv_scale: expected a positive finite number, got inf"),
    (lambda b: setattr(b, "q_pe", b.q_pe.float()), "q_pe: dtype must equal q_nope's torch.bfloat16, got torch.float32"),
    (lambda b: setattr(b, "kv_c", b.kv_c.half()), "kv_c: dtype must equal q_nope's torch.bfloat16, got torch.float16"),
    (lambda b: setattr(b, "scale", float("nan")), "scale: expected a positive finite number, got nan"),
    (lambda b: setattr(b, "kv_cache", b.kv_cache[:, :0]), "kv_cache: block_size (dim 1) must be >= 1"),
    (lambda b: b.slot_mapping.__setitem__(2, int(b.slot_mapping[1])), "slot_mapping: tokens 1 and 2 both write slot"),
])
def test_bad_mla_batch_is_rejected_with_the_argument_named(mla_batch, mutate, needle):
    mutate(mla_batch)
    with pytest.raises(BatchError) as e:
        mla_batch.validate()
    assert needle in str(e.value)


def test_unordered_batch_is_an_error_unless_allowed():
    case = get_case("unordered-h8x2-d64-bs16-bf16")
    b = batch_from_tensors(case, golden.load(case), "cpu")
    with pytest.raises(BatchError, match="vLLM orders decode \\| extend \\| prefill"):
        b.validate()
    b.validate(allow_unordered=True)
