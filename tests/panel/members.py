"""The panel: independent, correct attention kernels that every stored case must accept.

DESIGN.md ("Pass/fail rule") promises that every legitimate implementation passes: any op
order, probabilities rounded or not, blockwise or split-KV softmax, fp32 accumulation in any
order, and for fp8 both pipelines that attend new tokens from the unquantised inputs and those
that read them back from the cache. Each member below is such a kernel, written in plain torch
from the batch conventions in impl/batch.py (it imports nothing of reference/ or attncheck/),
differing from its siblings only in where it rounds and in which order it reduces. Members
are ordinary backends (name, kind, capabilities, availability, run), so they also load as a
plugin: ``attncheck verify --backend-plugin tests.panel.members:make_backends --backend PANEL_EXP2``.

Shared by every member: the new K/V (MLA: the latent) are written first, fp8 as
``RNE(clamp(x.float() / scale, +-max))``; keys are gathered position by position through the
block table (never whole blocks, so NaN-poisoned slots are never read); scores, softmax and
accumulation are fp32 unless the member says otherwise; a row with no visible key gives
output 0 and LSE -inf; the LSE is natural-log, excludes the sinks, layout ``[heads, tokens]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch

from impl.backend import Availability, BackendOutput, BlockSizes, Capabilities

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
NEG_INF = float("-inf")


# ---- cache write and gather (shared by MHA and MLA) ------------------------------------------

def quantise(x: torch.Tensor, scale: float, cache_dtype: torch.dtype, fp8: bool) -> torch.Tensor:
    """The stored value: fp8 = round-to-nearest-even of clamp(x / scale, +-max) (torch's cast
    rounds to nearest even); otherwise a plain cast to the cache dtype."""
    if not fp8:
        return x.to(cache_dtype)
    fmax = torch.finfo(cache_dtype).max
    return (x.float() / scale).clamp(-fmax, fmax).to(cache_dtype)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """fp8 tensors as their bytes: indexing kernels do not cover every fp8 dtype on every torch
    build and device (pytorch#133605); byte copies do, and move the exact bits."""
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz) else t


