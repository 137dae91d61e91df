"""Panel pairs that fail today: legitimate kernels the stored budgets do not yet cover.

Issue 9 items 1-2: the LSE budget is one realisation of rounding noise in two op orders and has
no rounding-step term, so a kernel that rounds at another point (Q or K pre-scaled in the model
dtype; MLA's absorbed query ``q_nope @ W_UK`` or up-projected keys stored in the model dtype, as
vLLM stores them) lands outside it. Every pair below fails the LSE check only; its output,
mean and cache checks pass. Values: (LSE rows over budget, worst LSE error / budget), measured
on the CPU (x86, torch 2.13) with ``python -m tests.panel.report`` against main 3d12f21.

tests/panel/test_panel.py marks these pairs ``xfail(strict=True)`` on the CPU: when the
budgets are fixed (emulated, machine-independent, with rounding-step terms) the pairs pass, the
strict xfail turns into a failure, and this table must be emptied. On CUDA the marks are not
strict (fp32 matmul rounding differs there, so the set may differ by a pair or two).
"""

BUDGET_GAPS = {
    "PANEL_Q_PRESCALED": {
        "decode-h8x2-d128-bs16-fp16-window7": (4, 1.5),
        "mixed-h32x8-d128-bs16-fp16": (46, 25.0),
        "mixed-h5x1-d80-bs16-bf16": (8, 6.1),
        "mixed-h8x1-d96-bs16-fp16": (9, 4.7),
        "full-decode-h32x8-d128-bs16-bf16": (9, 2.3),
        "full-mixed-h8x2-d128-bs16-bf16-chunks4": (18, 4.8),
        "full-mixed-h32x8-d128-bs16-bf16": (70, 7.2),
        "full-mixed-h32x8-d128-bs16-bf16-fp8e4m3fn": (7, 2.0),
        "full-mixed-h8x1-d128-bs544-bf16": (22, 4.1),
        "full-mixed-h8x2-d128-bs16-bf16-softcap50": (6, 3.3),
        "full-mixed-h8x2-d128-bs16-bf16-window128": (20, 3.4),
        "full-mixed-h8x2-d96-bs32-fp16": (32, 5.0),
        "full-prefill-h8x2-d128-bs16-fp16": (62, 36.9),
    },
    "PANEL_K_PRESCALED": {
        "decode-h32x8-d128-bs16-bf16-fp8e4m3fn": (2, 1.8),
        "decode-h8x2-d128-bs16-fp16-window7": (1, 1.2),
        "mixed-h32x8-d128-bs16-fp16": (37, 4.5),
        "mixed-h5x1-d80-bs16-bf16": (9, 5.3),
        "mixed-h8x1-d96-bs16-fp16": (6, 1.8),
        "full-decode-h32x8-d128-bs16-bf16": (4, 2.1),
        "full-mixed-h8x2-d128-bs16-bf16-chunks4": (2, 4.6),
        "full-mixed-h32x8-d128-bs16-bf16": (45, 6.7),
        "full-mixed-h32x8-d128-bs16-bf16-fp8e4m3fn": (26, 15.8),
        "full-mixed-h8x1-d128-bs544-bf16": (18, 6.2),
        "full-mixed-h8x2-d128-bs16-bf16-softcap50": (3, 1.3),
        "full-mixed-h8x2-d128-bs16-bf16-window128": (15, 3.4),
        "full-mixed-h8x2-d96-bs32-fp16": (16, 5.9),
        "full-prefill-h8x2-d128-bs16-fp16": (24, 8.2),
    },
    "PANEL_MLA_ABSORBED": {
        "mla-decode-h16-mini-bs16-bf16": (1, 2.0),
        "mla-mixed-h8-mini-bs16-fp16-chunks3": (4, 4.7),
        "mla-mixed-h8-bs16-bf16": (5, 3.6),
        "mla-mixed-h8-mini-bs1-bf16": (8, 5.4),
        "mla-mixed-h8-mini-bs16-bf16-fp8e4m3fn": (4, 4.0),
        "mla-mixed-h8-mini-bs16-bf16-noyarn": (5, 1.2),
        "mla-mixed-h8-mini-bs16-fp16-fp8e4m3fnuz": (3, 3.9),
        "mla-mixed-h8-mini-bs64-bf16": (7, 5.1),
        "mla-prefill-h8-mini-bs16-fp16": (14, 9.0),
        "mla-specdecode-h16-mini-bs16-bf16-q4": (10, 4.3),
        "mla-unordered-h8-mini-bs16-bf16": (9, 4.1),
        "full-mla-mixed-h8-bs64-fp16": (10, 7.5),
        "full-mla-specdecode-h8-mini-bs16-bf16-q8": (7, 3.0),
    },
    "PANEL_MLA_UPPROJECTED": {
        "mla-decode-h16-mini-bs16-bf16": (2, 1.8),
        "mla-mixed-h8-mini-bs16-fp16-chunks3": (5, 2.3),
        "mla-mixed-h8-bs16-bf16": (5, 2.0),
        "mla-mixed-h8-mini-bs1-bf16": (11, 10.1),
        "mla-mixed-h8-mini-bs16-bf16-fp8e4m3fn": (2, 2.7),
        "mla-mixed-h8-mini-bs16-bf16-noyarn": (3, 1.4),
        "mla-mixed-h8-mini-bs16-fp16-fp8e4m3fnuz": (2, 1.5),
        "mla-mixed-h8-mini-bs64-bf16": (4, 7.1),
        "mla-prefill-h8-mini-bs16-fp16": (14, 5.3),
        "mla-specdecode-h16-mini-bs16-bf16-q4": (9, 8.2),
        "mla-unordered-h8-mini-bs16-bf16": (9, 4.5),
        "full-mla-mixed-h8-bs16-bf16-fp8e4m3fn-chunks4": (1, 1.9),
        "full-mla-mixed-h8-bs64-fp16": (12, 3.5),
        "full-mla-specdecode-h8-mini-bs16-bf16-q8": (4, 3.6),
    },
    "PANEL_MLA_MIXED": {
        "mla-decode-h16-mini-bs16-bf16": (1, 2.0),
        "mla-mixed-h8-mini-bs16-fp16-chunks3": (5, 2.3),
        "mla-mixed-h8-bs16-bf16": (5, 2.1),
        "mla-mixed-h8-mini-bs1-bf16": (10, 10.1),
        "mla-mixed-h8-mini-bs16-bf16-fp8e4m3fn": (2, 2.7),
        "mla-mixed-h8-mini-bs16-bf16-noyarn": (3, 1.4),
        "mla-mixed-h8-mini-bs16-fp16-fp8e4m3fnuz": (2, 1.5),
        "mla-mixed-h8-mini-bs64-bf16": (4, 7.1),
        "mla-prefill-h8-mini-bs16-fp16": (14, 5.3),
        "mla-specdecode-h16-mini-bs16-bf16-q4": (9, 8.2),
        "mla-unordered-h8-mini-bs16-bf16": (8, 4.5),
        "full-mla-mixed-h8-bs64-fp16": (11, 3.5),
        "full-mla-specdecode-h8-mini-bs16-bf16-q8": (4, 3.6),
    },
}
