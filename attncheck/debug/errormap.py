"""PNG error maps of one run (matplotlib, Agg canvas: no display, no global backend change).

* ``token_head_png``: error / budget per query row (x: query tokens, y: heads) on a log scale
  centred on 1 (the rule's limit), for the output and, where the backend returns one, the LSE.
  Solid lines separate sequences; dotted ticks mark where a query token starts a new KV block.
  Non-finite output rows are drawn at the top of the scale and marked with a cross.
* ``sequence_block_png`` (MHA, decode-heavy batches): one row per sequence, one column per KV
  block the sequence reads. For each failing sequence's worst row, the cell is
  cos(error, o_ref - o_block), where o_block is the float64 attention over that block's keys
  alone: a kernel that drops or under-weights block j makes an error along o_ref - o_j
  (+1: exactly that), one that over-weights it an error against it (-1). Blank cells: the
  sequence passes, or the block is all the row sees (no direction).
"""

from __future__ import annotations

import io
import math

import torch

from attncheck.debug import rows as rows_mod

LOG_MIN, LOG_MAX = -2.0, 4.0  # ratio 0.01 .. 10^4 (beyond: clipped)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


# Fixed margins in inches (a layout engine costs more than the drawing itself).
LEFT, RIGHT, TOP, BOTTOM, GAP = 0.75, 1.25, 0.8, 0.65, 0.8


def _panels(width: float, panel_height: float, n: int):
    """A figure with ``n`` stacked axes and a colorbar axis to their right."""
    height = TOP + n * panel_height + (n - 1) * GAP + BOTTOM
    fig = _figure(width, height)
    axes = []
    for i in range(n):
        bottom = BOTTOM + (n - 1 - i) * (panel_height + GAP)
        axes.append(fig.add_axes((LEFT / width, bottom / height, (width - LEFT - RIGHT) / width,
                                  panel_height / height)))
    cax = fig.add_axes(((width - RIGHT + 0.15) / width, BOTTOM / height, 0.14 / width,
                        (height - TOP - BOTTOM) / height))
    return fig, axes, cax


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _log_ratio(ratio: torch.Tensor) -> torch.Tensor:
    r = torch.nan_to_num(ratio.to(torch.float64), nan=10.0 ** LOG_MAX, posinf=10.0 ** LOG_MAX)
    return torch.log10(r.clamp(min=10.0 ** LOG_MIN, max=10.0 ** LOG_MAX))


def _cmap_norm():
    from matplotlib.colors import TwoSlopeNorm
    return "RdYlGn_r", TwoSlopeNorm(vmin=LOG_MIN, vcenter=0.0, vmax=LOG_MAX)


def token_head_png(case, tensors: dict, maps: rows_mod.RowMaps, title: str) -> bytes:
    panels = [("output: max over head dim of |o - ref| / budget", maps.ratio)]
    if maps.lse_ratio is not None:
        panels.append(("LSE: |lse - ref| / budget", maps.lse_ratio))
    panels = [(t, m) for t, m in panels if m is not None]
    if not panels:
        raise ValueError("no output or LSE to map (the backend returned nothing usable)")
    T, H = panels[0][1].shape
    fig, axes, cax = _panels(min(16.0, max(7.0, 2.5 + T * 0.09)), min(3.2, max(1.2, H * 0.14)), len(panels))
    cmap, norm = _cmap_norm()
    facts = rows_mod.token_facts(case, tensors)
    qsl = tensors["query_start_loc"].tolist()
    block_starts = [t for t, f in enumerate(facts) if f["position"] % f["block_size"] == 0 and t not in qsl]
    image = None
    for ax, (label, m) in zip(axes, panels):
        image = ax.imshow(_log_ratio(m).T.numpy(), aspect="auto", interpolation="nearest", cmap=cmap, norm=norm,
                          extent=(-0.5, T - 0.5, H - 0.5, -0.5))
        for x in qsl[1:-1]:
            ax.axvline(x - 0.5, color="black", linewidth=1.6)
        for x in block_starts:
            ax.axvline(x - 0.5, color="black", linewidth=0.6, linestyle=":")
        if m is maps.ratio and maps.nonfinite is not None and bool(maps.nonfinite.any()):
            t_idx, h_idx = maps.nonfinite.nonzero(as_tuple=True)
            ax.scatter(t_idx.numpy(), h_idx.numpy(), marker="x", color="black", s=14, linewidths=0.8,
                       label="NaN/Inf")
            ax.legend(loc="upper right", fontsize=7)
        ax.set_ylabel("head", fontsize=8)
        ax.tick_params(labelsize=7)
        # sequence labels on a top axis; sequences too narrow to label stay unlabelled
        top = ax.secondary_xaxis("top")
        labelled = [b for b in range(len(qsl) - 1) if (qsl[b + 1] - qsl[b]) * 60 >= T]
        top.set_xticks([(qsl[b] + qsl[b + 1] - 1) / 2 for b in labelled],
                       [f"seq {b}" if (qsl[b + 1] - qsl[b]) * 12 >= T else str(b) for b in labelled])
        top.tick_params(labelsize=7, length=0)
        ax.set_title(label, fontsize=9, loc="left")
    from matplotlib.ticker import MaxNLocator
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel("query token (solid: sequence boundary, dotted: a new KV block starts)", fontsize=8)
    cb = fig.colorbar(image, cax=cax)
    cb.set_label("log10(error / budget); > 0 fails", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10, y=1 - 0.1 / fig.get_figheight(), va="top")
    return _png(fig)


