"""Exact periodic neighbor lists and the max-neighbor rule.

Edge convention (used everywhere in forcecalc): an edge ``e = (j -> i)`` is stored as
``edge_index[:, e] = (j, i)``: row 0 is the *source* (the neighbor ``j``), row 1 the *target*
(the center ``i`` that receives the message).  Its vector points from the target to the source::

    vector[e] = positions[j] - positions[i] + shifts[e] @ cell[system of i]

with integer cell shifts ``shifts[e]``.  This is the layout of OCP's ``radius_graph_pbc`` and
``get_pbc_distances`` (``edge_index = [j, i]``), so OCP's names for source/target carry over.

Backends
--------
``"vesin"``
    vesin-torch's cell lists, one call per system (CPU or CUDA), on positions wrapped into the
    cell along periodic axes (vesin gets very slow for atoms many cells away).  Fastest on the
    CPU, and for large systems on the GPU.
``"torch"``
    our own batched cell list (:mod:`forcecalc.graph.cell_list`): every system of a batch in
    one pass of tensor operations, so many small systems cost about as much as one on the GPU.
    Robust to strongly skewed cells (it reduces the lattice) and to sparse, spread-out
    non-periodic systems (its bins cost memory only where atoms are).
Both return the pair set of ``ase.neighborlist.neighbor_list`` (order differs), up to pairs
within rounding of the cutoff.  :func:`radius_graph` runs them slightly beyond the cutoff (in a
reduced basis of the lattice where the cell's own would need too many periodic images:
:mod:`forcecalc.graph.lattice`) and decides those pairs as the models do, on the edge vectors,
so its result does not depend on the backend, the basis or a skin.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from forcecalc.graph.cell_list import batched_cell_list, wrap_positions
from forcecalc.graph.gather import RowIndex, pad_rows
from forcecalc.graph.lattice import search_lattice
from forcecalc.warning import warn

if TYPE_CHECKING:
    from ase import Atoms

Backend = Literal["auto", "vesin", "torch"]

#: Systems whose box holds more cutoff-sized cells than this go to the torch cell list even
#: when vesin is chosen: vesin 0.6's cell list caps its grid at 1e5 cells by rescaling the
#: axes and divides by zero (SIGFPE: the process dies) when an axis rescales to no cell (two
#: molecules 1,500 and 2,500 Å apart, no periodicity, cutoff 6 Å).
VESIN_MAX_CELLS = 1e4

#: The searches look this far (Å) beyond the cutoff (1000 times farther for positions in
#: float32); whether a pair lies inside is then decided on the models' own edge vectors
#: (``d**2 < cutoff**2``), so that every backend, basis and skin gives the same pairs, and a
#: pair and its reverse are both kept or dropped.
CUTOFF_MARGIN = 1e-6
#: Two neighbor distances closer than this (Å) count as equal in the max-neighbor rule.
TIE_TOLERANCE = 1e-5
#: The models' graphs drop pairs with squared distance at or below this (Å^2), as OCP's
#: ``radius_graph_pbc``: an atom's own zero shift, and overlapping atoms.
MIN_DISTANCE_SQ = 1e-4
#: Two atoms closer than this (Å) get a warning: shorter than any bond (H2's is 0.74 Å), so
#: the structure is broken (positions in Bohr or nm, a wrong cell) and no model's numbers mean
#: anything there.
CLOSE_CONTACT = 0.4


@dataclass(frozen=True)
class NeighborGraph:
    """Edges of a batch of systems.

    Attributes:
        edge_index: ``[2, n_edges]`` int64, (source j, target i).
        shifts: ``[n_edges, 3]`` int64 integer cell shifts.
        vectors: ``[n_edges, 3]`` ``pos[j] - pos[i] + shifts @ cell``.
        distances: ``[n_edges]`` norms of ``vectors``.
    """

    edge_index: Tensor
    shifts: Tensor
    vectors: Tensor
    distances: Tensor


def edge_vectors(
    positions: Tensor, cell: Tensor, system_idx: Tensor, edge_index: Tensor, shifts: Tensor
) -> Tensor:
    """Edge vectors ``pos[j] - pos[i] + shifts @ cell``, differentiable in positions and cell.

    Args:
        positions: ``[n_atoms, 3]``.
        cell: ``[n_systems, 3, 3]`` (rows are the lattice vectors).
        system_idx: ``[n_atoms]`` system of each atom.
        edge_index: ``[2, n_edges]`` (source j, target i).
        shifts: ``[n_edges, 3]`` integer cell shifts.

    Returns:
        ``[n_edges, 3]``.
    """
    if positions.is_cuda:
        return fixed_order_edge_vectors(positions, cell, system_idx, edge_index, shifts)
    source, target = edge_index[0], edge_index[1]
    shifts = shifts.to(positions.dtype)
    if cell.shape[0] == 1:
        offsets = shifts @ cell[0]
    else:
        offsets = torch.einsum("ek,ekl->el", shifts, cell[system_idx[target]])
    # Gathering the three coordinate columns is several times faster on the CPU than rows.
    differences = [
        column.index_select(0, source) - column.index_select(0, target) for column in positions.T
    ]
    return torch.stack(differences, dim=1) + offsets


def fixed_order_edge_vectors(
    positions: Tensor, cell: Tensor, system_idx: Tensor, edge_index: Tensor, shifts: Tensor
) -> Tensor:
    """:func:`edge_vectors` by :class:`RowIndex` gathers, whose gradients (forces, stress) add
    in a fixed order: what CUDA uses, where the gradient of ``index_select`` is an atomic add
    (different bits on every call)."""
    source, target = edge_index[0], edge_index[1]
    rows = RowIndex(source, len(positions)).gather(positions)
    rows = rows - RowIndex(target, len(positions)).gather(positions)
    edge_cell = RowIndex(system_idx[target], len(cell)).gather(cell)
    return rows + torch.einsum("ek,ekl->el", shifts.to(positions.dtype), edge_cell)


#: Periodic cell vectors whose normalized volume (volume spanned by the unit vectors along
#: them) is below this count as linearly dependent.
DEPENDENCE_TOLERANCE = 1e-9


def checked_skin(skin: object) -> float:
    """``skin`` (Å), the margin a neighbor list is built with beyond the cutoff so that it
    serves moved atoms, as a float; ``ValueError`` unless it is a finite number >= 0."""
    if isinstance(skin, bool) or not (isinstance(skin, Real) and math.isfinite(skin) and skin >= 0):
        raise ValueError(f"skin must be a finite number >= 0 (Å), got {skin!r}")
    return float(skin)


_LEVI_CIVITA = np.zeros((3, 3, 3))
_LEVI_CIVITA[[0, 1, 2], [1, 2, 0], [2, 0, 1]] = 1.0
_LEVI_CIVITA[[0, 2, 1], [2, 1, 0], [1, 0, 2]] = -1.0


def normalized_volume(cell: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """``[n_systems]`` the volume spanned by the unit vectors along the cell vectors ``axes``
    (``[n_systems, 3]`` bool): ``|det|`` for three axes, the area of the parallelogram for
    two, 1 for one or none (0 where one of them has zero length), to ~1e-16 absolute.

    Args:
        cell: ``[n_systems, 3, 3]`` cell vectors (rows).
        axes: ``[n_systems, 3]`` bool, the vectors to include.
    """
    cell = np.asarray(cell, dtype=np.float64).reshape(-1, 3, 3)
    axes = np.asarray(axes, dtype=bool).reshape(-1, 3)
    lengths = np.sqrt(np.einsum("sij,sij->si", cell, cell))
    units = cell / np.where(lengths > 0, lengths, 1.0)[..., None]
    units[~axes] = 0.0
    # the Gram determinant (the open axes' rows orthonormal) is the squared volume: fast, but
    # its rounding (~1e-16) is ~1e-8 on the volume; below 1e-6 from cross products instead
    gram = units @ units.transpose(0, 2, 1)
    system, axis = np.nonzero(~axes)
    gram[system, axis, axis] = 1.0
    volume = np.sqrt(np.clip(np.linalg.det(gram), 0.0, None))
    small = np.flatnonzero(volume < 1e-6)
    if len(small):
        volume[small] = _crossed_volume(units[small], axes[small])
    return volume


def _crossed_volume(units: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """:func:`normalized_volume` of unit rows ``units`` ``[S, 3, 3]`` (zero off ``axes``)
    from cross and dot products (rounding ~1e-16 absolute)."""
    # the three pairs' cross products (a0 x a1, a0 x a2, a1 x a2): with two axes, only
    # their pair has an area
    crosses = np.einsum("ijk,spj,spk->spi", _LEVI_CIVITA, units[:, [0, 0, 1]], units[:, [1, 2, 2]])
    volume = np.abs(np.einsum("si,si->s", crosses[:, 0], units[:, 2]))
    area = np.sqrt(np.einsum("spi,spi->sp", crosses, crosses)).max(axis=1)
    count = axes.sum(axis=1)
    return np.where(count == 3, volume, np.where(count == 2, area, 1.0))


def has_volume(cell: np.ndarray) -> np.ndarray:
    """``[n_systems]`` bool: whether the three vectors of each cell ``[n_systems, 3, 3]`` (or
    one ``[3, 3]``) are independent (a normalized volume of at least
    :data:`DEPENDENCE_TOLERANCE`): where a stress, per volume, is defined."""
    cell = np.asarray(cell, dtype=np.float64).reshape(-1, 3, 3)
    return normalized_volume(cell, np.ones((len(cell), 3), dtype=bool)) >= DEPENDENCE_TOLERANCE


def cell_problem(cell: np.ndarray, pbc: np.ndarray) -> tuple[int, str] | None:
    """The first system whose periodic cell vectors span no lattice, and what is wrong with
    them (a zero-length periodic vector, or periodic vectors that are linearly dependent: zero
    volume); ``None`` when every cell is sound.  The one place this rule is written: the graph
    builder and the checks of ``ase.Atoms`` (:func:`forcecalc.graph.batch.check_atoms`) use it.

    Args:
        cell: ``[n_systems, 3, 3]`` finite cell vectors (rows).
        pbc: ``[n_systems, 3]`` bool, periodic axes.
    """
    pbc = np.asarray(pbc, dtype=bool)
    if not pbc.any():  # no periodic axis, no lattice to check (molecules: every MD step)
        return None
    cell = np.asarray(cell, dtype=np.float64)
    lengths = np.sqrt(np.einsum("sij,sij->si", cell, cell))
    zero = pbc & (lengths < 1e-9)
    if zero.any():
        s = int(np.flatnonzero(zero.any(axis=1))[0])
        return s, (
            f"cell vector(s) {np.flatnonzero(zero[s]).tolist()} have zero length along "
            f"periodic axes (pbc={pbc[s].tolist()}); set a cell or turn pbc off on those axes"
        )
    dependent = normalized_volume(cell, pbc) < DEPENDENCE_TOLERANCE
    if dependent.any():
        s = int(np.flatnonzero(dependent)[0])
        return s, (
            f"the periodic cell vectors {np.flatnonzero(pbc[s]).tolist()} are linearly "
            f"dependent (zero volume): cell={cell[s].tolist()}"
        )
    return None


def _check_inputs(
    positions: Tensor, cell: Tensor, pbc: Tensor, system_idx: Tensor, cutoff: float
) -> tuple[np.ndarray, np.ndarray]:
    """Raise ``ValueError`` naming the problem (and the systems or atoms) in bad inputs;
    the cell (float64) and pbc as numpy arrays.

    Args:
        positions: ``[n_atoms, 3]``.
        cell: ``[n_systems, 3, 3]``.
        pbc: ``[n_systems, 3]`` bool.
        system_idx: ``[n_atoms]``.
        cutoff: radius (Å).
    """
    if not (cutoff > 0 and np.isfinite(cutoff)):
        raise ValueError(f"cutoff must be positive and finite, got {cutoff}")
    if not positions.is_floating_point() or positions.dtype != cell.dtype:
        raise ValueError(
            f"positions ({positions.dtype}) and cell ({cell.dtype}) must have one floating dtype"
        )
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions must have shape [n_atoms, 3], got {list(positions.shape)}")
    if cell.ndim != 3 or cell.shape[1:] != (3, 3):
        raise ValueError(f"cell must have shape [n_systems, 3, 3], got {list(cell.shape)}")
    if pbc.shape != (cell.shape[0], 3):
        raise ValueError(f"pbc must have shape [{cell.shape[0]}, 3], got {list(pbc.shape)}")
    if system_idx.shape != (positions.shape[0],):
        raise ValueError(
            f"system_idx must have shape [{positions.shape[0]}], got {list(system_idx.shape)}"
        )
    if len(system_idx):
        if bool((system_idx[1:] < system_idx[:-1]).any()):
            raise ValueError("atoms must be grouped by system (system_idx non-decreasing)")
        if int(system_idx[0]) < 0 or int(system_idx[-1]) >= cell.shape[0]:
            raise ValueError(f"system_idx must lie in [0, {cell.shape[0]}) (one cell per system)")
    finite = torch.isfinite(positions).all(dim=1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten()[:10].tolist()
        raise ValueError(f"positions of atoms {bad} are NaN or inf")
    if not bool(torch.isfinite(cell).all()):
        bad = torch.nonzero(~torch.isfinite(cell).flatten(1).all(dim=1)).flatten()[:10]
        raise ValueError(f"the cells of systems {bad.tolist()} contain NaN or inf")
    return cell.detach().to("cpu", torch.float64).numpy(), pbc.cpu().numpy()


def _vesin_graph(
    positions: Tensor, cell: Tensor, pbc: Tensor, system_idx: Tensor, cutoff: float
) -> tuple[Tensor, Tensor]:
    """Per-system vesin calls; returns (edge_index, shifts) with global atom indices."""
    from vesin_torch import NeighborList

    calculator = NeighborList(cutoff=float(cutoff), full_list=True)
    n_systems = cell.shape[0]
    counts = torch.bincount(system_idx, minlength=n_systems).tolist()
    starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
    # vesin can be very slow for atoms many cells away along periodic axes (mixed pbc):
    # search on wrapped positions and correct the shifts, S = S_wrapped - wrap_j + wrap_i.
    wrapped, wrap = wrap_positions(positions, cell, pbc, system_idx)
    moved = bool(wrap.any())
    cell = cell.detach().to(torch.float64)
    sources, targets, shifts = [], [], []
    for s in range(n_systems):
        lo, hi = starts[s], starts[s + 1]
        if hi == lo:
            continue
        if _cells_of_box(wrapped[lo:hi], cell[s], pbc[s], cutoff) > VESIN_MAX_CELLS:
            one = torch.zeros(hi - lo, dtype=torch.int64, device=positions.device)
            (j, i), shift = batched_cell_list(
                wrapped[lo:hi], cell[s : s + 1], pbc[s : s + 1], one, cutoff
            )
        else:
            i, j, shift = calculator.compute(wrapped[lo:hi], cell[s], pbc[s], "ijS", copy=True)
        i, j, shift = i.to(torch.int64), j.to(torch.int64), shift.to(torch.int64)
        if lo:
            i += lo
            j += lo
        if moved:
            shift += wrap.index_select(0, i) - wrap.index_select(0, j)
        targets.append(i)
        sources.append(j)
        shifts.append(shift)
    device = positions.device
    if not sources:
        return (
            torch.zeros(2, 0, dtype=torch.int64, device=device),
            torch.zeros(0, 3, dtype=torch.int64, device=device),
        )
    edge_index = torch.stack([_concat(sources), _concat(targets)]).to(device)
    return edge_index, _concat(shifts).to(device)


def _concat(tensors: list[Tensor]) -> Tensor:
    """``torch.cat`` without the copy of a single tensor."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def radius_graph(
    positions: Tensor,
    cell: Tensor,
    pbc: Tensor,
    system_idx: Tensor,
    cutoff: float,
    max_neighbors: int | None = None,
    backend: Backend = "auto",
    name: Callable[[int], str] | None = None,
    warn_contacts: bool = True,
) -> NeighborGraph:
    """All pairs closer than ``cutoff`` in every system of a batch, under each system's pbc.

    Self pairs with zero shift are excluded; an atom's own periodic images are edges.

    Args:
        positions: ``[n_atoms, 3]`` Cartesian positions (Å), atoms grouped by system; atoms
            may lie outside the cell.
        cell: ``[n_systems, 3, 3]`` lattice vectors as rows (zero rows allowed on
            non-periodic axes).
        pbc: ``[n_systems, 3]`` bool periodicity per axis.
        system_idx: ``[n_atoms]`` int64 system of each atom (non-decreasing).
        cutoff: radius (Å).
        max_neighbors: if given, keep each target atom's closest ``max_neighbors`` neighbors
            plus every neighbor tied with the last one kept (see :func:`max_neighbors_mask`).
        backend: ``"vesin"``, ``"torch"`` or ``"auto"`` (vesin on the CPU or for one system;
            the batched torch cell list for several systems on a GPU).
        name: ``name(k)`` names system ``k`` at the start of the messages about its cell,
            overlapping atoms and close contacts (called only for those; default: "system k"
            before a cell's problem and "structure k in the batch" after the atoms, where
            there are several systems).
        warn_contacts: warn of atoms closer than any bond (:data:`CLOSE_CONTACT`); off for
            structures made for a measurement, not given by the user.

    Returns:
        The edges, in the dtype and on the device of ``positions``, in canonical order
        (:func:`canonical_order`): the same order from either backend, and a graph built at a
        larger radius and then cut back lists the remaining edges in the same order, so sums
        over edges (and model outputs) are bit-identical.
    """
    pbc = pbc.to(device=positions.device, dtype=torch.bool)
    if backend not in ("auto", "vesin", "torch"):
        raise ValueError(f"unknown neighbor-list backend {backend!r}")
    cell_host, pbc_host = _check_inputs(positions, cell, pbc, system_idx, cutoff)
    basis, problem = None, cell_problem(cell_host, pbc_host)
    if problem is None:
        basis, problem = search_lattice(cell_host, pbc_host, cutoff)
    if problem is not None:  # a cell that spans no lattice, or one needing too many images
        system, why = problem
        where = name(system) if name else f"system {system}" if len(cell) > 1 else None
        raise ValueError(f"{where}: {why}" if where else why)
    # the search slightly beyond the cutoff (which pairs lie inside is decided below, on the
    # edge vectors the models compute: the searches round differently near the cutoff), in a
    # reduced basis of the same lattice where the cell's own needs too many images (made in
    # float64: with the large integers of a bad basis, float32 would miss the lattice)
    search_positions, search_cell = positions, cell
    margin = CUTOFF_MARGIN if positions.dtype == torch.float64 else 1e3 * CUTOFF_MARGIN
    if basis is not None:
        basis_t = torch.as_tensor(basis, device=cell.device)
        search_positions = positions.detach().to(torch.float64)
        search_cell = basis_t.to(torch.float64) @ cell.detach().to(torch.float64)
    if backend == "auto":
        backend = "torch" if positions.is_cuda and cell.shape[0] > 1 else "vesin"
    search = _vesin_graph if backend == "vesin" else batched_cell_list
    edge_index, shifts = search(search_positions, search_cell, pbc, system_idx, cutoff + margin)
    if basis is not None:  # S @ (basis @ cell) = (S @ basis) @ cell
        edge_basis = basis_t.to(shifts.device)[system_idx[edge_index[1]]]
        shifts = torch.einsum("ek,ekl->el", shifts, edge_basis)
    order = canonical_order(edge_index, shifts, len(positions))
    edge_index, shifts = edge_index[:, order], shifts[order]
    # in float64 (what the models get), whatever the inputs' precision
    vectors = edge_vectors(positions.double(), cell.double(), system_idx, edge_index, shifts)
    squared = (vectors * vectors).sum(dim=1)
    inside = squared < cutoff**2  # the models' own test
    if not bool(inside.all()):  # a subsequence of the canonical order keeps it
        edge_index, shifts, vectors, squared = (
            edge_index[:, inside],
            shifts[inside],
            vectors[inside],
            squared[inside],
        )
    vectors, distances = vectors.to(positions.dtype), squared.sqrt().to(positions.dtype)
    _check_no_overlap(edge_index, shifts, distances, system_idx, name, warn_contacts)
    if max_neighbors is not None:
        keep = max_neighbors_mask(edge_index[1], distances, max_neighbors, len(positions))
        edge_index, shifts = edge_index[:, keep], shifts[keep]
        vectors, distances = vectors[keep], distances[keep]
    return NeighborGraph(edge_index, shifts, vectors, distances)


