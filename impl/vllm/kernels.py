"""Adapters: vLLM's Triton attention kernels called in this project's terms.

Each function validates its inputs (ValueError naming the argument) and calls vLLM's kernel
through ``loader.kernel_module`` at call time (so tests can plant bugs by replacing a module
attribute). vLLM's launch decisions that live in its backends rather than in the kernels are
reproduced here, each citing where vLLM makes it:

* ``unified_attention``: TRITON_ATTN's metadata builder sizes the split-KV scratch
  (``seq_threshold_3D = 128 // num_kv_heads`` rows, 16 softmax segments) and the kernel wrapper
  then picks the 2-D or the 3-D (split-KV) launch itself;
* ``rocm_attn_layout`` / ``nhd_from_rocm_attn_layout``: ROCM_ATTN's cache layout (K
  ``[nb, Hkv, D/x, block, x]`` with x = 16 bytes / element, V ``[nb, Hkv, D, block]``);
* ``mla_num_kv_splits``: TRITON_MLA's ``_compute_num_kv_splits``.

Shapes follow impl/batch.py: query ``[T, Hq, D]``, NHD caches ``[nb, block, Hkv, D]``, LSE
``[H, T]``. fp8 KV caches must be the platform's fp8 dtype (vLLM views every fp8 cache as
``current_platform.fp8_dtype()``: e4m3fnuz on gfx94x, e4m3fn elsewhere).
"""

from __future__ import annotations

from typing import Optional

import torch

from impl.vllm import loader

# TRITON_ATTN (vllm/v1/attention/backends/triton_attn.py)
MIN_LAUNCH_GRID_SIZE_2D = 128
NUM_PAR_SOFTMAX_SEGMENTS = 16
MAX_NUM_SEQS = 256  # vLLM's scheduler default; caps the split-KV scratch rows
# TRITON_MLA (vllm/v1/attention/backends/mla/triton_mla.py)
MLA_MIN_WORK_PER_SPLIT = 512
MLA_SPLIT_OCCUPANCY_MULTIPLIER = 2

MODEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _next_pow2(n: int) -> int:
    return 1 << (max(1, int(n)) - 1).bit_length()


def _scale_tensor(value, device) -> torch.Tensor:
    """vLLM's kernels load k/v scales through a pointer: a float32 tensor of one element."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=torch.float32).reshape(1)
    return torch.tensor([float(value)], dtype=torch.float32, device=device)


def fp8_kv_flavours() -> frozenset:
    """The fp8 KV flavour vLLM's kernels read here: its platform's fp8 dtype only (vLLM views
    every fp8 cache as it: e4m3fnuz on gfx94x, e4m3fn elsewhere)."""
    fnuz = loader.load().fp8_dtype is torch.float8_e4m3fnuz
    return frozenset({"fp8_e4m3fnuz" if fnuz else "fp8_e4m3fn"})


def runs_on_nvidia() -> bool:
    """Whether vLLM's kernels are compiled for an NVIDIA GPU here (not the interpreter, whose
    arch answer is sm_90 too but which has no shared-memory limit)."""
    return loader.load().mode == "cuda"


def vllm_kv_cache_dtype(cache: torch.Tensor, name: str = "key_cache") -> str:
    """vLLM's kv_cache_dtype string for a cache tensor: 'auto', or 'fp8' when the cache is the
    platform's fp8 dtype (any other fp8 flavour is refused: vLLM would reinterpret its bits)."""
    if cache.dtype in MODEL_DTYPES:
        return "auto"
    want = loader.load().fp8_dtype
    _need(cache.dtype == want,
          f"{name}: vLLM on {loader.load().arch} reads fp8 caches as {want}, got {cache.dtype}")
    return "fp8"


def _check_qkv(query, key, value, *, key_may_differ=False):
    _need(isinstance(query, torch.Tensor) and query.dim() == 3 and query.dtype in MODEL_DTYPES,
          f"query: expected float16/bfloat16/float32 [T, Hq, D], got {getattr(query, 'dtype', None)} "
          f"{tuple(getattr(query, 'shape', ()))}")
    for name, t in (("key", key), ("value", value)):
        _need(isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[0] == query.shape[0]
              and t.shape[2] == query.shape[2] and t.dtype == query.dtype,
              f"{name}: expected {query.dtype} [{query.shape[0]}, Hkv, {query.shape[2]}], got "
              f"{getattr(t, 'dtype', None)} {tuple(getattr(t, 'shape', ()))}")
    _need(query.shape[1] % key.shape[1] == 0, f"key: {key.shape[1]} kv heads must divide {query.shape[1]} query heads")


