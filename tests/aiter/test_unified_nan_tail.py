"""AITER 0.1.7 unified_attention drops its tile mask when TILE_SIZE == block_size (all-decode
launch): NaN in unwritten slots of a sequence's last KV block leaks through 0*NaN. The same case
passes when those slots hold 0, which shows the failure is the kernel reading them, and the
backend declares it as a known issue (an expected failure, reported, never hidden)."""

import pytest
import torch

from attncheck import golden, harness
from attncheck.cases import MHACase
from impl.backends.rocm_aiter_unified_attn import reads_poisoned_tail, tile_is_block
from impl.platform import is_interpreter

pytestmark = [pytest.mark.smoke, pytest.mark.skipif(not is_interpreter(), reason="needs TRITON_INTERPRET=1")]

DECODE = MHACase("unified-nan-tail", seq_lens=(17, 5), query_lens=(1, 1), dtype="fp16")


def test_nan_tail_is_read_by_the_all_decode_launch():
    tensors = golden.generate(DECODE)
    poisoned = harness.run_backend("ROCM_AITER_UNIFIED_ATTN", DECODE, device="cpu", tensors=tensors)
    assert poisoned.status == "xfail" and "tile mask" in poisoned.reason
    clean = dict(tensors)
    for name in ("key_cache", "value_cache"):
        clean[name] = torch.nan_to_num(tensors[name], nan=0.0)
    assert harness.run_backend("ROCM_AITER_UNIFIED_ATTN", DECODE, device="cpu", tensors=clean).status == "pass"


def test_known_issue_scope():
    p = DECODE.typed_params()
    assert tile_is_block(p, num_sms=132) and reads_poisoned_tail(p, num_sms=132)
    aligned = MHACase("a", seq_lens=(16, 32), query_lens=(1, 1)).typed_params()
    assert not reads_poisoned_tail(aligned, num_sms=132)  # no partly written block
    mixed = MHACase("m", seq_lens=(17, 40), query_lens=(1, 9)).typed_params()
    assert not tile_is_block(mixed, num_sms=132)  # 2-D launch tiles by 64 and masks
