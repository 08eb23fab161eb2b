"""CUDA-graph replay of a fixed-shape forward.

A forward of a small system on a GPU is bound by the host: each of its ~500 operators costs
10-20 us to launch, far more than its kernel runs.  A CUDA graph records the kernels of one
call and replays them with a single launch.  That needs a function whose shapes depend only on
its inputs' shapes and that never waits for the device (no ``.item()``, no ``nonzero``):
a model's ``fixed_shape_forward`` (SpinConv, both kinds, and ForceNet: see
:meth:`forcecalc.models.spinconv.SpinConv.fixed_shape_forward`), fed by
``fixed_shape_inputs``: the neighbor list's edges as candidates, padded to sizes that change
rarely (:func:`padded_size`); the edge selection happens inside the forward.

:class:`GraphReplay` captures one graph per input signature (names, shapes and dtypes) and
replays it with the new values copied into the captured input buffers.  On a device other than
CUDA it calls the function directly (the same numbers, no graph).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from forcecalc.graph.batch import Batch
from forcecalc.graph.gather import RowIndex

Inputs = dict[str, Tensor]
Signature = tuple[tuple[str, tuple[int, ...], torch.dtype], ...]

#: Calls before a capture (on a side stream, as CUDA graphs require: they let the caching
#: allocator and cuBLAS set up their state outside the graph).
WARMUP_CALLS = 2


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: Inputs
    outputs: dict[str, Tensor]
    sources: Inputs  # the tensors last copied into ``inputs``


class GraphReplay:
    """``function(inputs) -> outputs`` (dicts of tensors) through CUDA graphs.

    Args:
        function: fixed shapes given the inputs' shapes, no host synchronisation; outputs
            without autograd history (a backward pass inside it, as an energy-centric
            model's forces, is captured with the rest).
        device: where the function runs; the inputs may be anywhere (they are copied).
        max_graphs: graphs kept (least recently used dropped first); each holds its own memory.

    Attributes:
        captures: how many graphs were captured (a new signature, or one dropped and seen
            again).
        signatures: every input signature seen, on any device (on CUDA each was captured).
    """

    def __init__(
        self,
        function: Callable[[Inputs], dict[str, Tensor]],
        device: torch.device | str,
        max_graphs: int = 4,
    ) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.function = function
        self.device = torch.device(device)
        self.max_graphs = max_graphs
        self.captures = 0
        self.signatures: set[Signature] = set()
        self._graphs: OrderedDict[Signature, _Captured] = OrderedDict()

    @property
    def uses_graphs(self) -> bool:
        """True on CUDA; elsewhere the function is called directly."""
        return self.device.type == "cuda"

    def __call__(self, inputs: Inputs) -> dict[str, Tensor]:
        """The function's outputs for ``inputs`` (fresh tensors, on the function's device).

        Inputs are taken as immutable: an entry that is the very tensor of the previous call
        with this signature is not copied to the device again (a caller that moves atoms
        passes a new ``positions`` tensor and the same tables)."""
        signature = tuple((k, tuple(v.shape), v.dtype) for k, v in inputs.items())
        self.signatures.add(signature)
        if not self.uses_graphs:
            with torch.no_grad():
                return self.function({k: v.to(self.device) for k, v in inputs.items()})
        captured = self._graphs.get(signature)
        if captured is None:
            captured = self._capture(inputs)  # replayed once already, on these inputs
            self._graphs[signature] = captured
            if len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(signature)
            for name, buffer in captured.inputs.items():
                if inputs[name] is not captured.sources[name]:
                    buffer.copy_(inputs[name], non_blocking=True)
            captured.sources = dict(inputs)
            captured.graph.replay()
        return {name: value.clone() for name, value in captured.outputs.items()}

    def _capture(self, inputs: Inputs) -> _Captured:
        """Warm up, capture, replay once and check the replay against the warm-up's eager
        outputs (a graph that captured stale state, e.g. a tensor made during the capture and
        kept, would replay other numbers: an error, never a silent wrong result)."""
        static = {k: v.to(self.device, copy=True) for k, v in inputs.items()}
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(WARMUP_CALLS):
                expected = self.function(static)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph), torch.no_grad():
                outputs = self.function(static)
        except RuntimeError as error:
            raise RuntimeError(
                f"capturing the forward as a CUDA graph failed ({str(error).splitlines()[0]}); "
                "run without cuda_graph"
            ) from error
        self.captures += 1
        graph.replay()
        check_replay(outputs, expected)
        return _Captured(graph, static, outputs, dict(inputs))


def check_replay(replayed: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    """Raise ``RuntimeError`` unless a replay's outputs equal the eager call's to rounding
    (``1e-4`` relative to each output's largest finite magnitude: the same kernels run, but
    sums by atomic adds may take another order); non-finite entries must match (the stress of
    a cell without volume)."""
    for name, value in expected.items():
        got = replayed.get(name)
        finite = value[torch.isfinite(value)]
        scale = float(finite.abs().max()) if finite.numel() else 0.0
        if (
            got is None
            or got.shape != value.shape
            or not torch.allclose(got, value, rtol=1e-4, atol=1e-4 * scale, equal_nan=True)
        ):
            raise RuntimeError(
                f"the CUDA graph's replay of {name!r} differs from the eager call: capturing "
                "this forward is not safe here; run without cuda_graph"
            )


def padded_size(n: int) -> int:
    """The smallest of ``{8, 10, 12, 14} x 2**k`` that is at least ``n`` (at least 8): a
    capacity at most 25% above ``n`` that takes one value over a range of sizes."""
    if n <= 8:
        return 8
    power = 1 << ((n - 1).bit_length() - 4)  # 8 * power <= n - 1 < 16 * power
    return -(-n // (2 * power)) * (2 * power)


def room(previous: Inputs | None, name: str, n_atoms: int) -> int:
    """The last dimension of ``previous[name]``: the room inputs built earlier for these atoms
    had (0 without them, or when they were built for another number of atoms).  Builds that
    keep at least the room of the last one give a replay the same signature while the atoms
    move (a capture per growth, not per change of the neighbor count)."""
    if previous is None or len(previous["numbers"]) != n_atoms or name not in previous:
        return 0
    return previous[name].shape[-1]


def padded_table(table: Tensor, n_edges: int, capacity: int, min_width: int = 1) -> Tensor:
    """A ``[rows, w]`` table of edges padded with ``n_edges`` (a :attr:`RowIndex.inverse`) for
    the edges padded to ``capacity``: padded with ``capacity``, with room for an eighth more
    edges per row than the widest has (so that the width survives small moves), rounded up to
    a multiple of 8, and at least ``min_width`` wide."""
    width = table.shape[1] + table.shape[1] // 8
    width = max(-(-width // 8) * 8, min_width)
    table = torch.where(table == n_edges, capacity, table)
    return F.pad(table, (0, width - table.shape[1]), value=capacity)


def candidate_inputs(
    batch: Batch, min_width: int, previous: Inputs | None = None
) -> dict[str, Tensor]:
    """The fixed-shape inputs every model takes: the batch's edges as candidates (any superset
    of a model's graph), padded by :func:`padded_size` with edges from atom 0 to itself with a
    zero shift (zero length: never kept), and the table of the candidates into each atom; at
    least as large as ``previous`` (inputs built earlier for the same atoms, see :func:`room`).

    Returns:
        ``numbers`` ``[n_atoms]``, ``positions`` ``[n_atoms, 3]`` and ``cell``
        ``[n_systems, 3, 3]`` (float64 of the batch's: the only entries that change when
        atoms move, see :meth:`forcecalc.checkpoint.Potential.moved`), ``system_idx``
        ``[n_atoms]``, ``candidate_index`` ``[2, C]``, ``candidate_shifts`` ``[C, 3]`` and
        ``candidates_in`` ``[n_atoms, Wc]`` (increasing, padded with ``C``; ``Wc >=
        min_width``).
    """
    n_candidates, n_atoms = batch.n_edges, batch.n_atoms
    capacity = max(padded_size(n_candidates), room(previous, "candidate_index", n_atoms))
    width = max(min_width, room(previous, "candidates_in", n_atoms))
    pad = batch.edge_index.new_zeros(capacity - n_candidates)
    into = RowIndex(batch.edge_index[1], n_atoms).inverse
    return {
        "numbers": batch.numbers,
        "positions": batch.positions.to(torch.float64),
        "cell": batch.cell.to(torch.float64),
        "system_idx": batch.system_idx,
        "candidate_index": torch.cat([batch.edge_index, pad.expand(2, -1)], dim=1),
        "candidate_shifts": torch.cat([batch.shifts, pad.new_zeros(len(pad), 3)]),
        "candidates_in": padded_table(into, n_candidates, capacity, width),
    }