def is_decode_heavy(tensors: dict) -> bool:
    qsl = tensors["query_start_loc"].tolist()
    qlens = [qsl[i + 1] - qsl[i] for i in range(len(qsl) - 1)]
    return len(qlens) > 1 and sum(q == 1 for q in qlens) * 2 >= len(qlens)


def _cache_after_reference_write(tensors: dict, name: str, expected: str) -> torch.Tensor:
    cache = tensors[name].clone()
    cache.view(-1, *cache.shape[2:])[tensors["slot_mapping"].long()] = tensors[expected]
    return cache


def block_alignment(case, tensors: dict, actual: dict, maps: rows_mod.RowMaps) -> torch.Tensor:
    """[num_seqs, max_blocks]: cos(error, o_ref - o_block) of each failing sequence's worst row
    (NaN where the sequence passes, has no such block, or the block is all the row sees)."""
    from reference import mha as ref_mha
    from reference import paged as ref_paged

    kc = _cache_after_reference_write(tensors, "key_cache", "expected.key_cache_slots")
    vc = _cache_after_reference_write(tensors, "value_cache", "expected.value_cache_slots")
    bs = case.block_size
    slens = tensors["seq_lens"].tolist()
    qsl = tensors["query_start_loc"].tolist()
    nblocks = [-(-s // bs) for s in slens]
    out = torch.full((len(slens), max(nblocks)), float("nan"), dtype=torch.float64)
    ratio = maps.ratio
    o_all = actual["output"].to(torch.float64)
    ref_all = tensors["expected.output"].to(torch.float64)
    G = case.num_heads // case.num_kv_heads
    for b, seq_len in enumerate(slens):
        seg = ratio[qsl[b]:qsl[b + 1]]
        if not bool((seg > 1).any()):
            continue
        flat = torch.nan_to_num(seg, posinf=1e300).flatten()
        i = int(torch.argmax(flat))
        t, h = qsl[b] + i // seg.shape[1], i % seg.shape[1]
        err = torch.nan_to_num(o_all[t, h] - ref_all[t, h], nan=0.0, posinf=0.0, neginf=0.0)
        if float(err.norm()) == 0:
            continue
        pos = seq_len - (qsl[b + 1] - qsl[b]) + (t - qsl[b])
        q = tensors["query"][t:t + 1, h:h + 1].to(torch.float64)
        slopes = tensors.get("alibi_slopes")
        for j in range(nblocks[b]):
            lo, hi = j * bs, min(seq_len, (j + 1) * bs)
            k, v = ref_paged.gather_kv(kc, vc, tensors["block_table"][b], lo, hi, k_scale=case.k_scale,
                                       v_scale=case.v_scale, dtype=torch.float64)
            k, v = k[:, h // G:h // G + 1], v[:, h // G:h // G + 1]
            o_j, lse_j = ref_mha.attention(
                q, k, v, scale=case.softmax_scale, causal=case.causal, sliding_window=case.sliding_window,
                softcap=case.softcap, alibi_slopes=None if slopes is None else slopes[h:h + 1].to(torch.float64),
                q_offset=pos - lo)
            if not math.isfinite(float(lse_j[0, 0])):
                continue  # the row sees no key of this block
            d = ref_all[t, h] - o_j[0, 0]
            if float(d.norm()) <= 1e-5 * float(ref_all[t, h].norm()):
                continue  # the block is all the row sees (up to the float32 storage of ref): no direction
            out[b, j] = float(err @ d) / float(err.norm() * d.norm())
    return out


def sequence_block_png(case, tensors: dict, actual: dict, maps: rows_mod.RowMaps, title: str) -> bytes:
    align = block_alignment(case, tensors, actual, maps)
    B, NB = align.shape
    fig, (ax,), cax = _panels(min(16.0, max(7.0, 3.0 + NB * 0.22)), min(6.0, max(1.2, B * 0.3)), 1)
    image = ax.imshow(align.numpy(), aspect="auto", interpolation="nearest", cmap="RdBu_r", vmin=-1.0, vmax=1.0,
                      extent=(-0.5, NB - 0.5, B - 0.5, -0.5))
    slens = tensors["seq_lens"].tolist()
    bs = case.block_size
    for b, s in enumerate(slens):
        n = -(-s // bs)
        fill = s - (n - 1) * bs
        ax.text(n - 1, b, f"{fill}/{bs}", ha="center", va="center", fontsize=6, color="tab:blue")
        ax.plot([n - 0.5, n - 0.5], [b - 0.5, b + 0.5], color="tab:blue", linewidth=1.2)
    ax.set_xlabel(f"KV block of the sequence (blue: its last block, keys used / block size {bs})", fontsize=8)
    ax.set_ylabel("sequence", fontsize=8)
    ax.tick_params(labelsize=7)
    cb = fig.colorbar(image, cax=cax)
    cb.set_label("cos(error, ref - block)", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("worst row of each failing sequence; +1: the error is that block dropped", fontsize=9, loc="left")
    fig.suptitle(title, fontsize=10, y=1 - 0.1 / fig.get_figheight(), va="top")
    return _png(fig)


def maps_pngs(case, tensors: dict, actual: dict, maps: rows_mod.RowMaps, title: str) -> list:
    """[(caption, png bytes)] for one run."""
    out = []
    if maps.ratio is not None or maps.lse_ratio is not None:
        out.append(("error / budget per query token x head", token_head_png(case, tensors, maps, title)))
    if (case.kind == "MHA" and maps.ratio is not None and is_decode_heavy(tensors)
            and bool((maps.ratio > 1).any()) and "output" in actual):
        out.append(("per sequence x KV block", sequence_block_png(case, tensors, actual, maps, title)))
    return out