def _cells_of_box(positions: Tensor, cell: Tensor, pbc: Tensor, cutoff: float) -> float:
    """How many ``cutoff``-sized cells a box holding ``positions`` has: along a periodic
    axis the cell vector's length, along an open one the atoms' extent."""
    lengths = torch.linalg.norm(cell.to(torch.float64), dim=1)
    extent = positions.to(torch.float64).amax(dim=0) - positions.to(torch.float64).amin(dim=0)
    sizes = torch.where(pbc, lengths, extent)
    return float(torch.clamp(sizes / cutoff, min=1.0).prod())


def _check_no_overlap(
    edge_index: Tensor,
    shifts: Tensor,
    distances: Tensor,
    system_idx: Tensor,
    name: Callable[[int], str] | None = None,
    warn_contacts: bool = True,
) -> None:
    """Raise ``ValueError`` naming two atoms (or an atom and a periodic image) closer than
    ``sqrt(MIN_DISTANCE_SQ)`` = 0.01 Å, by their indices in their own structure (and that
    structure's place in a batch of several): no structure has them, and the models would
    drop the pair silently (as OCP does), giving a number for a broken input.  Two atoms
    closer than :data:`CLOSE_CONTACT` get a :class:`~forcecalc.ForcecalcWarning` instead."""
    if len(distances) == 0:
        return
    first = int(distances.argmin())
    closest = float(distances[first])
    if closest >= CLOSE_CONTACT or (closest * closest > MIN_DISTANCE_SQ and not warn_contacts):
        return
    i, j = edge_index[0, first].item(), edge_index[1, first].item()
    system = int(system_idx[i])
    start = int((system_idx < system).sum())
    prefix, where = "", ""
    if name is not None:
        prefix = f"{name(system)}: "
    elif int(system_idx.max()) > 0:
        where = f" of structure {system} in the batch"
    if i == j:
        pair = f"{prefix}atom {i - start}{where} and its periodic image are {closest:.3g} Å apart"
    elif bool(shifts[first].any()):
        pair = f"{prefix}atom {j - start} and a periodic image of atom {i - start}{where} are "
        pair += f"{closest:.3g} Å apart"
    else:
        pair = f"{prefix}atoms {j - start} and {i - start}{where} are {closest:.3g} Å apart"
    if closest * closest <= MIN_DISTANCE_SQ:
        pairs = int((distances * distances <= MIN_DISTANCE_SQ).sum()) // 2  # edges both ways
        others = f" ({pairs} such pairs)" if pairs > 1 else ""
        raise ValueError(
            f"{pair}, closer than 0.01 Å: overlapping atoms{others}; check the positions"
        )
    warn(
        f"{pair}, closer than any bond ({CLOSE_CONTACT} Å): the energy and forces of such a "
        "structure mean nothing; check the positions' unit (Å) and the cell"
    )