def _check_index(name: str, t, ndim: int, length: Optional[int] = None) -> None:
    _need(isinstance(t, torch.Tensor) and t.dtype in (torch.int32, torch.int64) and t.dim() == ndim,
          f"{name}: expected an int32/int64 tensor with {ndim} dimension(s), got "
          f"{getattr(t, 'dtype', None)} {tuple(getattr(t, 'shape', ()))}")
    if length is not None:
        _need(t.shape[0] == length, f"{name}: expected {length} rows, got {t.shape[0]}")


# ---- cache write -------------------------------------------------------------------------------

def reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, *, k_scale=1.0, v_scale=1.0) -> None:
    """vLLM's ``triton_reshape_and_cache_flash``: write new K/V ``[T, Hkv, D]`` at
    ``slot_mapping`` into NHD caches ``[nb, block, Hkv, D]`` or ROCM_ATTN's head-major caches
    (K 5-D, V 4-D); fp8 caches get ``x / scale`` cast by the store (saturating, RNE)."""
    _need(isinstance(key, torch.Tensor) and key.dim() == 3, f"key: expected [T, Hkv, D], got {tuple(getattr(key, 'shape', ()))}")
    _need(isinstance(value, torch.Tensor) and value.shape == key.shape and value.dtype == key.dtype,
          f"value: expected {key.dtype} {tuple(key.shape)}, got {getattr(value, 'dtype', None)} "
          f"{tuple(getattr(value, 'shape', ()))}")
    _need(isinstance(key_cache, torch.Tensor) and key_cache.dim() in (4, 5),
          "key_cache: expected NHD [nb, block, Hkv, D] or head-major [nb, Hkv, D/x, block, x]")
    _need(isinstance(value_cache, torch.Tensor) and value_cache.dim() == 4 and value_cache.dtype == key_cache.dtype,
          f"value_cache: expected a 4-D cache of {key_cache.dtype}")
    _check_index("slot_mapping", slot_mapping, 1, key.shape[0])
    kv_dtype = vllm_kv_cache_dtype(key_cache)
    mod = loader.kernel_module("triton_reshape_and_cache_flash")
    mod.triton_reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, kv_dtype,
                                       _scale_tensor(k_scale, key.device), _scale_tensor(v_scale, key.device))


# ---- TRITON_ATTN: unified attention --------------------------------------------------------------

_SCRATCH: dict = {}


def split_kv_scratch(num_kv_heads: int, num_heads: int, head_size: int, device, max_num_seqs: int = MAX_NUM_SEQS):
    """TRITON_ATTN's builder: ``seq_threshold_3D`` and the 3-D kernel's scratch (output, max,
    expsum) for ``min(seq_threshold_3D, max_num_seqs)`` query tokens, 16 segments."""
    threshold = MIN_LAUNCH_GRID_SIZE_2D // num_kv_heads
    rows = min(threshold, max_num_seqs)
    key = (str(device), rows, num_heads, _next_pow2(head_size))
    if key not in _SCRATCH:
        _SCRATCH.clear()  # one shape at a time: tests and benches reuse it
        _SCRATCH[key] = (
            torch.empty(rows, num_heads, NUM_PAR_SOFTMAX_SEGMENTS, _next_pow2(head_size), dtype=torch.float32, device=device),
            torch.empty(rows, num_heads, NUM_PAR_SOFTMAX_SEGMENTS, dtype=torch.float32, device=device),
            torch.empty(rows, num_heads, NUM_PAR_SOFTMAX_SEGMENTS, dtype=torch.float32, device=device))
    return threshold, _SCRATCH[key]


