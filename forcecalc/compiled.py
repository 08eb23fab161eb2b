"""``torch.compile`` for the models' hot parts: fewer, fused kernels, the same numbers to
rounding.

Two places where it helps (measured on an H100, float32, 66-atom slab, see
``benchmarks/replay_compile.py`` and ``benchmarks/speed.py --compile``):

* the fixed-shape forward that a CUDA graph replays (``ForceCalculator(cuda_graph=True,
  compile_mode="default")``): static shapes, one compilation per set of sizes; SpinConv-All's
  replay 4.6 -> 3.3 ms, ForceNet-All's 1.8 -> 1.3 ms;
* the blocks of a batched forward (:func:`compiled_blocks`, dynamic shapes): each SpinConv
  ``SpinConvBlock`` and ForceNet ``InteractionBlock``; ForceNet-All batched 98k -> 137k atoms/s.

Compiling takes seconds to a minute on first use (and needs a C++ compiler on the CPU).
Modes that capture CUDA graphs themselves (``reduce-overhead``, ``max-autotune``) are refused:
the calculator captures its own.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

#: A fixed-shape forward: named input tensors to named output tensors.
Forward = Callable[[dict[str, Tensor]], dict[str, Tensor]]

#: ``torch.compile`` modes accepted (none of them captures CUDA graphs of its own).
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def check_compile_mode(mode: str) -> None:
    """Raise ``ValueError`` unless ``mode`` is one of :data:`COMPILE_MODES`."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")


def compiled_blocks(module: nn.Module, mode: str = "default") -> nn.Module:
    """A copy of ``module`` (a model, or a :class:`~forcecalc.checkpoint.Potential` holding
    one; weights copied) whose SpinConv ``SpinConvBlock`` and ForceNet ``InteractionBlock``
    forwards are compiled with dynamic shapes: the shape-static hot parts (kernel products,
    inverse DFT, Swish, norms; filter MLPs, messages, sums).  Compiling a whole model instead
    breaks its graph about 20 times (data-dependent edge selection) and compiles for minutes.
    """
    from forcecalc.models.forcenet import InteractionBlock
    from forcecalc.models.spinconv import SpinConvBlock

    check_compile_mode(mode)
    module = copy.deepcopy(module)
    blocks = [m for m in module.modules() if isinstance(m, SpinConvBlock | InteractionBlock)]
    if not blocks:
        raise ValueError(f"{type(module).__name__} holds no SpinConv or ForceNet blocks")
    for block in blocks:
        block.forward = torch.compile(block.forward, dynamic=True, mode=mode)
    return module


def compiled_function(function: Forward, mode: str = "default") -> Forward:
    """``function`` compiled with static shapes (for a fixed-shape forward, replayed from CUDA
    graphs: one compilation per set of input sizes)."""
    check_compile_mode(mode)
    return torch.compile(function, dynamic=False, mode=mode)