def canonical_order(edge_index: Tensor, shifts: Tensor, n_atoms: int) -> Tensor:
    """The permutation that sorts edges by target, then source, then cell shift.

    Args:
        edge_index: ``[2, n_edges]`` (source j, target i).
        shifts: ``[n_edges, 3]`` integer cell shifts.
        n_atoms: number of atoms.

    Returns:
        ``[n_edges]`` int64 permutation.
    """
    if shifts.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=shifts.device)
    low = shifts.min()
    span = shifts.max() - low + 1
    shift_key = ((shifts[:, 0] - low) * span + (shifts[:, 1] - low)) * span + (shifts[:, 2] - low)
    order = torch.argsort(shift_key, stable=True)
    pair_key = edge_index[1] * n_atoms + edge_index[0]
    return order[torch.argsort(pair_key[order], stable=True)]


def max_neighbors_mask(
    target: Tensor,
    distances: Tensor,
    max_neighbors: int,
    n_atoms: int,
    tolerance: float = TIE_TOLERANCE,
) -> Tensor:
    """The max-neighbor rule: which edges to keep so each atom has about ``max_neighbors``.

    OCP keeps exactly ``k = max_neighbors`` edges per target atom, chosen by sorting the
    distances; where the k-th and (k+1)-th are equal (an ideal lattice layer, the periodic
    images of a small cell) its choice depends on the sort order and differs between devices.
    Here an edge is kept if its distance is at most ``d_k + tolerance``, where ``d_k`` is the
    k-th smallest distance of its target atom.  So an atom keeps its k closest neighbors and
    *every* neighbor tied with the k-th: the kept set depends only on the distances (not on
    atom or edge order, device or sort algorithm), and equals OCP's set wherever there is no
    tie at the cut.  ``tolerance`` (1e-5 Å) absorbs rounding in the distances (float32
    positions of an ideal layer differ by ~1e-6 Å); real gaps are far larger.

    Args:
        target: ``[n_edges]`` target (center) atom of each edge.
        distances: ``[n_edges]`` edge lengths.
        max_neighbors: k.
        n_atoms: number of atoms (targets index ``0..n_atoms-1``).
        tolerance: distances within this of ``d_k`` count as tied with it (Å).

    Returns:
        ``[n_edges]`` bool mask.
    """
    if max_neighbors < 1:
        raise ValueError(f"max_neighbors must be >= 1, got {max_neighbors}")
    if len(distances) == 0:
        return torch.ones(0, dtype=torch.bool, device=distances.device)
    d = distances.detach()
    kth = _kth_distances(d, RowIndex(target, n_atoms).inverse, max_neighbors)
    return d <= kth[target] + tolerance