def unified_attention_launch(num_tokens: int, num_seqs: int, max_query_len: int, num_heads: int,
                             num_kv_heads: int, causal: bool, scratch_rows: int, threshold: int) -> str:
    """'3-D' or '2-D': the decision vLLM's ``unified_attention`` makes for these arguments
    (triton_unified_attention.py: split-KV needs causal rows of at most MAX_3D_QUERY_LEN, at most
    ``seq_threshold_3D`` query blocks and scratch rows for every token)."""
    mod = loader.kernel_module("triton_unified_attention")
    per_kv = num_heads // num_kv_heads
    block_m = 16 if per_kv <= 16 else _next_pow2(per_kv)
    block_q = block_m // per_kv
    if max_query_len > 1 and (max_query_len > mod.MAX_3D_QUERY_LEN or not causal):
        return "2-D"
    if num_seqs * -(-max_query_len // block_q) > threshold or mod.is_batch_invariant:
        return "2-D"
    return "3-D" if scratch_rows >= num_tokens else "2-D"


def unified_attention(query, key_cache, value_cache, out, *, query_start_loc, seq_lens, block_table,
                      max_query_len: int, max_seq_len: int, scale: float, causal: bool = True,
                      sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                      alibi_slopes=None, sinks=None, k_scale=1.0, v_scale=1.0) -> str:
    """vLLM's TRITON_ATTN forward over NHD caches (new K/V already written); returns the launch
    it took ('2-D' or '3-D'). ``sliding_window`` W keys = vLLM's window_size (W - 1, 0)."""
    _need(isinstance(query, torch.Tensor) and query.dim() == 3 and query.dtype in MODEL_DTYPES,
          f"query: expected float16/bfloat16/float32 [T, Hq, D], got {tuple(getattr(query, 'shape', ()))}")
    T, Hq, D = query.shape
    for name, c in (("key_cache", key_cache), ("value_cache", value_cache)):
        _need(isinstance(c, torch.Tensor) and c.dim() == 4 and c.shape[3] == D,
              f"{name}: expected NHD [nb, block, Hkv, {D}], got {tuple(getattr(c, 'shape', ()))}")
    Hkv = key_cache.shape[2]
    _need(Hq % Hkv == 0, f"key_cache: {Hkv} kv heads must divide {Hq} query heads")
    _need(isinstance(out, torch.Tensor) and out.shape == query.shape and out.dtype == query.dtype,
          f"out: expected {query.dtype} {tuple(query.shape)}")
    B = seq_lens.shape[0] if isinstance(seq_lens, torch.Tensor) else -1
    _check_index("seq_lens", seq_lens, 1)
    _check_index("query_start_loc", query_start_loc, 1, B + 1)
    _check_index("block_table", block_table, 2, B)
    kv_dtype = vllm_kv_cache_dtype(key_cache)
    threshold, (segm_out, segm_max, segm_expsum) = split_kv_scratch(Hkv, Hq, D, query.device)
    launch = unified_attention_launch(T, B, max_query_len, Hq, Hkv, causal, segm_max.shape[0], threshold)
    mod = loader.kernel_module("triton_unified_attention")
    kv_quant_mode = _kv_quant_mode(kv_dtype)
    descale_shape = (B, Hkv)
    mod.unified_attention(
        q=query, k=key_cache, v=value_cache, out=out, cu_seqlens_q=query_start_loc,
        max_seqlen_q=int(max_query_len), seqused_k=seq_lens, max_seqlen_k=int(max_seq_len),
        softmax_scale=float(scale), causal=bool(causal),
        window_size=(int(sliding_window) - 1, 0) if sliding_window else (-1, -1),
        block_table=block_table, softcap=float(softcap or 0.0), q_descale=None,
        k_descale=_scale_tensor(k_scale, query.device).expand(descale_shape),
        v_descale=_scale_tensor(v_scale, query.device).expand(descale_shape),
        seq_threshold_3D=threshold, num_par_softmax_segments=NUM_PAR_SOFTMAX_SEGMENTS,
        softmax_segm_output=segm_out, softmax_segm_max=segm_max, softmax_segm_expsum=segm_expsum,
        alibi_slopes=alibi_slopes, sinks=sinks, kv_quant_mode=kv_quant_mode)
    return launch


def _kv_quant_mode(kv_cache_dtype: str):
    """vLLM's KVQuantMode for a kv_cache_dtype string (vllm.v1.kv_cache_interface)."""
    loader.load()
    import importlib

    return importlib.import_module("vllm.v1.kv_cache_interface").get_kv_quant_mode(kv_cache_dtype)


# ---- ROCM_ATTN: chunked prefill + paged decode ---------------------------------------------------

def rocm_attn_x(cache: torch.Tensor) -> int:
    """Elements per 16 bytes: the innermost K split of ROCM_ATTN's layout (8 for fp16/bf16)."""
    return 16 // cache.element_size()


def rocm_attn_layout(key_cache: torch.Tensor, value_cache: torch.Tensor):
    """NHD ``[nb, block, Hkv, D]`` -> ROCM_ATTN's K ``[nb, Hkv, D/x, block, x]`` and V
    ``[nb, Hkv, D, block]`` (contiguous copies; vLLM's PagedAttention.split_kv_cache views)."""
    _need(isinstance(key_cache, torch.Tensor) and key_cache.dim() == 4,
          f"key_cache: expected NHD [nb, block, Hkv, D], got {tuple(getattr(key_cache, 'shape', ()))}")
    _need(isinstance(value_cache, torch.Tensor) and value_cache.shape == key_cache.shape
          and value_cache.dtype == key_cache.dtype, f"value_cache: expected {key_cache.dtype} {tuple(key_cache.shape)}")
    nb, bs, H, D = key_cache.shape
    x = rocm_attn_x(key_cache)
    _need(D % x == 0, f"key_cache: head size {D} must be a multiple of {x} (16 bytes) for ROCM_ATTN's layout")
    k = key_cache.view(nb, bs, H, D // x, x).permute(0, 2, 3, 1, 4).contiguous()
    v = value_cache.permute(0, 2, 3, 1).contiguous()
    return k, v


def nhd_from_rocm_attn_layout(k5: torch.Tensor, v4: torch.Tensor, key_cache: torch.Tensor,
                              value_cache: torch.Tensor) -> None:
    """Copy ROCM_ATTN-layout caches back into the NHD caches (in place, bit-exact)."""
    nb, bs, H, D = key_cache.shape
    key_cache.copy_(k5.permute(0, 3, 1, 2, 4).reshape(nb, bs, H, D))
    value_cache.copy_(v4.permute(0, 3, 1, 2))


def chunked_prefill_paged_decode(query, key, value, out, key_cache5, value_cache4, *, block_table,
                                 query_start_loc, seq_lens, max_query_len: int, max_seq_len: int,
                                 scale: float, causal: bool = True, sliding_window: Optional[int] = None,
                                 alibi_slopes=None, sinks=None, k_scale=1.0, v_scale=1.0) -> None:
    """vLLM's ROCM_ATTN forward: prefix prefill (Triton) for rows with q_len > 1, which reads the
    context from the cache and the new tokens from ``key``/``value``, and the Triton paged decode
    for q_len == 1 (vLLM's compiled HIP kernel is switched off by the loader), over ROCM_ATTN's
    layout (``rocm_attn_layout``). ``sliding_window`` W keys, as vLLM passes it (1 + (W - 1))."""
    _check_qkv(query, key, value)
    _need(isinstance(out, torch.Tensor) and out.shape == query.shape and out.dtype == query.dtype,
          f"out: expected {query.dtype} {tuple(query.shape)}")
    _need(isinstance(key_cache5, torch.Tensor) and key_cache5.dim() == 5,
          "key_cache5: expected ROCM_ATTN's K layout [nb, Hkv, D/x, block, x] (see rocm_attn_layout)")
    _need(isinstance(value_cache4, torch.Tensor) and value_cache4.dim() == 4,
          "value_cache4: expected ROCM_ATTN's V layout [nb, Hkv, D, block] (see rocm_attn_layout)")
    B = seq_lens.shape[0] if isinstance(seq_lens, torch.Tensor) else -1
    _check_index("seq_lens", seq_lens, 1)
    _check_index("query_start_loc", query_start_loc, 1, B + 1)
    _check_index("block_table", block_table, 2, B)
    kv_dtype = vllm_kv_cache_dtype(key_cache5, "key_cache5")
    mod = loader.kernel_module("chunked_prefill_paged_decode")
    mod.chunked_prefill_paged_decode(
        query=query, key=key, value=value, output=out, kv_cache_dtype=kv_dtype, key_cache=key_cache5,
        value_cache=value_cache4, block_table=block_table, query_start_loc=query_start_loc,
        seq_lens=seq_lens, max_seq_len=int(max_seq_len), max_query_len=int(max_query_len),
        k_scale=_scale_tensor(k_scale, query.device), v_scale=_scale_tensor(v_scale, query.device),
        alibi_slopes=alibi_slopes, sliding_window=int(sliding_window or 0), sm_scale=float(scale),
        sinks=sinks, causal=bool(causal))


# ---- TRITON_MLA: absorbed decode and the merge ---------------------------------------------------

def mla_num_kv_splits(max_seq_len: int, num_sms: Optional[int] = None) -> int:
    """TRITON_MLA's ``_compute_num_kv_splits``: next power of two of max_seq_len / 512, at most
    twice the compute units."""
    sms = loader.load().num_sms if num_sms is None else num_sms
    ideal = _next_pow2(max(1, int(max_seq_len) // MLA_MIN_WORK_PER_SPLIT))
    return min(ideal, sms * MLA_SPLIT_OCCUPANCY_MULTIPLIER)


def mla_decode(q, kv_cache, entry_tables, kv_lens, *, scale: float, kv_lora_rank: int, kv_scale=1.0,
               max_kv_len: Optional[int] = None, num_kv_splits: Optional[int] = None):
    """vLLM's TRITON_MLA ``forward_mqa``: ``decode_attention_fwd(is_mla=True)`` of ``q [E, N,
    L + R]`` over the latent cache ``[nb, block, L + R]`` (V = its first L channels), one entry
    per row of ``entry_tables``/``kv_lens``. Returns ``(o [E, N, L], lse [E, N])`` (lse in q's
    dtype, as vLLM allocates it)."""
    _need(isinstance(q, torch.Tensor) and q.dim() == 3 and q.dtype in (torch.float16, torch.bfloat16),
          f"q: expected float16/bfloat16 [E, N, L + R], got {getattr(q, 'dtype', None)} {tuple(getattr(q, 'shape', ()))}")
    E, N, Dq = q.shape
    _need(isinstance(kv_cache, torch.Tensor) and kv_cache.dim() == 3 and kv_cache.shape[2] == Dq,
          f"kv_cache: expected [nb, block, {Dq}], got {tuple(getattr(kv_cache, 'shape', ()))}")
    _need(0 < kv_lora_rank < Dq, f"kv_lora_rank: expected 0 < L < {Dq}, got {kv_lora_rank}")
    _check_index("entry_tables", entry_tables, 2, E)
    _check_index("kv_lens", kv_lens, 1, E)
    if kv_cache.dtype not in (torch.float16, torch.bfloat16):
        vllm_kv_cache_dtype(kv_cache, "kv_cache")
    max_kv_len = int(kv_lens.max()) if max_kv_len is None else int(max_kv_len)
    splits = mla_num_kv_splits(max_kv_len) if num_kv_splits is None else int(num_kv_splits)
    o = torch.zeros(E, N, kv_lora_rank, dtype=q.dtype, device=q.device)
    lse = torch.zeros(E, N, dtype=q.dtype, device=q.device)
    logits = torch.empty(E, N, splits, kv_lora_rank + 1, dtype=torch.float32, device=q.device)
    buf = kv_cache.unsqueeze(2)  # [nb, block, 1, L + R]: one latent "head"
    scale_t = _scale_tensor(kv_scale, q.device)
    mod = loader.kernel_module("triton_decode_attention")
    mod.decode_attention_fwd(q, buf, buf[..., :kv_lora_rank], o, lse, entry_tables, kv_lens, logits, splits,
                             float(scale), kv_cache.shape[1], k_scale=scale_t, v_scale=scale_t, is_mla=True)
    return o, lse


def merge_attn_states(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse=None) -> None:
    """vLLM's Triton ``merge_attn_states`` (outputs ``[T, H, D]``, LSE ``[H, T]`` float32). Its
    kernel addresses prefix and suffix alike, token stride = H * the prefix's head stride, so
    inputs laid out otherwise (e.g. a padded output sliced beside a dense one) are made
    contiguous first."""
    for name, t in (("prefix_output", prefix_output), ("suffix_output", suffix_output)):
        _need(isinstance(t, torch.Tensor) and t.shape == output.shape,
              f"{name}: expected shape {tuple(output.shape)}, got {tuple(getattr(t, 'shape', ()))}")
    for name, t in (("prefix_lse", prefix_lse), ("suffix_lse", suffix_lse)):
        _need(isinstance(t, torch.Tensor) and t.shape == output.shape[1::-1],
              f"{name}: expected [H, T] = {tuple(output.shape[1::-1])}, got {tuple(getattr(t, 'shape', ()))}")
    head_stride = prefix_output.stride(1)
    kernel_strides = (output.shape[1] * head_stride, head_stride, 1)
    if prefix_output.stride() != kernel_strides or suffix_output.stride() != kernel_strides:
        prefix_output, suffix_output = prefix_output.contiguous(), suffix_output.contiguous()
    mod = loader.kernel_module("triton_merge_attn_states")
    mod.merge_attn_states(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse)
