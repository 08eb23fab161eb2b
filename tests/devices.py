"""The devices the tests run on: always the CPU, CUDA where the machine has it."""

from __future__ import annotations

import pytest
import torch

#: Skips a test on a machine without a CUDA device.
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
#: ``@pytest.mark.parametrize("device", DEVICES)``: the CPU, and CUDA where available.
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