def kept_edges_mask(
    vectors: Tensor, target: Tensor, incoming: Tensor, cutoff: float, max_neighbors: int
) -> tuple[Tensor, Tensor]:
    """The models' graph rule as a mask, with fixed shapes and no host synchronisation (what
    a CUDA graph can capture): edges with ``MIN_DISTANCE_SQ < d**2 < cutoff**2``, then
    :func:`max_neighbors_mask` among them (the same edges as those two steps).

    Args:
        vectors: ``[n_edges, 3]`` candidate edge vectors.
        target: ``[n_edges]`` target atom of each edge.
        incoming: ``[n_atoms, w]`` the edges into each atom, padded with ``n_edges``.
        cutoff: graph radius (Å).
        max_neighbors: k.

    Returns:
        ``(kept, cut)``: ``[n_edges]`` bool, and ``[1]`` bool: whether the max-neighbor rule
        dropped a pair within the cutoff.
    """
    d2 = (vectors * vectors).sum(dim=1)
    # strictly inside, as every neighbor list (ASE's, vesin, ours): a pair exactly at the cutoff
    # is then dropped whether the candidates were built at the cutoff or beyond (a skin)
    valid = (d2 < cutoff**2) & (d2 > MIN_DISTANCE_SQ)
    distances = torch.where(valid, d2, torch.inf).sqrt()
    kth = _kth_distances(distances, incoming, max_neighbors)
    kept = valid & (distances <= kth[target] + TIE_TOLERANCE)
    return kept, (valid & ~kept).any().view(1)


