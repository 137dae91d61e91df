"""The panel can fail: a member with one planted defect is caught on a stored case.

Each planted variant is a panel member changed in one place. The test runs the correct member
and its planted twin through the same harness path on the same case and requires a check that
the correct member passes to fail for the twin (so the catch is the defect's, not a budget gap).
"""

from dataclasses import replace

import pytest
import torch

from attncheck import golden, harness
from attncheck.cases import get_case
from tests.panel.members import LN2, MEMBERS, PanelMHA, PanelMLA, gather

pytestmark = pytest.mark.smoke


class LseInLog2(PanelMHA):
    """exp2 kernel that forgets to convert its LSE back to natural log."""

    def run(self, batch):
        out = super().run(batch)
        out.lse = out.lse / LN2
        return out


class DropsNewestKey(PanelMHA):
    """Every query ignores its sequence's newest key (an off-by-one key range)."""

    def _logits(self, batch, q, k, qpos, kpos):
        s = super()._logits(batch, q, k, qpos, kpos)
        return s.masked_fill((kpos == qpos.max())[None, None, :], float("-inf"))


class PInFp8(PanelMHA):
    """Probabilities rounded to fp8 e4m3 before P.V."""

    def _pv(self, p, v, dt):
        return super()._pv(p.to(torch.float8_e4m3fn).float(), v, dt)


class IgnoresSinks(PanelMHA):
    def _attend(self, batch, q, k, v, qpos, kpos):
        return super()._attend(replace(batch, sinks=None), q, k, v, qpos, kpos)


class OnlineWithoutRescale(PanelMHA):
    """Online softmax that never rescales its running sums when the running max grows."""

    def _rescale(self, m_old, m_new):
        return torch.where(torch.isinf(m_old), torch.zeros_like(m_old), torch.ones_like(m_old))


