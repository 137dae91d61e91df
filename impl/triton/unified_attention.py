"""Unified paged attention: one launch over a mixed batch (prefill, extend, decode).

Every key (context and new) is read from the paged NHD cache ``[num_blocks, block_size, Hkv, D]``
after the new tokens were written. Key position ``p`` of sequence ``b`` lives at
``block_table[b, p // block_size]``, offset ``p % block_size``; keys are addressed per position,
so the KV tile (``BLOCK_N``) is independent of the block size (16, 544, ...).

Tiling (2-D kernel, grid = (query blocks, kv heads)): a program owns ``BLOCK_Q`` query tokens of
one sequence times the ``G = Hq // Hkv`` query heads that share one kv head, packed into
``BLOCK_M = BLOCK_Q * G`` rows (row r = token r // G, head r % G), so ``tl.dot`` tiles have >= 16
rows even for decode. Query blocks are enumerated without a host sync: sequence b owns program
ids ``qsl[b] // BLOCK_Q + b ...`` (a binary search finds b). The KV loop visits only tiles that
some row can see (causal / sliding window), split into masked edge tiles and unmasked interior
tiles. Online softmax in base 2 (log2(e) folded into the scale); softcap and ALiBi are applied in
natural units before masking; a sink seeds the running max and joins the denominator at the end
(the returned LSE is sink-free). fp8 K/V are converted exactly to the model dtype and the k/v
scales are folded into the score scale and the output. Loads past ``seq_len`` are masked and
masked V rows are zero, so NaN in unused cache slots cannot reach the output.

Split-KV ("3-D") variant for long decodes: grid = (query blocks, kv heads, segments); each program
attends one contiguous range of KV tiles and writes its unnormalised output, max and sum; a reduce
kernel combines the segments (a segment or a whole row with no keys gives no NaN).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from impl.triton import compat
from impl.triton.tiles import online_softmax_update, tanh

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


@triton.jit
def _find_seq(qsl_ptr, num_seqs, pid, BLOCK_Q: tl.constexpr):
    """Largest b with qsl[b] // BLOCK_Q + b <= pid (the sequence owning query block pid)."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        val = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
        if val <= pid:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend(acc, m_i, l_i, q, j_lo, j_hi,
            k_ptr, v_ptr, bt_row_ptr, seq_len, block_size, kv_head,
            stride_kb, stride_ks, stride_kh, stride_kd,
            stride_vb, stride_vs, stride_vh, stride_vd,
            qpos, slope, offs_n, offs_d, d_ok,
            qk_scale, softcap, window,
            MASKED: tl.constexpr, CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr,
            USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr, IS_FP8: tl.constexpr,
            BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, PAD_D: tl.constexpr):
    """Online softmax over KV tiles [j_lo, j_hi); scores in log2 units."""
    for j in range(j_lo, j_hi):
        kpos = j * BLOCK_N + offs_n
        k_ok = kpos < seq_len
        if MASKED:
            blk = tl.load(bt_row_ptr + kpos // block_size, mask=k_ok, other=0).to(tl.int64)
        else:  # interior tiles lie inside seq_len: no mask, so loads vectorise
            blk = tl.load(bt_row_ptr + kpos // block_size).to(tl.int64)
        slot = (kpos % block_size).to(tl.int64)
        k_off = blk * stride_kb + slot * stride_ks + kv_head * stride_kh
        v_off = blk * stride_vb + slot * stride_vs + kv_head * stride_vh
        k_ptrs = k_ptr + k_off[None, :] + offs_d[:, None] * stride_kd
        if MASKED:
            k = tl.load(k_ptrs, mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        elif PAD_D:
            k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        if IS_FP8:
            k = k.to(q.dtype)
        s = tl.dot(q, k, input_precision=DOT_PREC)
        if USE_SOFTCAP or USE_ALIBI:
            s = s * qk_scale  # natural units
            if USE_SOFTCAP:
                s = softcap * tanh(s / softcap)
            if USE_ALIBI:
                dist = tl.abs(qpos[:, None] - kpos[None, :]).to(tl.float32)
                s = s - slope[:, None] * dist
            s = s * 1.4426950408889634
        else:
            s = s * qk_scale  # qk_scale already holds log2(e)
        if MASKED:
            vis = k_ok[None, :] & (qpos[:, None] >= 0)
            if CAUSAL:
                vis = vis & (kpos[None, :] <= qpos[:, None])
            if USE_WINDOW:
                vis = vis & ((qpos[:, None] - kpos[None, :]) < window)
            s = tl.where(vis, s, float("-inf"))
        v_ptrs = v_ptr + v_off[:, None] + offs_d[None, :] * stride_vd
        if MASKED:  # masked V rows are 0, so 0 * NaN never happens
            v = tl.load(v_ptrs, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        elif PAD_D:
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        else:
            v = tl.load(v_ptrs)
        if IS_FP8:
            v = v.to(q.dtype)
        # interior tiles: every row already sees a key, so no -inf shift guard is needed
        acc, m_i, l_i = online_softmax_update(acc, m_i, l_i, s, v, MASKED, True, DOT_PREC)
    return acc, m_i, l_i


# Integer arguments that change with every batch (sequence count, token count, block-table
# width) are not specialised on (Triton would otherwise compile a variant per "== 1" and
# "multiple of 16" pattern of them); everything a kernel's code depends on is a constexpr.
@triton.jit(do_not_specialize=["num_seqs", "stride_lh", "stride_bt"])
def _unified_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, bt_ptr, qsl_ptr, seq_lens_ptr, alibi_ptr, sinks_ptr,
        seg_acc_ptr, seg_m_ptr, seg_l_ptr,
        num_seqs, num_q_heads, block_size,
        stride_qt, stride_qh, stride_qd,
        stride_kb, stride_ks, stride_kh, stride_kd,
        stride_vb, stride_vs, stride_vh, stride_vd,
        stride_ot, stride_oh, stride_od,
        stride_lh, stride_lt, stride_bt,
        qk_scale, softcap, window, v_scale,
        G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
        NUM_SEGMENTS: tl.constexpr, SPLIT: tl.constexpr,
        CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr,
        USE_SINKS: tl.constexpr, IS_FP8: tl.constexpr, WRITE_LSE: tl.constexpr, DOT_PREC: tl.constexpr):
    # Last query blocks first: under causal masking they are the longest, so the tail of the
    # launch is made of short programs (better load balance).
    pid_q = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    seg = tl.program_id(2)
    seq = _find_seq(qsl_ptr, num_seqs, pid_q, BLOCK_Q)
    q_first = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_first
    q_block = pid_q - (q_first // BLOCK_Q + seq)
    q_start = q_block * BLOCK_Q
    if q_start < q_len:
        seq_len = tl.load(seq_lens_ptr + seq)
        context = seq_len - q_len

        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        tok = q_start + offs_m // G  # token index inside the sequence
        head = kv_head * G + offs_m % G
        row_ok = (offs_m < BLOCK_Q * G) & (tok < q_len)
        qpos = tl.where(row_ok, context + tok, -1)  # -1: padding row (sees nothing)
        t_glob = (q_first + tok).to(tl.int64)

        q = tl.load(q_ptr + (t_glob * stride_qt + head * stride_qh)[:, None] + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if USE_ALIBI:
            slope = tl.load(alibi_ptr + head, mask=row_ok, other=0.0)
        else:
            slope = tl.zeros([BLOCK_M], dtype=tl.float32)

        # Key range any row of this block can see, in tiles.
        q_lo = context + q_start
        q_hi = context + tl.minimum(q_start + BLOCK_Q, q_len) - 1
        key_end = seq_len
        if CAUSAL:
            key_end = tl.minimum(seq_len, q_hi + 1)
        key_start = 0
        if USE_WINDOW:
            key_start = tl.maximum(0, q_lo - window + 1)
        tile_lo = key_start // BLOCK_N
        tile_hi = (key_end + BLOCK_N - 1) // BLOCK_N
        # Interior tiles: every row sees every key (no mask needed).
        full_lo = tile_lo
        if USE_WINDOW:
            full_lo = (tl.maximum(0, q_hi - window + 1) + BLOCK_N - 1) // BLOCK_N
        full_hi = seq_len // BLOCK_N
        if CAUSAL:
            full_hi = tl.minimum(full_hi, (q_lo + 1) // BLOCK_N)
        full_lo = tl.minimum(tl.maximum(full_lo, tile_lo), tile_hi)
        full_hi = tl.maximum(tl.minimum(full_hi, tile_hi), full_lo)
        if SPLIT:
            per_seg = (tile_hi - tile_lo + NUM_SEGMENTS - 1) // NUM_SEGMENTS
            seg_lo = tl.minimum(tile_lo + seg * per_seg, tile_hi)
            seg_hi = tl.minimum(seg_lo + per_seg, tile_hi)
        else:
            seg_lo = tile_lo
            seg_hi = tile_hi

        if USE_SINKS and not SPLIT:
            sink = tl.load(sinks_ptr + head, mask=row_ok, other=float("-inf")) * 1.4426950408889634
            m_i = sink
        else:
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        bt_row = bt_ptr + seq.to(tl.int64) * stride_bt

        acc, m_i, l_i = _attend(acc, m_i, l_i, q, seg_lo, tl.minimum(full_lo, seg_hi),
                                k_ptr, v_ptr, bt_row, seq_len, block_size, kv_head,
                                stride_kb, stride_ks, stride_kh, stride_kd,
                                stride_vb, stride_vs, stride_vh, stride_vd,
                                qpos, slope, offs_n, offs_d, d_ok, qk_scale, softcap, window,
                                True, CAUSAL, USE_WINDOW, USE_SOFTCAP, USE_ALIBI, IS_FP8, BLOCK_N, DOT_PREC, BLOCK_D != D)
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, tl.maximum(full_lo, seg_lo), tl.minimum(full_hi, seg_hi),
                                k_ptr, v_ptr, bt_row, seq_len, block_size, kv_head,
                                stride_kb, stride_ks, stride_kh, stride_kd,
                                stride_vb, stride_vs, stride_vh, stride_vd,
                                qpos, slope, offs_n, offs_d, d_ok, qk_scale, softcap, window,
                                False, CAUSAL, USE_WINDOW, USE_SOFTCAP, USE_ALIBI, IS_FP8, BLOCK_N, DOT_PREC, BLOCK_D != D)
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, tl.maximum(full_hi, seg_lo), seg_hi,
                                k_ptr, v_ptr, bt_row, seq_len, block_size, kv_head,
                                stride_kb, stride_ks, stride_kh, stride_kd,
                                stride_vb, stride_vs, stride_vh, stride_vd,
                                qpos, slope, offs_n, offs_d, d_ok, qk_scale, softcap, window,
                                True, CAUSAL, USE_WINDOW, USE_SOFTCAP, USE_ALIBI, IS_FP8, BLOCK_N, DOT_PREC, BLOCK_D != D)

        if SPLIT:
            # Partial result of this segment: unnormalised acc, running max (log2) and sum.
            row = t_glob * num_q_heads + head
            # An empty segment (no tiles) writes only m = -inf, l = 0; its acc slot stays
            # unwritten workspace, which the reduce must never read (it may hold NaN).
            tl.store(seg_acc_ptr + (row * NUM_SEGMENTS + seg)[:, None] * BLOCK_D + offs_d[None, :], acc,
                     mask=(row_ok & (tl.zeros([BLOCK_M], dtype=tl.int32) + seg_hi > seg_lo))[:, None])
            tl.store(seg_m_ptr + row * NUM_SEGMENTS + seg, m_i, mask=row_ok)
            tl.store(seg_l_ptr + row * NUM_SEGMENTS + seg, l_i, mask=row_ok)
        else:
            denom = l_i
            if USE_SINKS:
                denom = denom + tl.exp2(sink - tl.where(m_i == float("-inf"), 0.0, m_i))
            safe = tl.where(denom > 0.0, denom, 1.0)
            out = tl.math.div_rn(acc, safe[:, None])
            if IS_FP8:
                out = out * v_scale
            tl.store(out_ptr + (t_glob * stride_ot + head * stride_oh)[:, None] + offs_d[None, :] * stride_od,
                     out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
            if WRITE_LSE:
                lse = tl.where(l_i > 0.0, (m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0))) * 0.6931471805599453,
                               float("-inf"))
                tl.store(lse_ptr + head * stride_lh + t_glob * stride_lt, lse, mask=row_ok)


@triton.jit(do_not_specialize=["num_rows", "stride_lh"])
def _reduce_segments_kernel(out_ptr, lse_ptr, sinks_ptr, seg_acc_ptr, seg_m_ptr, seg_l_ptr,
                            num_rows, num_q_heads, stride_ot, stride_oh, stride_od, stride_lh, stride_lt,
                            v_scale,
                            D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                            NUM_SEGMENTS: tl.constexpr, USE_SINKS: tl.constexpr, WRITE_LSE: tl.constexpr):
    """Combine the segments of BLOCK_R (token, head) rows; a row with no keys gives 0 / -inf."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < num_rows
    offs_s = tl.arange(0, NUM_SEGMENTS)
    offs_d = tl.arange(0, BLOCK_D)
    r64 = r.to(tl.int64)
    m = tl.load(seg_m_ptr + r64[:, None] * NUM_SEGMENTS + offs_s[None, :], mask=r_ok[:, None], other=float("-inf"))
    l = tl.load(seg_l_ptr + r64[:, None] * NUM_SEGMENTS + offs_s[None, :], mask=r_ok[:, None], other=0.0)
    m_max = tl.max(m, 1)
    head = r % num_q_heads
    if USE_SINKS:
        sink = tl.load(sinks_ptr + head, mask=r_ok, other=float("-inf")) * 1.4426950408889634
        m_max = tl.maximum(m_max, sink)
    shift = tl.where(m_max == float("-inf"), 0.0, m_max)  # the -inf guard: no -inf - -inf
    w = tl.exp2(m - shift[:, None])  # 0 for an empty segment
    key_sum = tl.sum(l * w, 1)
    denom = key_sum
    if USE_SINKS:
        denom = denom + tl.exp2(sink - shift)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for s in range(NUM_SEGMENTS):
        ws = tl.sum(tl.where(offs_s[None, :] == s, w, 0.0), 1)
        part = tl.load(seg_acc_ptr + (r64 * NUM_SEGMENTS + s)[:, None] * BLOCK_D + offs_d[None, :],
                       mask=(r_ok & (ws > 0.0))[:, None], other=0.0)
        acc += part * ws[:, None]
    safe = tl.where(denom > 0.0, denom, 1.0)
    out = tl.math.div_rn(acc, safe[:, None]) * v_scale  # correctly rounded: fp32 cases are tight
    t = r64 // num_q_heads
    tl.store(out_ptr + (t * stride_ot + head * stride_oh)[:, None] + offs_d[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & (offs_d < D)[None, :])
    if WRITE_LSE:
        lse = tl.where(key_sum > 0.0, (shift + tl.log2(tl.where(key_sum > 0.0, key_sum, 1.0))) * 0.6931471805599453,
                       float("-inf"))
        tl.store(lse_ptr + head * stride_lh + t * stride_lt, lse, mask=r_ok)


# ---- host side -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TileConfig:
    """Launch-time tile choices (small under the interpreter, large on a GPU)."""

    block_m: int = 64  # query rows per program (BLOCK_Q tokens x G heads)
    block_n: int = 64  # keys per tile
    num_warps: int = 4
    num_stages: int = 2
    num_segments: int = 16  # split-KV segments (3-D variant)


def default_config(device: torch.device, head_size: int, group: int, max_query_len: int, split: bool,
                   dtype: torch.dtype = torch.bfloat16) -> TileConfig:
    min_m = max(16, triton.next_power_of_2(group))
    if device.type != "cuda":  # interpreter: few, biggish programs
        bm = max(min_m, min(64, triton.next_power_of_2(max(1, max_query_len) * group)))
        return TileConfig(block_m=bm, block_n=32, num_warps=1, num_stages=1, num_segments=4)
    bd = triton.next_power_of_2(head_size)
    big = dtype == torch.float32 or bd > 128
    if max_query_len <= 1 or split:  # decode: rows are the G heads of one token; memory bound
        return TileConfig(block_m=min_m, block_n=128 if bd <= 128 else 64, num_warps=4, num_stages=4 if bd <= 128 else 2,
                          num_segments=16)
    # prefill / extend (H200 sweep, bf16 hd128: 128 x 64 tiles, 4 warps, 3 stages was best)
    bm = max(min_m, 64 if big else 128)
    if max_query_len * group < bm:
        bm = max(min_m, triton.next_power_of_2(max_query_len * group))
    return TileConfig(block_m=bm, block_n=32 if big else 64, num_warps=4, num_stages=2 if big else 3,
                      num_segments=16)


def workspace(numel: int, device: torch.device) -> torch.Tensor:
    """Uninitialised float32 scratch for the split-KV partial results (tests poison it)."""
    return torch.empty(numel, dtype=torch.float32, device=device)


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _need(cond, msg):
    if not cond:
        raise ValueError(msg)


def _check(q, key_cache, value_cache, out, query_start_loc, seq_lens, block_table, alibi_slopes, sinks, lse):
    _need(isinstance(q, torch.Tensor) and q.dim() == 3, f"q: expected [tokens, Hq, D], got {getattr(q, 'shape', q)}")
    _need(q.dtype in (torch.float16, torch.bfloat16, torch.float32),
          f"q: dtype must be float16/bfloat16/float32, got {q.dtype}")
    T, Hq, D = q.shape
    for name, c in (("key_cache", key_cache), ("value_cache", value_cache)):
        _need(isinstance(c, torch.Tensor) and c.dim() == 4 and c.shape[3] == D,
              f"{name}: expected NHD [num_blocks, block_size, Hkv, {D}], got {tuple(getattr(c, 'shape', ()))}")
        _need(c.dtype == q.dtype or c.dtype in FP8_DTYPES,
              f"{name}: dtype must be q's {q.dtype} or fp8 e4m3fn/e4m3fnuz, got {c.dtype}")
        _need(c.device == q.device, f"{name}: on {c.device}, expected q's device {q.device}")
    _need(key_cache.shape == value_cache.shape and key_cache.dtype == value_cache.dtype,
          f"value_cache: {value_cache.dtype} {tuple(value_cache.shape)} differs from key_cache "
          f"{key_cache.dtype} {tuple(key_cache.shape)}")
    Hkv = key_cache.shape[2]
    _need(Hq % Hkv == 0, f"key_cache: {Hkv} kv heads must divide the {Hq} query heads")
    _need(out.shape == q.shape and out.dtype == q.dtype, f"out: expected {q.dtype} {tuple(q.shape)}, got "
          f"{out.dtype} {tuple(out.shape)}")
    B = seq_lens.shape[0]
    for name, t, n in (("query_start_loc", query_start_loc, B + 1), ("seq_lens", seq_lens, B)):
        _need(t.dim() == 1 and t.shape[0] == n and t.dtype in (torch.int32, torch.int64),
              f"{name}: expected int32/int64 [{n}], got {t.dtype} {tuple(t.shape)}")
    _need(block_table.dim() == 2 and block_table.shape[0] == B and block_table.dtype in (torch.int32, torch.int64),
          f"block_table: expected int32 [{B}, max_blocks], got {block_table.dtype} {tuple(block_table.shape)}")
    for name, t in (("alibi_slopes", alibi_slopes), ("sinks", sinks)):
        if t is not None:
            _need(t.shape == (Hq,), f"{name}: expected [{Hq}], got {tuple(t.shape)}")
    if lse is not None:
        _need(lse.shape == (Hq, T) and lse.dtype == torch.float32,
              f"lse: expected float32 [{Hq}, {T}], got {lse.dtype} {tuple(lse.shape)}")
    if q.device.type == "cuda":
        _need(key_cache.dtype != torch.float8_e4m3fnuz,
              "key_cache: float8_e4m3fnuz needs the Triton interpreter (CUDA Triton has no e4m3fnuz)")


def _scalar(name, x) -> float:
    if isinstance(x, torch.Tensor):
        _need(x.numel() == 1, f"{name}: expected a per-tensor scale, got shape {tuple(x.shape)}")
        x = float(x.reshape(()).item())
    x = float(x)
    _need(x > 0, f"{name}: must be positive, got {x}")
    return x


def choose_num_segments(device, num_q_blocks: int, num_kv_heads: int, max_seq_len: int, block_n: int,
                        cap: int = 16) -> int:
    """Segments so that the split grid fills the GPU (about 16 programs per SM), at least 1 tile each."""
    programs = max(1, num_q_blocks * num_kv_heads)
    want = max(1, (16 * num_sms(device) + programs - 1) // programs)
    tiles = max(1, triton.cdiv(max_seq_len, block_n))
    n = max(1, min(cap, want, tiles))
    return 1 << (n.bit_length() - 1)  # a power of two (the reduce kernel's arange)


def unified_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, out: torch.Tensor, *,
                      query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
                      scale: float, causal: bool = True, sliding_window: Optional[int] = None,
                      softcap: Optional[float] = None, alibi_slopes: Optional[torch.Tensor] = None,
                      sinks: Optional[torch.Tensor] = None, k_scale=1.0, v_scale=1.0,
                      lse: Optional[torch.Tensor] = None, max_query_len: Optional[int] = None,
                      max_seq_len: Optional[int] = None, split_kv: Optional[bool] = False,
                      config: Optional[TileConfig] = None) -> torch.Tensor:
    """Attention of the whole batch in one launch (plus a segment reduce when ``split_kv``).

    ``out`` [T, Hq, D] is written in place (and ``lse`` [Hq, T] float32 natural log when given)
    and returned. ``split_kv=True`` selects the split-KV (3-D) variant; ``None`` lets
    ``use_split_kv`` decide. ``max_query_len``/``max_seq_len`` avoid a host sync when given.
    """
    _check(q, key_cache, value_cache, out, query_start_loc, seq_lens, block_table, alibi_slopes, sinks, lse)
    dev = q.device
    if dev.type != "cuda":
        compat.install()
    T, Hq, D = q.shape
    Hkv = key_cache.shape[2]
    G = Hq // Hkv
    B = seq_lens.shape[0]
    if T == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max().item())
    if split_kv is None:
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max().item())
        split_kv = use_split_kv(max_query_len, max_seq_len, B, Hkv, dev)
    if sliding_window is not None:
        _need(int(sliding_window) >= 1, f"sliding_window: must be >= 1 keys, got {sliding_window}")
    if softcap is not None:
        _need(softcap > 0, f"softcap: must be > 0 or None, got {softcap}")
    is_fp8 = key_cache.dtype in FP8_DTYPES
    ks, vs = (_scalar("k_scale", k_scale), _scalar("v_scale", v_scale)) if is_fp8 else (1.0, 1.0)
    cfg = config or default_config(dev, D, G, max_query_len, bool(split_kv), q.dtype)
    block_m = max(cfg.block_m, triton.next_power_of_2(G), 16)
    block_q = block_m // G
    block_d = max(16, triton.next_power_of_2(D))
    num_q_blocks = T // block_q + B
    natural = softcap is not None or alibi_slopes is not None
    qk_scale = float(scale) * ks * (1.0 if natural else LOG2E)
    qsl = query_start_loc.to(torch.int32).contiguous()
    sl = seq_lens.to(torch.int32).contiguous()
    bt = block_table.to(torch.int32).contiguous()
    dummy = torch.empty(1, dtype=torch.float32, device=dev)
    alibi = alibi_slopes.to(torch.float32).contiguous() if alibi_slopes is not None else dummy
    snk = sinks.to(torch.float32).contiguous() if sinks is not None else dummy
    lse_t = lse if lse is not None else dummy.view(1, 1)
    num_seg = 1
    seg_acc = seg_m = seg_l = dummy
    if split_kv:
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max().item())
        num_seg = cfg.num_segments if config is not None else \
            choose_num_segments(dev, num_q_blocks, Hkv, max_seq_len, cfg.block_n, cfg.num_segments)
        _need(num_seg >= 1 and (num_seg & (num_seg - 1)) == 0,
              f"config.num_segments: must be a power of two, got {num_seg}")
        seg_acc = workspace(T * Hq * num_seg * block_d, dev)
        seg_m = workspace(T * Hq * num_seg, dev)
        seg_l = workspace(T * Hq * num_seg, dev)
    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (num_q_blocks, Hkv, num_seg)
    _unified_kernel[grid](
        q, key_cache, value_cache, out, lse_t, bt, qsl, sl, alibi, snk, seg_acc, seg_m, seg_l,
        B, Hq, key_cache.shape[1],
        *q.stride(), *key_cache.stride(), *value_cache.stride(), *out.stride(),
        lse_t.stride(0), lse_t.stride(1), bt.stride(0),
        qk_scale, float(softcap or 1.0), int(sliding_window or 0), vs,
        G=G, D=D, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=cfg.block_n,
        NUM_SEGMENTS=num_seg, SPLIT=bool(split_kv),
        CAUSAL=bool(causal), USE_WINDOW=sliding_window is not None, USE_SOFTCAP=softcap is not None,
        USE_ALIBI=alibi_slopes is not None, USE_SINKS=sinks is not None, IS_FP8=is_fp8,
        WRITE_LSE=lse is not None, DOT_PREC=dot_prec,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split_kv:
        rows = T * Hq
        block_r = 16 if dev.type == "cuda" else max(1, min(64, triton.next_power_of_2(rows)))
        _reduce_segments_kernel[(triton.cdiv(rows, block_r),)](
            out, lse_t, snk, seg_acc, seg_m, seg_l, rows, Hq, *out.stride(), lse_t.stride(0), lse_t.stride(1), vs,
            D=D, BLOCK_D=block_d, BLOCK_R=block_r, NUM_SEGMENTS=num_seg, USE_SINKS=sinks is not None,
            WRITE_LSE=lse is not None, num_warps=4)
    return out


def use_split_kv(max_query_len: int, max_seq_len: int, num_seqs: int, num_kv_heads: int,
                 device: torch.device) -> bool:
    """The split-KV (3-D) variant pays off for all-decode batches whose 2-D grid would leave the
    GPU underused and whose contexts are long (several KV tiles per segment).

    Measured on an H200 (132 SMs, bf16, 8 KV heads, hd 128): 64 x 4096 (512 programs) ran the
    2-D kernel at 3.6 TB/s and the split one at 3.2 TB/s, so the split only serves grids of
    fewer than about 2 programs per SM."""
    if max_query_len > 1 or max_seq_len < 512:
        return False
    return num_seqs * num_kv_heads < 2 * num_sms(device)