def _kth_distances(distances: Tensor, incoming: Tensor, k: int) -> Tensor:
    """``[n_atoms]``: the k-th smallest distance into each atom (``incoming`` ``[n_atoms, w]``,
    padded with ``len(distances)``), inf for an atom with fewer than k edges."""
    table = pad_rows(distances.unsqueeze(1), torch.inf)[incoming, 0]
    if table.shape[1] < k:
        table = F.pad(table, (0, k - table.shape[1]), value=torch.inf)
    return table.kthvalue(k, dim=1).values


def neighbor_list(
    atoms: Atoms, cutoff: float, name: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Neighbor list of one ``ase.Atoms``: ASE's ``neighbor_list("ijS")`` pairs (pairs at the
    cutoff to rounding decided as :func:`radius_graph` decides them).

    Args:
        atoms: an ``ase.Atoms``.
        cutoff: radius (Å).
        name: how messages about overlapping atoms or close contacts name the structure.

    Returns:
        ``(i, j, S)``: int arrays ``[n_pairs]``, ``[n_pairs]``, ``[n_pairs, 3]`` such that
        ``positions[j] - positions[i] + S @ cell`` is shorter than ``cutoff``.
    """
    positions = torch.as_tensor(np.asarray(atoms.positions, dtype=np.float64))
    cell = torch.as_tensor(np.asarray(atoms.cell.array, dtype=np.float64)).unsqueeze(0)
    pbc = torch.as_tensor(np.asarray(atoms.pbc, dtype=bool)).unsqueeze(0)
    system_idx = torch.zeros(len(atoms), dtype=torch.int64)
    graph = radius_graph(
        positions,
        cell,
        pbc,
        system_idx,
        cutoff,
        backend="vesin",
        name=None if name is None else lambda _: name,
    )
    j, i = graph.edge_index.numpy()
    return i, j, graph.shifts.numpy()