def write_slots(cache: torch.Tensor, slot_mapping: torch.Tensor, values: torch.Tensor) -> None:
    """cache [num_blocks, block_size, ...]; slot s is offset s % block_size of block s // block_size."""
    bs = cache.shape[1]
    slots = slot_mapping.long()
    _bytes(cache)[slots // bs, slots % bs] = _bytes(values)


def gather(cache: torch.Tensor, block_table_row: torch.Tensor, start: int, end: int,
           scale: float, fp8: bool) -> torch.Tensor:
    """Positions start..end-1 of one sequence, dequantised to fp32 (fp8: stored * scale)."""
    bs = cache.shape[1]
    pos = torch.arange(start, end, device=cache.device)
    blocks = block_table_row.long()[pos // bs]
    x = _bytes(cache)[blocks, pos % bs].view(cache.dtype).float()
    return x * scale if fp8 else x


def _zero_safe(m: torch.Tensor) -> torch.Tensor:
    """Row maxima with -inf (no visible key yet) replaced by 0, so exp(s - m) stays finite."""
    return torch.where(torch.isinf(m), torch.zeros_like(m), m)


# ---- MHA --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """Where one MHA kernel rounds and how it reduces.

    scores:    "scaled_fp32" (q.k in fp32, times the scale in fp32), "q_prescaled" (Q times the
               scale, rounded to the model dtype), "k_prescaled" (K likewise), "exp2" (log2(e)
               folded into the scale, exp2/log2 throughout, LSE converted back to natural log)
    p_rounded: probabilities rounded to the model dtype before P.V (l stays fp32)
    normalise: "after" (o = (P.V) / l, FlashAttention) or "before" (P / l in fp32, then P.V)
    softmax:   "full" (one pass over all keys), "online" (blocks of ``block`` keys, running
               max and rescaling), "split" (``splits`` key segments, each a normalised fp32
               partial with its LSE, merged by LSE weights)
    key_order: "natural", "reversed" or "permuted" (a fixed permutation): the order the keys are
               laid out in, hence the order the fp32 sums over keys are accumulated in
    fp8_new:   "cache" (new tokens read back from the cache after the write) or "inputs" (new
               tokens attended from the unquantised key/value inputs, context from the cache)
    exp_ulps:  0 (torch's exp), or an exp off by up to that many float32 ulps (relative), as a
               fast-math kernel's is (PyTorch's CPU flash attention uses exp_u20: up to 20)
    tanh:      "torch" or "exp_form": softcap's tanh as (e^x - e^-x) / (e^x + e^-x) from the
               recipe's exps (vLLM's Triton kernels compute it this way)
    """

    scores: str = "scaled_fp32"
    p_rounded: bool = False
    normalise: str = "after"
    softmax: str = "full"
    block: int = 0
    splits: int = 0
    key_order: str = "natural"
    fp8_new: str = "cache"
    exp_ulps: int = 0
    tanh: str = "torch"


def inexact(y: torch.Tensor, x: torch.Tensor, ulps: int) -> torch.Tensor:
    """fp32 ``y`` = f(x) off by a relative error of up to ``ulps`` * 2^-24 (between ulps/2 and
    ulps float32 ulps of y), deterministic in x: sign and size come from a hash of x's bits,
    so every run and device agree."""
    if ulps == 0:
        return y
    bits = x.float().contiguous().view(torch.int32).to(torch.int64)
    frac = ((bits * 2654435761) % 65536).to(torch.float64) / 32768.0 - 1.0  # in [-1, 1)
    return (y.double() * (1.0 + frac * ulps * 2.0 ** -24)).float()


MHA_CAPABILITIES = Capabilities(
    dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
    block_sizes=BlockSizes(multiple_of=1), causal=True, non_causal=True, sliding_window=True,
    softcap=True, alibi=True, sinks=True, fp8_kv=frozenset({"fp8_e4m3fn", "fp8_e4m3fnuz"}),
    returns_lse=True)


def grouped_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q [Sq, Hq, D], k [n, Hkv, D] -> [Hq, Sq, n]; query head h reads kv head h // (Hq / Hkv)."""
    sq, hq, d = q.shape
    n, hkv, _ = k.shape
    s = torch.einsum("qkgd,nkd->kgqn", q.reshape(sq, hkv, hq // hkv, d), k)
    return s.reshape(hq, sq, n)


def grouped_pv(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """p [Hq, Sq, n], v [n, Hkv, D] -> [Hq, Sq, D]."""
    hq, sq, n = p.shape
    _, hkv, d = v.shape
    return torch.einsum("kgqn,nkd->kgqd", p.reshape(hkv, hq // hkv, sq, n), v).reshape(hq, sq, d)


class PanelMHA:
    kind = "MHA"
    provider = "panel (plain torch)"
    capabilities = MHA_CAPABILITIES

    def __init__(self, name: str, recipe: Recipe, note: str):
        self.name = name
        self.recipe = recipe
        self.note = note

    def availability(self, device):
        return Availability.yes("plain torch")

    # -- pieces ---------------------------------------------------------------------------------
    def _write(self, batch) -> None:
        for cache, new, scale in ((batch.key_cache, batch.key, batch.k_scale),
                                  (batch.value_cache, batch.value, batch.v_scale)):
            write_slots(cache, batch.slot_mapping, quantise(new, scale, cache.dtype, batch.is_fp8))

    def _keys(self, batch, b: int, seq_len: int, q0: int, q1: int):
        """fp32 K, V [seq_len, Hkv, D] of sequence b, from the cache (after the write) or, for
        the fp8 "inputs" recipe, the new tokens from the unquantised inputs."""
        row = batch.block_table[b]
        fp8 = batch.is_fp8
        ctx = seq_len - (q1 - q0)
        if fp8 and self.recipe.fp8_new == "inputs":
            k = torch.cat([gather(batch.key_cache, row, 0, ctx, batch.k_scale, True), batch.key[q0:q1].float()])
            v = torch.cat([gather(batch.value_cache, row, 0, ctx, batch.v_scale, True), batch.value[q0:q1].float()])
            return k, v
        return (gather(batch.key_cache, row, 0, seq_len, batch.k_scale, fp8),
                gather(batch.value_cache, row, 0, seq_len, batch.v_scale, fp8))

    def _logits(self, batch, q, k, qpos, kpos) -> torch.Tensor:
        """[Hq, Sq, n] final logits (natural units, or log2 units for exp2), -inf where masked."""
        r, dt, scale = self.recipe, batch.dtype, batch.scale
        unit = LOG2E if r.scores == "exp2" else 1.0
        if r.scores == "q_prescaled":
            s = grouped_scores((q.float() * scale).to(dt).float(), k)
        elif r.scores == "k_prescaled":
            s = grouped_scores(q.float(), (k * scale).to(dt).float())
        elif r.scores == "scaled_fp32":
            s = grouped_scores(q.float(), k) * scale
        elif r.scores == "exp2":
            s = grouped_scores(q.float(), k) * (scale * LOG2E)
        else:
            raise ValueError(f"recipe.scores: unknown order {r.scores!r}")
        if batch.softcap:
            cap = batch.softcap * unit  # c' tanh(x'/c') = log2(e) c tanh(x/c) with x' = log2(e) x
            s = cap * self._tanh(s / cap)
        dist = qpos[:, None] - kpos[None, :]
        if batch.alibi_slopes is not None:
            s = s - (batch.alibi_slopes.float() * unit)[:, None, None] * dist.abs().float()[None]
        ok = torch.ones_like(dist, dtype=torch.bool)
        if batch.causal:
            ok &= dist >= 0
        if batch.sliding_window is not None:
            ok &= dist < int(batch.sliding_window)
        return s.masked_fill(~ok[None], NEG_INF)

    def _exp(self, x):
        return inexact(torch.exp2(x) if self.recipe.scores == "exp2" else torch.exp(x), x, self.recipe.exp_ulps)

    def _tanh(self, x):
        if self.recipe.tanh == "torch":
            return torch.tanh(x)
        if self.recipe.tanh == "exp_form":
            ep, en = (inexact(torch.exp(t), t, self.recipe.exp_ulps) for t in (x, -x))
            return (ep - en) / (ep + en)
        raise ValueError(f"recipe.tanh: unknown form {self.recipe.tanh!r}")

    def _log(self, x):
        return torch.log2(x) if self.recipe.scores == "exp2" else torch.log(x)

    def _rescale(self, m_old, m_new):
        """Online softmax: the factor that moves the running sums from the old max to the new."""
        return self._exp(m_old - _zero_safe(m_new))

    def _pv(self, p, v, dt):
        return grouped_pv(p.to(dt).float() if self.recipe.p_rounded else p, v)

    def _partial(self, batch, q, k, qpos, kpos):
        """One pass over the given keys: (row max m, sum l of exp(s - m), unnormalised acc)."""
        s = self._logits(batch, q, k, qpos, kpos)
        m = s.amax(dim=-1)
        p = self._exp(s - _zero_safe(m)[..., None])
        return m, p.sum(dim=-1), p

    def _finish(self, m, l, acc, sinks):
        """o = acc / (l + sink term), lse = m + log l (units of the recipe), empty rows 0 / -inf."""
        if sinks is not None:
            m_all = torch.maximum(m, sinks[:, None])  # the sink joins the max for stability only
            shift = self._exp(m - _zero_safe(m_all))
            shift = torch.where(torch.isinf(m), torch.zeros_like(shift), shift)
            acc, l_k = acc * shift[..., None], l * shift
            denom = l_k + self._exp(sinks[:, None] - _zero_safe(m_all))
        else:
            denom = l
        o = torch.where(denom[..., None] > 0, acc / denom.clamp_min(1e-38)[..., None], torch.zeros_like(acc))
        lse = torch.where(l > 0, m + self._log(l.clamp_min(1e-38)), torch.full_like(m, NEG_INF))
        return o, lse

    def _attend(self, batch, q, k, v, qpos, kpos):
        """[Hq, Sq, D] output (fp32) and [Hq, Sq] LSE in the recipe's units."""
        r, dt = self.recipe, batch.dtype
        sinks = None
        if batch.sinks is not None:
            sinks = batch.sinks.float() * (LOG2E if r.scores == "exp2" else 1.0)
        hq, sq = q.shape[1], q.shape[0]
        if r.softmax == "full":
            m, l, p = self._partial(batch, q, k, qpos, kpos)
            if r.normalise == "before":
                o, lse = self._finish(m, l, p, sinks)  # p / denominator, in fp32
                return grouped_pv(o, v), lse
            return self._finish(m, l, self._pv(p, v, dt), sinks)
        if r.softmax == "online":
            m = torch.full((hq, sq), NEG_INF, device=q.device)
            l = torch.zeros((hq, sq), device=q.device)
            acc = torch.zeros((hq, sq, v.shape[2]), device=q.device)
            for j in range(0, k.shape[0], r.block):
                s = self._logits(batch, q, k[j:j + r.block], qpos, kpos[j:j + r.block])
                m_new = torch.maximum(m, s.amax(dim=-1))
                alpha = self._rescale(m, m_new)
                p = self._exp(s - _zero_safe(m_new)[..., None])
                l = l * alpha + p.sum(dim=-1)
                acc = acc * alpha[..., None] + self._pv(p, v[j:j + r.block], dt)
                m = m_new
            return self._finish(m, l, acc, sinks)
        if r.softmax == "split":
            n = k.shape[0]
            seg = max(1, -(-n // r.splits))
            outs, lses = [], []
            for j in range(0, seg * r.splits, seg):  # trailing segments may be empty
                if j >= n:
                    outs.append(torch.zeros((hq, sq, v.shape[2]), device=q.device))
                    lses.append(torch.full((hq, sq), NEG_INF, device=q.device))
                    continue
                m, l, p = self._partial(batch, q, k[j:j + seg], qpos, kpos[j:j + seg])
                o, lse = self._finish(m, l, self._pv(p, v[j:j + seg], dt), None)
                outs.append(o)
                lses.append(lse)
            lse_parts = torch.stack(lses)  # [splits, Hq, Sq]
            big = lse_parts.amax(dim=0)
            w = self._exp(lse_parts - _zero_safe(big)[None])
            acc = (w[..., None] * torch.stack(outs)).sum(dim=0)
            return self._finish(big, w.sum(dim=0), acc, sinks)
        raise ValueError(f"recipe.softmax: unknown strategy {r.softmax!r}")

    def run(self, batch) -> BackendOutput:
        self._write(batch)
        r = self.recipe
        T, Hq, D = batch.query.shape
        dev = batch.query.device
        out = torch.zeros((T, Hq, D), dtype=batch.dtype, device=dev)
        lse_all = torch.full((Hq, T), NEG_INF, dtype=torch.float32, device=dev)
        qsl = batch.query_start_loc.tolist()
        for b, seq_len in enumerate(batch.seq_lens.tolist()):
            q0, q1 = qsl[b], qsl[b + 1]
            k, v = self._keys(batch, b, seq_len, q0, q1)
            kpos = torch.arange(k.shape[0], device=dev)
            if r.key_order != "natural":
                order = self._key_order(seq_len).to(dev)
                k, v, kpos = k[order], v[order], kpos[order]
            qpos = torch.arange(seq_len - (q1 - q0), seq_len, device=dev)
            o, lse = self._attend(batch, batch.query[q0:q1], k, v, qpos, kpos)
            out[q0:q1] = o.permute(1, 0, 2).to(batch.dtype)
            lse_all[:, q0:q1] = lse * LN2 if r.scores == "exp2" else lse
        return BackendOutput(output=out, lse=lse_all, info={"kernel": f"panel {self.name}: {self.note}"})

    def _key_order(self, n: int) -> torch.Tensor:
        if self.recipe.key_order == "reversed":
            return torch.arange(n - 1, -1, -1)
        if self.recipe.key_order == "permuted":
            return torch.randperm(n, generator=torch.Generator().manual_seed(n))
        raise ValueError(f"recipe.key_order: unknown order {self.recipe.key_order!r}")


# ---- MLA --------------------------------------------------------------------------------------

MLA_CAPABILITIES = Capabilities(
    dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
    block_sizes=BlockSizes(multiple_of=1), causal=True, non_causal=False,
    fp8_kv=frozenset({"fp8_e4m3fn", "fp8_e4m3fnuz"}), returns_lse=True)


def _softmax_pv(s: torch.Tensor, v_fn):
    """s [N, Sq, n] scaled, masked logits; v_fn(p) = p @ V. Returns (o fp32, lse), FlashAttention
    style (unnormalised fp32 P, divided by l at the end); empty rows 0 / -inf."""
    m = s.amax(dim=-1)
    p = torch.exp(s - _zero_safe(m)[..., None])
    l = p.sum(dim=-1)
    o = torch.where(l[..., None] > 0, v_fn(p) / l.clamp_min(1e-38)[..., None], 0.0)
    lse = torch.where(l > 0, m + torch.log(l.clamp_min(1e-38)), torch.full_like(m, NEG_INF))
    return o, lse


def _causal(sq: int, n: int, first_pos: Optional[int], device) -> torch.Tensor:
    """[Sq, n] visibility; first_pos None = no mask (context chunks are fully visible)."""
    if first_pos is None:
        return torch.ones(sq, n, dtype=torch.bool, device=device)
    qpos = first_pos + torch.arange(sq, device=device)
    return torch.arange(n, device=device)[None, :] <= qpos[:, None]


def merge(prefix_o, prefix_lse, suffix_o, suffix_lse, dt):
    """vLLM merge_attn_states math in fp32: o [N, Sq, V], lse [N, Sq]; both empty -> 0, -inf.
    The merged output is rounded to the model dtype, as merge_attn_states writes it."""
    m = torch.maximum(prefix_lse, suffix_lse)
    wp = torch.exp(prefix_lse - _zero_safe(m))
    ws = torch.exp(suffix_lse - _zero_safe(m))
    tot = wp + ws
    safe = torch.where(tot > 0, tot, torch.ones_like(tot))
    o = (prefix_o.float() * (wp / safe)[..., None] + suffix_o.float() * (ws / safe)[..., None]).to(dt).float()
    lse = torch.where(tot > 0, torch.log(safe) + m, torch.full_like(m, NEG_INF))
    return o, lse


class PanelMLA:
    """MLA down one of its two paths per row (reference.mla's docstring states the maths).

    Intermediates are rounded to the model dtype where vLLM's pipelines store them: the
    absorbed query ``q_nope @ W_UK``, the latent output before ``@ W_UV``, the up-projected K
    and V, and every attention output that a merge reads. Attention itself is fp32.
    ``rows``: "absorbed" (every row, all keys read from the latent cache after the write),
    "upprojected" (every row, one pass over all keys read from the cache), or "mixed"
    (vLLM's split: decode rows absorbed; extend and prefill rows up-projected with the new
    tokens from the unquantised kv_c/k_pe inputs, causal, and the context read from the cache
    in chunks of ``context_chunk_tokens``, each non-causal with its LSE, merged in order).
    """

    kind = "MLA"
    provider = "panel (plain torch)"
    capabilities = MLA_CAPABILITIES

    def __init__(self, name: str, rows: str, note: str):
        if rows not in ("absorbed", "upprojected", "mixed"):
            raise ValueError(f"rows: expected 'absorbed', 'upprojected' or 'mixed', got {rows!r}")
        self.name, self.rows, self.note = name, rows, note

    def availability(self, device):
        return Availability.yes("plain torch")

    def _absorbed(self, batch, qn, qp, lat, first_pos):
        """qn [Sq, N, P], qp [Sq, N, R] (model dtype), lat [n, L + R] fp32 -> o [N, Sq, V] fp32, lse."""
        dt, L = batch.dtype, batch.kv_lora_rank
        ql = torch.einsum("qnp,lnp->nql", qn.float(), batch.w_uk.float()).to(dt).float()
        s = (torch.einsum("nql,kl->nqk", ql, lat[:, :L])
             + torch.einsum("qnr,kr->nqk", qp.float(), lat[:, L:])) * batch.scale
        s = s.masked_fill(~_causal(qn.shape[0], lat.shape[0], first_pos, s.device)[None], NEG_INF)
        o_lat, lse = _softmax_pv(s, lambda p: torch.einsum("nqk,kl->nql", p, lat[:, :L]))
        o = torch.einsum("nql,lnv->nqv", o_lat.to(dt).float(), batch.w_uv.float())
        return o, lse

    def _upprojected(self, batch, qn, qp, lat, first_pos):
        dt, L = batch.dtype, batch.kv_lora_rank
        kv_c = lat[:, :L].to(dt).float()  # kv_b_proj runs on model-dtype latents
        k_nope = torch.einsum("kl,lnp->nkp", kv_c, batch.w_uk.float()).to(dt).float()
        v = torch.einsum("kl,lnv->nkv", kv_c, batch.w_uv.float()).to(dt).float()
        k_pe = lat[:, L:].to(dt).float()
        s = (torch.einsum("qnp,nkp->nqk", qn.float(), k_nope)
             + torch.einsum("qnr,kr->nqk", qp.float(), k_pe)) * batch.scale
        s = s.masked_fill(~_causal(qn.shape[0], lat.shape[0], first_pos, s.device)[None], NEG_INF)
        return _softmax_pv(s, lambda p: torch.einsum("nqk,nkv->nqv", p, v))

    def _prefill(self, batch, qn, qp, ctx_lat, new_lat):
        """vLLM's chunked prefill: new tokens causal, context chunks non-causal, merged."""
        dt = batch.dtype
        o, lse = self._upprojected(batch, qn, qp, new_lat, 0)
        o = o.to(dt).float()  # the varlen attention writes its output in the model dtype
        n_ctx = ctx_lat.shape[0]
        if n_ctx == 0:
            return o, lse
        step = batch.context_chunk_tokens or n_ctx
        ctx_o = ctx_lse = None
        for a in range(0, n_ctx, step):
            co, cl = self._upprojected(batch, qn, qp, ctx_lat[a:a + step], None)
            co = co.to(dt).float()
            ctx_o, ctx_lse = (co, cl) if ctx_o is None else merge(ctx_o, ctx_lse, co, cl, dt)
        return merge(ctx_o, ctx_lse, o, lse, dt)

    def run(self, batch) -> BackendOutput:
        fp8 = batch.is_fp8
        latent = torch.cat([batch.kv_c, batch.k_pe], dim=-1)
        write_slots(batch.kv_cache, batch.slot_mapping, quantise(latent, batch.kv_scale, batch.kv_cache.dtype, fp8))
        T, N = batch.q_nope.shape[:2]
        V = batch.w_uv.shape[2]
        dev = batch.q_nope.device
        out = torch.zeros((T, N, V), dtype=batch.dtype, device=dev)
        lse_all = torch.full((N, T), NEG_INF, dtype=torch.float32, device=dev)
        qsl = batch.query_start_loc.tolist()
        kinds = batch.row_kinds()
        for b, seq_len in enumerate(batch.seq_lens.tolist()):
            q0, q1 = qsl[b], qsl[b + 1]
            ctx = seq_len - (q1 - q0)
            qn, qp = batch.q_nope[q0:q1], batch.q_pe[q0:q1]
            row = batch.block_table[b]
            path = self.rows if self.rows != "mixed" else ("absorbed" if kinds[b] == "decode" else "prefill")
            if path == "prefill":
                ctx_lat = gather(batch.kv_cache, row, 0, ctx, batch.kv_scale, fp8)
                o, lse = self._prefill(batch, qn, qp, ctx_lat, latent[q0:q1].float())
            else:
                lat = gather(batch.kv_cache, row, 0, seq_len, batch.kv_scale, fp8)
                attend = self._absorbed if path == "absorbed" else self._upprojected
                o, lse = attend(batch, qn, qp, lat, ctx)
            out[q0:q1] = o.permute(1, 0, 2).to(batch.dtype)
            lse_all[:, q0:q1] = lse
        return BackendOutput(output=out, lse=lse_all, info={"kernel": f"panel {self.name}: {self.note}"})


# ---- the panel --------------------------------------------------------------------------------

_BASE = Recipe()
_KERNEL = replace(_BASE, p_rounded=True)  # blockwise kernels round P before their P.V dot

MHA_MEMBERS = [
    PanelMHA("PANEL_Q_PRESCALED", replace(_BASE, scores="q_prescaled"),
             "Q times the scale rounded to the model dtype (FlashAttention's reference order), fp32 after"),
    PanelMHA("PANEL_K_PRESCALED", replace(_BASE, scores="k_prescaled"),
             "K times the scale rounded to the model dtype, fp32 after"),
    PanelMHA("PANEL_SCORES_FP32", _BASE, "fp32 scores scaled in fp32, fp32 P, o = (P.V) / l"),
    PanelMHA("PANEL_EXP2", replace(_BASE, scores="exp2"), "log2(e) folded into the scale, exp2/log2"),
    PanelMHA("PANEL_P_ROUNDED", replace(_BASE, p_rounded=True), "P rounded to the model dtype before P.V"),
    PanelMHA("PANEL_P_FP32_NORMALISED", replace(_BASE, normalise="before"),
             "P normalised in fp32 before P.V"),
    PanelMHA("PANEL_ONLINE16", replace(_KERNEL, softmax="online", block=16), "online softmax, 16-key blocks"),
    PanelMHA("PANEL_ONLINE64", replace(_KERNEL, softmax="online", block=64), "online softmax, 64-key blocks"),
    PanelMHA("PANEL_ONLINE128", replace(_KERNEL, softmax="online", block=128), "online softmax, 128-key blocks"),
    PanelMHA("PANEL_SPLIT_KV4", replace(_KERNEL, softmax="split", splits=4),
             "split-KV: 4 segments, fp32 partials (out, LSE) merged"),
    PanelMHA("PANEL_KEYS_REVERSED", replace(_BASE, key_order="reversed"), "fp32 sums over keys in reverse order"),
    PanelMHA("PANEL_KEYS_PERMUTED", replace(_BASE, key_order="permuted"),
             "fp32 sums over keys in a fixed permuted order"),
    PanelMHA("PANEL_FP8_NEW_FROM_INPUTS", replace(_BASE, fp8_new="inputs"),
             "new tokens attended from the unquantised K/V inputs, context from the cache"),
    PanelMHA("PANEL_FP8_NEW_FROM_CACHE", replace(_BASE, fp8_new="cache"),
             "new tokens read back from the (fp8) cache after the write"),
    PanelMHA("PANEL_EXP_20ULP", replace(_KERNEL, softmax="online", block=64, exp_ulps=20),
             "online softmax whose exp is off by up to 20 float32 ulps (PyTorch's CPU exp_u20)"),
    PanelMHA("PANEL_TANH_EXP_FORM", replace(_BASE, scores="exp2", tanh="exp_form", exp_ulps=20),
             "exp2, softcap's tanh from two 20-ulp exps, (e^x - e^-x) / (e^x + e^-x)"),
]

MLA_MEMBERS = [
    PanelMLA("PANEL_MLA_ABSORBED", "absorbed", "every row absorbed over the latent cache"),
    PanelMLA("PANEL_MLA_UPPROJECTED", "upprojected", "every row up-projected, one pass over the cache"),
    PanelMLA("PANEL_MLA_MIXED", "mixed",
             "decode rows absorbed; extend/prefill rows up-projected (new tokens unquantised, context chunked)"),
]

MEMBERS = {m.name: m for m in MHA_MEMBERS + MLA_MEMBERS}


def make_backends():
    """Plugin target: every panel member."""
    return list(MEMBERS.values())
