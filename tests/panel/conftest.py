"""The panel's tensors are tiny: torch's intra-op threads only add overhead, and where pytest-xdist
workers share two cores they spin against each other (measured here: 10x the CPU time and the
wall time of one thread). Every panel test runs with one thread; the setting is restored after."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
