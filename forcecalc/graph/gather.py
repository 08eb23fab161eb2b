"""Row gathers whose gradient is also a gather: fast, deterministic, differentiable to any order.

``values[index]`` (advanced indexing) is the models' most common operation: messages of the
neighbors of every edge, edge directions on every grid.  Its gradient is a sum over the
positions that read each row, which torch computes by sorting the index and scattering, on
every backward pass: on a GPU that kernel took three quarters of an energy-centric SpinConv
training step (forces by a double backward through these gathers; H100, 2026-11-25).

:class:`RowIndex` keeps the index together with its inverse, the table of positions that read
each row (built once, on the first backward pass, and reused by every later one).  The gradient
is then a gather through the inverse and a sum over a fixed number of slots, in a fixed order:
deterministic on every device, and itself a :class:`RowIndex` gather, so double backward (forces
of energy-centric models, their training) takes the same fast path.  On the CPU the gradient is
``index_add_`` (:meth:`RowIndex.sum_by_row`): sequential, so deterministic as well, and faster
there (no padded copy of the gradient, no ``[n_rows, k, *F]`` temporary).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch.autograd.function import FunctionCtx


class RowIndex:
    """An index ``[*S]`` into the rows of a table of ``n_rows`` rows; the value ``n_rows``
    selects a row of zeros (padding).

    ``inverse`` ``[n_rows, k]``: the flat positions in ``index`` that read each row, in
    increasing order, padded with ``index.numel()``; ``position`` ``[index.numel()]``: the flat
    position of each entry of ``index`` in ``inverse`` (``n_rows * k`` for padding).  Both are
    built on first use.
    """

    def __init__(
        self,
        index: Tensor,
        n_rows: int,
        inverse: Tensor | None = None,
        position: Tensor | None = None,
    ) -> None:
        self.index = index
        self.n_rows = n_rows
        self._inverse = inverse
        self._position = position

    def gather(self, values: Tensor) -> Tensor:
        """``values`` ``[n_rows, *F]`` -> ``[*S, *F]``, zeros where ``index == n_rows``."""
        if len(values) != self.n_rows:
            raise ValueError(f"expected {self.n_rows} rows, got {len(values)}")
        return _GatherRows.apply(values, self)

    def sum_by_row(self, values: Tensor) -> Tensor:
        """The adjoint of :meth:`gather`, ``[*S, *F] -> [n_rows, *F]``: row ``r`` is the sum of
        the ``values`` at the positions that read it, added in increasing position (no
        atomics: the same bits on every run, on CUDA too).  On the CPU, where ``index_add_``
        adds sequentially (deterministic) and is faster than the gather, it is ``index_add_``.
        """
        flat = values.reshape(self.index.numel(), *values.shape[self.index.dim() :])
        if values.device.type == "cpu":
            out = values.new_zeros(self.n_rows + 1, *flat.shape[1:])
            return out.index_add_(0, self.index.reshape(-1), flat)[: self.n_rows]
        return self.transposed().gather(flat).sum(dim=1)

    def _build(self) -> None:
        flat = self.index.reshape(-1)
        size = flat.numel()
        # counts by scatter, not bincount (which waits for the device on CUDA to size its output)
        counts = flat.new_zeros(self.n_rows + 1).index_add_(0, flat, torch.ones_like(flat))
        counts = counts[: self.n_rows]
        if size and self.n_rows:
            # the width and whether the index is in order, in one fetch (one wait on CUDA)
            summary = torch.stack([counts.max(), (flat[1:] >= flat[:-1]).all().long()])
            largest, ordered = summary.tolist()
        else:
            largest, ordered = 0, True
        width = max(largest, 1)
        if ordered:  # edges by target, atoms
            order, rows = torch.arange(size, device=flat.device), flat
        else:
            order = torch.argsort(flat, stable=True)
            rows = flat[order]
        first = torch.cumsum(counts, 0) - counts
        # padding entries (row n_rows) go to one extra place past the table, then dropped
        padding = rows == self.n_rows
        slot = torch.arange(size, device=flat.device) - pad_rows(first, size)[rows]
        place = torch.where(padding, self.n_rows * width, rows * width + slot)
        inverse = torch.full(
            (self.n_rows * width + 1,), size, dtype=torch.int64, device=flat.device
        )
        inverse[place] = order
        position = place
        if not ordered:
            position = torch.empty_like(place)
            position[order] = place
        self._inverse = inverse[:-1].view(self.n_rows, width)
        self._position = position

    @property
    def inverse(self) -> Tensor:
        """``[n_rows, k]`` (see the class docstring), built on first use (host-synchronizing
        on CUDA: the width ``k`` is data dependent)."""
        if self._inverse is None:
            self._build()
        assert self._inverse is not None
        return self._inverse

    @property
    def position(self) -> Tensor:
        """``[index.numel()]`` (see the class docstring), built on first use."""
        if self._position is None:
            self._build()
        assert self._position is not None
        return self._position

    def transposed(self) -> RowIndex:
        """The index of the gradient: ``inverse`` into the ``index.numel()`` positions."""
        return RowIndex(
            self.inverse,
            self.index.numel(),
            inverse=self.position.view(-1, 1),
            position=self.inverse.reshape(-1),
        )


def take_rows(values: Tensor, index: Tensor) -> Tensor:
    """``values[index]``: the rows of ``values`` ``[n, *F]`` at an int64 ``index`` ``[*S]``,
    ``[*S, *F]``, by ``index_select``, which copies whole rows (advanced indexing runs a
    generic element-wise kernel: on the CPU 3.5-10x slower for rows of 32-512 numbers).  The
    gradient is deterministic on every device: on CUDA advanced indexing's (``index_put_``
    with accumulation, which sorts; ``index_select``'s own gradient adds atomically), on the
    CPU ``index_add_`` (sequential; ``index_put_`` adds in parallel there, in an order that
    changes from run to run, and is 5-8x slower: rows of 64-512 numbers, 2 threads)."""
    return _TakeRows.apply(values, index)


def pad_rows(values: Tensor, value: float = 0) -> Tensor:
    """``values`` ``[n, *F]`` with a row of ``value`` (zeros) appended, ``[n + 1, *F]``: the
    row that the padding index ``n`` reads."""
    return torch.cat([values, values.new_full((1, *values.shape[1:]), value)])


def _select_rows(values: Tensor, index: Tensor) -> Tensor:
    rows = values.index_select(0, index.reshape(-1))
    return rows.view(*index.shape, *values.shape[1:])


class _TakeRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, values: Tensor, index: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(index)
        ctx.shape = values.shape
        return _select_rows(values, index)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (index,) = ctx.saved_tensors
        zeros = grad.new_zeros(ctx.shape)
        if grad.device.type == "cpu":
            rows = grad.reshape(index.numel(), *ctx.shape[1:])
            return zeros.index_add(0, index.reshape(-1), rows), None
        return zeros.index_put((index,), grad, accumulate=True), None


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, values: Tensor, row_index: RowIndex) -> Tensor:  # type: ignore[override]
        ctx.row_index = row_index
        return _select_rows(pad_rows(values), row_index.index)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        row_index: RowIndex = ctx.row_index
        return row_index.sum_by_row(grad), None
