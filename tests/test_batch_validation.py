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
    (lambda b: setattr(b, "sliding_window", 0), "sliding_window: must be >= 1"),
    (lambda b: setattr(b, "alibi_slopes", torch.ones(3)), "alibi_slopes: expected float32 [8]"),
])
def test_bad_batch_is_rejected_with_the_argument_named(batch, mutate, needle):
    mutate(batch)
    with pytest.raises(BatchError) as e:
        batch.validate()
    assert needle in str(e.value)


def test_unordered_batch_is_an_error_unless_allowed():
    case = get_case("unordered-h8x2-d64-bs16-bf16")
    b = batch_from_tensors(case, golden.load(case), "cpu")
    with pytest.raises(BatchError, match="vLLM orders decode \\| extend \\| prefill"):
        b.validate()
    b.validate(allow_unordered=True)