class ReadsWholeBlocks(PanelMHA):
    """Gathers every slot of the sequence's blocks and masks the unused ones in the scores: their
    probability is 0, but 0 * the NaN poison in V is NaN."""

    def _keys(self, batch, b, seq_len, q0, q1):
        bs = batch.block_size
        self._seq_len = seq_len
        whole = -(-seq_len // bs) * bs
        row = batch.block_table[b]
        return (gather(batch.key_cache, row, 0, whole, batch.k_scale, batch.is_fp8),
                gather(batch.value_cache, row, 0, whole, batch.v_scale, batch.is_fp8))

    def _logits(self, batch, q, k, qpos, kpos):
        s = super()._logits(batch, q, k, qpos, kpos)
        return s.masked_fill((kpos >= self._seq_len)[None, None, :], float("-inf"))


class SkipsCacheWrite(PanelMHA):
    def _write(self, batch):
        pass


class SplitPartialWithoutEmptyGuard(PanelMHA):
    """Split-KV whose partial output is acc / l unguarded: a segment whose keys are all masked
    for a row gives 0 / 0 = NaN, and its zero merge weight does not cancel a NaN."""

    def _finish(self, m, l, acc, sinks):
        o, lse = super()._finish(m, l, acc, sinks)
        return acc / l[..., None], lse


class MLAScaleFromCacheWidth(PanelMLA):
    """The layer scale re-derived from the 576-wide latent entry (vLLM PR #41569's bug)."""

    def run(self, batch):
        return super().run(replace(batch, scale=(batch.kv_lora_rank + batch.rope_dim) ** -0.5))


class MLAWithoutRope(PanelMLA):
    """Absorbed path that drops the rope part of the score (q_pe . k_pe)."""

    def run(self, batch):
        return super().run(replace(batch, q_pe=torch.zeros_like(batch.q_pe)))


def _mha(cls, base):
    m = MEMBERS[base]
    return cls(f"PLANTED_{cls.__name__}", m.recipe, m.note)


def _mla(cls, base):
    m = MEMBERS[base]
    return cls(f"PLANTED_{cls.__name__}", m.rows, m.note)


# (planted, correct twin, case, a check the twin passes and the planted one must fail)
PLANTED = [
    (lambda: _mha(LseInLog2, "PANEL_EXP2"), "PANEL_EXP2", "mixed-h8x2-d64-bs16-bf16", "lse"),
    (lambda: _mha(DropsNewestKey, "PANEL_SCORES_FP32"), "PANEL_SCORES_FP32", "prefill-h8x2-d64-bs16-bf16", "per-row"),
    (lambda: _mha(DropsNewestKey, "PANEL_ONLINE64"), "PANEL_ONLINE64", "decode-h5x1-d64-bs16-bf16-long4099",
     "per-row"),
    (lambda: _mha(PInFp8, "PANEL_P_ROUNDED"), "PANEL_P_ROUNDED", "mixed-h8x2-d64-bs16-bf16", "per-row"),
    (lambda: _mha(IgnoresSinks, "PANEL_SPLIT_KV4"), "PANEL_SPLIT_KV4", "mixed-h8x2-d64-bs16-bf16-sinks", "per-row"),
    (lambda: _mha(OnlineWithoutRescale, "PANEL_ONLINE16"), "PANEL_ONLINE16", "mixed-h8x2-d64-bs16-bf16", "per-row"),
    (lambda: _mha(ReadsWholeBlocks, "PANEL_SCORES_FP32"), "PANEL_SCORES_FP32", "mixed-h8x2-d64-bs16-bf16", "finite"),
    (lambda: _mha(SkipsCacheWrite, "PANEL_FP8_NEW_FROM_INPUTS"), "PANEL_FP8_NEW_FROM_INPUTS",
     "mixed-h8x2-d64-bs16-bf16-fp8e4m3fn", "key_cache write"),
    (lambda: _mha(SplitPartialWithoutEmptyGuard, "PANEL_SPLIT_KV4"), "PANEL_SPLIT_KV4",
     "prefill-h8x2-d64-bs16-bf16", "finite"),
    (lambda: _mla(MLAScaleFromCacheWidth, "PANEL_MLA_MIXED"), "PANEL_MLA_MIXED", "mla-mixed-h8-bs16-bf16", "per-row"),
    (lambda: _mla(MLAWithoutRope, "PANEL_MLA_ABSORBED"), "PANEL_MLA_ABSORBED", "mla-decode-h16-mini-bs16-bf16",
     "per-row"),
]


def _check_failed(verdict, check: str) -> bool:
    return any(c.name.startswith(check) and not c.passed for c in verdict.checks)


@pytest.mark.parametrize("make,twin,case,check", PLANTED,
                         ids=[f"{p[0]().name}-{p[2]}" for p in PLANTED])
def test_planted_member_fails_where_its_twin_passes(make, twin, case, check, device):
    good = harness.run_backend(MEMBERS[twin], case, device=device)
    bad = harness.run_backend(make(), case, device=device)
    assert good.status in ("pass", "fail") and not _check_failed(good, check), good.report
    assert bad.status == "fail" and _check_failed(bad, check), f"{check} not caught:\n{bad.report}"


@pytest.mark.parametrize("name", ["PANEL_EXP_20ULP", "PANEL_TANH_EXP_FORM"])
def test_fast_math_members_pass_only_with_the_float32_step(name):
    """The fast-math members (an exp off by up to 20 ulps, PyTorch's CPU exp_u20; softcap's
    tanh from such exps) are correct kernels, and the budget's ``out_step`` term is what
    accepts them: without it the same stored fp32 case fails its per-row check."""
    case = "mixed-h8x8-d64-bs16-fp32"
    stored = golden.load(get_case(case))
    assert harness.run_backend(MEMBERS[name], case, tensors=stored).status == "pass"
    without = {k: v for k, v in stored.items() if not k.startswith("budget.out_step")}
    assert len(without) == len(stored) - 2
    v = harness.run_backend(MEMBERS[name], case, tensors=without)
    assert v.status == "fail" and v.worst_ratio > 1.5, (v.status, v.worst_ratio)
