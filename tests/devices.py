"""The devices the tests run on: always the CPU, CUDA where the machine has it."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: Skips a test on a machine without a CUDA device.
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
#: ``@pytest.mark.parametrize("device", DEVICES)``: the CPU, and CUDA where available.
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


class CaptureSafety(TorchDispatchMode):
    """Raises on an operation that CUDA graph capture forbids and the meta device allows:
    a Python number stored by indexing (``t[i] = 3``), which on CUDA becomes a copy from a
    tensor made on the host.  Run the fixed-shape forward on the meta device inside it (the
    meta device itself already fails on reads of values: ``.item()``, ``nonzero``)."""

    def __init__(self) -> None:
        super().__init__()
        # the scalars made so far, kept alive so that their ids stay theirs
        self._host_scalars: dict[int, torch.Tensor] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.copy_.default and id(args[1]) in self._host_scalars:
            raise RuntimeError(
                "a Python number stored by indexing (a host-to-device copy on CUDA, which "
                "CUDA graph capture refuses): use fill_ on a slice"
            )
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.scalar_tensor.default:
            self._host_scalars[id(out)] = out
        return out
