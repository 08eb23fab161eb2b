"""Graph tests run single-threaded.

They make many small tensor operations, for which torch's intra-op threads only add
synchronization (on a busy 2-core machine, several times the run time).  The results do
not depend on the thread count.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def single_torch_thread() -> Iterator[None]:
    """Run each graph test with one torch CPU thread, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
