"""Expected values and budgets for tensors that are not a stored golden (a shrunken case, a
captured dump): computed by the case kind's own golden builder, so they follow exactly the
stored tiers' conventions (float64 reference on the CPU, one thread; the same budget code)."""

from __future__ import annotations

import torch

from attncheck import golden


def expected_and_budgets(case, inputs: dict) -> dict:
    """inputs (batch tensors by their golden names) + ``expected.*`` + ``budget.*``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as golden.generate: the budgets must not depend on threading
    try:
        computed = golden.case_module(case).expected_and_budgets(case, inputs)
    finally:
        torch.set_num_threads(threads)
    return {**inputs, **computed}
