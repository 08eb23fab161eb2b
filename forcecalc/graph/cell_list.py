"""A batched cell-list neighbor search in plain tensor operations (CPU and CUDA).

:func:`batched_cell_list` finds, for every system of a batch at once, the pairs of
``ase.neighborlist.neighbor_list("ijS", atoms, cutoff)`` (up to pairs within rounding of the
cutoff, which :func:`forcecalc.graph.neighbors.radius_graph` decides on the edge vectors).
The steps, all vectorized over the atoms (and systems) of a batch:

1. **Reduce.**  The periodic cell vectors are replaced by a pairwise-reduced basis of the same
   lattice (:func:`_reduce`), so strongly skewed cells get compact bins; the shifts are
   converted back to the given cell at the end.
2. **Frame.**  Each system gets a full-rank ``frame``: its periodic (reduced) vectors,
   completed on the non-periodic axes by orthonormal vectors orthogonal to them (so zero or
   arbitrary cell vectors on non-periodic axes are fine).  Fractional coordinates
   ``f = x @ inv(frame)`` are in units of the cell vector along periodic axes, in Å along
   non-periodic ones.
3. **Wrap.**  Along periodic axes the atoms are moved into ``[0, 1)`` by an integer lattice
   translation ``wrap`` (remembered, to correct the shifts at the end).
4. **Reach.**  A pair closer than ``cutoff`` differs by less than ``reach[a] = cutoff * |b_a|``
   in fractional coordinate ``a`` (``b_a`` is column ``a`` of ``inv(frame)``; ``1 / |b_a|`` is
   the distance between the lattice planes of axis ``a``).
5. **Images.**  Every atom gets the periodic images ``f + S`` (integer ``S``, zero on
   non-periodic axes) whose periodic coordinates lie within ``reach`` of the cell
   ``[0, 1)``: the only images within ``cutoff`` of an atom of the cell.  Cells smaller than
   the cutoff (``reach > 1``) simply get more images per axis.
6. **Bins.**  The images are binned on a grid over each system's region (periodic axes:
   ``(-reach, 1 + reach)``; non-periodic axes: the atoms' bounding box), with bins at least
   ``reach / DIVISIONS`` wide, so an atom's neighbors lie within ``DIVISIONS`` bins of its
   own.  A bin's key is ``(system, bx, by, bz)`` flattened to one int64; the images are
   sorted by key.
7. **Pairs.**  The targets are the atoms' zero-shift images.  Around each, the bins within
   ``DIVISIONS`` form ``(2 DIVISIONS + 1)^2`` runs of consecutive keys, each one range of
   sorted images (from a table of bin starts, or binary searches for sparse grids).  The
   candidate pairs come from ``repeat_interleave`` over these ranges; those closer than
   ``cutoff`` (float64) are kept, except each atom's zero-shift self pair.

The images and candidates are ``O(n_atoms)`` for a fixed density and cutoff (about 3.7
candidates per pair in dense bulk); the sort makes the whole ``O(n log n)``.  Candidates are
processed in chunks of about :data:`MAX_CANDIDATES` (small enough to stay in the CPU cache;
:data:`MAX_CANDIDATES_GPU` on a GPU) to bound memory.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import Tensor

#: Candidate pairs generated at once on the CPU (about 100 bytes each; cache-sized chunks
#: are fastest there) and on a GPU (larger chunks mean fewer kernel launches).
MAX_CANDIDATES = 1 << 18
MAX_CANDIDATES_GPU = 1 << 22

#: Bins per axis and system at most (bounds the int64 bin keys; wider bins stay correct).
MAX_BINS_PER_AXIS = 1 << 15

#: Relative safety margin on the reach, so rounding never drops a pair at the cutoff.
_REACH_MARGIN = 1e-9

#: The ordered pairs ``(i, j)`` of axes of one reduction sweep (``j`` reduced by ``i``).
_ORDERED_PAIRS = [(i, j) for i in range(3) for j in range(3) if i != j]

#: Bins per reach: an atom's neighbors lie within this many bins of its own along each axis.
DIVISIONS = 2

#: ``[2, n_runs]`` bin offsets ``(dx, dy)`` of the runs of bins scanned around an atom.
_RUNS = torch.cartesian_prod(*(torch.arange(-DIVISIONS, DIVISIONS + 1),) * 2).T.contiguous()

#: Bin starts come from a dense table over all bins while there are at most this many bins
#: per image (plus :data:`DENSE_TABLE_MIN`), else from binary searches (sparse systems).
DENSE_TABLE_FACTOR = 8
DENSE_TABLE_MIN = 1 << 16


def batched_cell_list(
    positions: Tensor, cell: Tensor, pbc: Tensor, system_idx: Tensor, cutoff: float
) -> tuple[Tensor, Tensor]:
    """All pairs closer than ``cutoff`` in every system of a batch, in one pass.

    Returns the pair set of ``ase.neighborlist.neighbor_list("ijS", atoms, cutoff)``
    for each system (``i`` target, ``j`` source, ``S`` shift), with global atom indices:
    ``positions[j] - positions[i] + shifts @ cell[system]`` is shorter than ``cutoff``.
    An atom's periodic images are edges; its zero-shift self pair is not.  Edges are grouped
    by target (in the order of the bins, deterministic).  The search runs in float64 whatever
    the input dtype.  Inputs are not checked (:func:`~forcecalc.graph.radius_graph` does).

    Args:
        positions: ``[n_atoms, 3]`` Cartesian positions (Å); atoms may lie outside the cell.
        cell: ``[n_systems, 3, 3]`` lattice vectors as rows; the periodic ones linearly
            independent (rows on non-periodic axes are ignored, zero allowed).
        pbc: ``[n_systems, 3]`` bool periodicity per axis.
        system_idx: ``[n_atoms]`` int64 system of each atom.
        cutoff: radius (Å), positive.

    Returns:
        ``(edge_index, shifts)``: ``[2, n_edges]`` int64 (source j, target i) and
        ``[n_edges, 3]`` int64 integer cell shifts, on the device of ``positions``.
    """
    device = positions.device
    pos = positions.detach().to(torch.float64)
    cell = cell.detach().to(device=device, dtype=torch.float64)
    pbc = pbc.to(device=device, dtype=torch.bool)
    system_idx = system_idx.to(device=device, dtype=torch.int64)
    if len(pos) == 0:
        return (
            torch.zeros(2, 0, dtype=torch.int64, device=device),
            torch.zeros(0, 3, dtype=torch.int64, device=device),
        )

    lattice, basis = _reduce(cell, pbc)
    inverse = torch.linalg.inv(_frame(lattice, pbc))
    reach = cutoff * torch.linalg.norm(inverse, dim=1) * (1 + _REACH_MARGIN)
    periodic = pbc[system_idx]
    pos, frac, wrap = _wrap(pos, lattice, inverse, pbc, system_idx)

    image_atom, image_shift = _images(frac, reach[system_idx], periodic)
    image_system = system_idx[image_atom]
    grid = _Grid(frac, system_idx, pbc, reach)
    image_bins = grid.bins(frac[image_atom] + image_shift, image_system)
    image_key, order = torch.sort(grid.key(image_bins, image_system), stable=True)
    image_atom, image_shift, image_bins = image_atom[order], image_shift[order], image_bins[order]
    image_system = image_system[order]
    image_pos = pos[image_atom] + torch.einsum(
        "na,nab->nb", image_shift.to(torch.float64), lattice[image_system]
    )
    # Columns ([3, n_images]) make the per-candidate gathers fast.  An edge's shift is
    # offset[source image] - offset[target image] (a target image has S = 0), with the
    # offsets converted from the reduced lattice to the cell: S @ lattice = (S @ basis) @ cell.
    image_xyz = image_pos.T.contiguous()
    offset = image_shift - wrap[image_atom]
    image_offset = (offset.unsqueeze(2) * basis[image_system]).sum(dim=1).T.contiguous()
    # The targets are the atoms themselves: their zero-shift images, in bin order.
    target_image = torch.nonzero((image_shift == 0).all(dim=1)).flatten()
    start, count = grid.neighbor_ranges(
        image_bins[target_image], image_system[target_image], image_key
    )
    columns: list[list[Tensor]] = [[] for _ in range(5)]
    chunk = MAX_CANDIDATES if device.type == "cpu" else MAX_CANDIDATES_GPU
    for lo, hi in _chunks(count.sum(dim=1), chunk):
        image, target = _candidates(start[lo:hi], count[lo:hi], target_image[lo:hi])
        squared = _squared_distances(image_xyz, image, target)
        keep = torch.nonzero((squared < cutoff * cutoff) & (image != target)).flatten()
        image, target = image.index_select(0, keep), target.index_select(0, keep)
        columns[0].append(image_atom.index_select(0, image))
        columns[1].append(image_atom.index_select(0, target))
        for axis, offset in enumerate(image_offset, start=2):
            columns[axis].append(offset.index_select(0, image) - offset.index_select(0, target))
    source, target, *shift = (torch.cat(column) for column in columns)
    return torch.stack([source, target]), torch.stack(shift, dim=1)


def _squared_distances(xyz: Tensor, image: Tensor, target: Tensor) -> Tensor:
    """``[n]`` squared distances between images ``image`` and ``target`` (``[n]`` each).

    Args:
        xyz: ``[3, n_images]`` float64 image positions as contiguous columns.
    """
    result = torch.zeros(len(image), dtype=xyz.dtype, device=xyz.device)
    for column in xyz:
        delta = column.index_select(0, image) - column.index_select(0, target)
        result.addcmul_(delta, delta)
    return result


def wrap_positions(
    positions: Tensor, cell: Tensor, pbc: Tensor, system_idx: Tensor
) -> tuple[Tensor, Tensor]:
    """Atoms moved into their cell along periodic axes by whole cell vectors.

    Args:
        positions: ``[n_atoms, 3]`` Cartesian positions.
        cell: ``[n_systems, 3, 3]`` cell vectors as rows (periodic ones independent).
        pbc: ``[n_systems, 3]`` bool.
        system_idx: ``[n_atoms]`` system of each atom.

    Returns:
        ``(wrapped, wrap)``: ``[n_atoms, 3]`` float64 positions with fractional coordinates in
        ``[0, 1)`` along periodic axes (up to rounding), and ``[n_atoms, 3]`` int64 ``wrap``
        (zero on non-periodic axes) with ``wrapped = positions - wrap @ cell[system]``.
    """
    pos = positions.detach().to(torch.float64)
    cell = cell.detach().to(device=pos.device, dtype=torch.float64)
    pbc = pbc.to(device=pos.device, dtype=torch.bool)
    inverse = torch.linalg.inv(_frame(cell, pbc))
    wrapped, _, wrap = _wrap(pos, cell, inverse, pbc, system_idx)
    return wrapped, wrap


def _wrap(
    pos: Tensor, cell: Tensor, inverse: Tensor, pbc: Tensor, system_idx: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Wrap float64 positions ``[n, 3]`` along periodic axes (``inverse``: of the frames).

    Returns:
        ``(wrapped, frac, wrap)``: ``[n, 3]`` wrapped positions, their fractional coordinates
        in the frame and the int64 ``wrap`` with ``wrapped = pos - wrap @ cell[system]``.
    """
    frac = torch.einsum("ni,nij->nj", pos, inverse[system_idx])
    wrap = torch.where(pbc[system_idx], torch.floor(frac), 0.0)
    wrapped = pos - torch.einsum("na,nab->nb", wrap, cell[system_idx])
    return wrapped, frac - wrap, wrap.to(torch.int64)


def _reduce(cell: Tensor, pbc: Tensor, max_sweeps: int = 100) -> tuple[Tensor, Tensor]:
    """Pairwise (Gauss) reduction of the periodic cell vectors of every system.

    Repeatedly subtracts from each periodic vector the integer multiple of another periodic
    vector that shortens it most, until no vector gets shorter.  The reduced lattice is the
    same lattice (an integer basis change of determinant ±1) with near-orthogonal vectors,
    so the fractional bins of a strongly skewed cell stay compact.  Each step strictly
    shortens a vector, so the loop ends; ``max_sweeps`` only bounds pathological cells (any
    basis of the lattice gives the same pairs).

    Args:
        cell: ``[n_systems, 3, 3]`` float64 cell vectors as rows.
        pbc: ``[n_systems, 3]`` bool.

    Returns:
        ``(lattice, basis)``: ``[n_systems, 3, 3]`` float64 reduced vectors and the int64
        ``basis`` with ``lattice = basis @ cell`` (rows of non-periodic axes unchanged).
    """
    basis = torch.eye(3, dtype=torch.int64, device=cell.device).repeat(len(cell), 1, 1)
    lattice = cell.clone()
    for _ in range(max_sweeps):
        changed = torch.zeros(len(cell), dtype=torch.bool, device=cell.device)
        for i, j in _ORDERED_PAIRS:
            a, b = lattice[:, i], lattice[:, j]
            ratio = (a * b).sum(dim=1) / (a * a).sum(dim=1).clamp(min=1e-300)
            multiple = torch.where(pbc[:, i] & pbc[:, j], torch.round(ratio), 0.0)
            basis[:, j] -= multiple.to(torch.int64).unsqueeze(1) * basis[:, i]
            lattice[:, j] = (basis[:, j].unsqueeze(2).to(cell.dtype) * cell).sum(dim=1)
            changed |= multiple != 0
        if not bool(changed.any()):
            break
    return lattice, basis


def _frame(cell: Tensor, pbc: Tensor) -> Tensor:
    """``[n_systems, 3, 3]`` invertible frames: periodic cell rows, orthonormal completion.

    The rows of non-periodic axes are replaced by orthonormal vectors orthogonal to the
    periodic rows (eigenvectors of ``P^T P`` with eigenvalue 0, ``P`` the periodic rows).
    """
    periodic_rows = cell * pbc.unsqueeze(-1)
    _, vectors = torch.linalg.eigh(periodic_rows.mT @ periodic_rows)
    # Eigenvalues ascend, so the first (3 - n_periodic) eigenvectors span the complement;
    # the k-th non-periodic axis takes the k-th of them.
    rank = (torch.cumsum((~pbc).to(torch.int64), dim=1) - 1).clamp(min=0)
    completion = torch.gather(vectors.mT, 1, rank.unsqueeze(-1).expand(-1, -1, 3))
    return torch.where(pbc.unsqueeze(-1), cell, completion)


def _images(frac: Tensor, reach: Tensor, periodic: Tensor) -> tuple[Tensor, Tensor]:
    """The periodic images of each atom within ``reach`` of the cell.

    Args:
        frac: ``[n_atoms, 3]`` wrapped fractional coordinates (``[0, 1)`` on periodic axes).
        reach: ``[n_atoms, 3]`` reach of each atom's system.
        periodic: ``[n_atoms, 3]`` bool pbc of each atom's system.

    Returns:
        ``(atom, shift)``: ``[n_images]`` int64 atom of each image and ``[n_images, 3]``
        int64 shift ``S`` (``frac[atom] + S`` lies in ``(-reach, 1 + reach)`` on periodic
        axes; ``S = 0`` on non-periodic axes), grouped by atom, each atom's ``S = 0`` included.
    """
    low = torch.where(periodic, torch.floor(-reach - frac) + 1, 0.0).clamp(max=0)
    high = torch.where(periodic, torch.ceil(1 + reach - frac) - 1, 0.0).clamp(min=0)
    low = low.to(torch.int64)
    counts = high.to(torch.int64) - low + 1
    per_atom = counts.prod(dim=1)
    total = int(per_atom.sum())
    atom = torch.repeat_interleave(
        torch.arange(len(frac), device=frac.device), per_atom, output_size=total
    )
    local = torch.arange(total, device=frac.device) - (torch.cumsum(per_atom, 0) - per_atom)[atom]
    count_y, count_z = counts[atom, 1], counts[atom, 2]
    shift = torch.stack(
        [local // (count_y * count_z), (local // count_z) % count_y, local % count_z], dim=1
    )
    return atom, shift + low[atom]


class _Grid:
    """The bins of every system, keyed by one int64 ``offset[system] + linear bin index``.

    Bins are at least ``reach / DIVISIONS`` wide, so an atom's neighbors lie within
    ``DIVISIONS`` bins of its own along each axis.

    Args:
        frac: ``[n_atoms, 3]`` wrapped fractional coordinates.
        system_idx: ``[n_atoms]`` system of each atom.
        pbc: ``[n_systems, 3]`` bool.
        reach: ``[n_systems, 3]`` reach per axis (fractional units).
    """

    def __init__(self, frac: Tensor, system_idx: Tensor, pbc: Tensor, reach: Tensor) -> None:
        n_systems = len(pbc)
        index = system_idx.unsqueeze(1).expand(-1, 3)
        inf = torch.full((n_systems, 3), torch.inf, dtype=frac.dtype, device=frac.device)
        low = inf.scatter_reduce(0, index, frac, "amin")
        high = (-inf).scatter_reduce(0, index, frac, "amax")
        empty = ~torch.isfinite(low)
        low, high = low.masked_fill(empty, 0.0), high.masked_fill(empty, 0.0)
        #: ``[n_systems, 3]`` lower corner of the binned region.
        self.origin = torch.where(pbc, -reach, low)
        extent = torch.where(pbc, 1 + 2 * reach, high - low)
        n_bins = torch.floor(extent * DIVISIONS / reach).clamp(1, MAX_BINS_PER_AXIS)
        #: ``[n_systems, 3]`` int64 bins per axis.
        self.n_bins = n_bins.to(torch.int64)
        #: ``[n_systems, 3]`` bins per fractional unit (0 where the extent is 0).
        self.scale = torch.where(extent > 0, n_bins / extent, 0.0)
        per_system = self.n_bins.prod(dim=1)
        #: ``[n_systems]`` key of each system's first bin.
        self.offset = torch.cumsum(per_system, 0) - per_system
        #: Bins of all systems together.
        self.n_total = int(per_system.sum())

    def bins(self, frac: Tensor, system: Tensor) -> Tensor:
        """``[n, 3]`` int64 bins of points ``frac`` ``[n, 3]`` of systems ``system`` ``[n]``."""
        raw = torch.floor((frac - self.origin[system]) * self.scale[system]).to(torch.int64)
        return torch.minimum(raw.clamp(min=0), self.n_bins[system] - 1)

    def key(self, bins: Tensor, system: Tensor) -> Tensor:
        """``[n]`` int64 keys of bins ``[n, 3]`` of systems ``system`` ``[n]``."""
        _, n_y, n_z = self.n_bins[system].unbind(1)
        x, y, z = bins.unbind(1)
        return self.offset[system] + (x * n_y + y) * n_z + z

    def neighbor_ranges(
        self, bins: Tensor, system: Tensor, sorted_keys: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Where the images near each target lie in the key-sorted images.

        The bins within ``DIVISIONS`` of a target's bin form ``(2 DIVISIONS + 1)^2`` runs of
        consecutive keys (the last axis varies fastest), so each run is one range of images.

        Args:
            bins: ``[n_targets, 3]`` bin of each target.
            system: ``[n_targets]`` system of each target.
            sorted_keys: ``[n_images]`` sorted bin keys of the images.

        Returns:
            ``(start, count)``: ``[n_targets, n_runs]`` int64 each; the images
            ``start[t, r] .. start[t, r] + count[t, r] - 1`` form run ``r`` of target ``t``
            (count 0 for runs outside the grid).
        """
        n_x, n_y, n_z = self.n_bins[system].unsqueeze(2).unbind(1)
        b_x, b_y, b_z = bins.unsqueeze(2).unbind(1)
        x, y = b_x + _RUNS[0].to(bins.device), b_y + _RUNS[1].to(bins.device)
        inside = (x >= 0) & (x < n_x) & (y >= 0) & (y < n_y)
        row = self.offset[system].unsqueeze(1) + (x * n_y + y) * n_z
        first = row + (b_z - DIVISIONS).clamp(min=0)
        last = row + torch.minimum(b_z + DIVISIONS, n_z - 1)
        if self.n_total <= DENSE_TABLE_FACTOR * len(sorted_keys) + DENSE_TABLE_MIN:
            # Start of every bin, then two gathers instead of two binary searches.
            table = torch.searchsorted(
                sorted_keys, torch.arange(self.n_total + 1, device=bins.device)
            )
            start = table[first.clamp(0, self.n_total)]
            end = table[(last + 1).clamp(0, self.n_total)]
        else:
            start = torch.searchsorted(sorted_keys, first)
            end = torch.searchsorted(sorted_keys, last, right=True)
        return start, torch.where(inside, end - start, 0)


def _chunks(per_target: Tensor, size: int) -> list[tuple[int, int]]:
    """Split targets into ranges of about ``size`` candidates.

    Args:
        per_target: ``[n_targets]`` int64 candidates of each target.
        size: candidates per range.

    Returns:
        ``(lo, hi)`` target ranges covering ``0 .. n_targets``; a range holds at most
        ``size`` plus the candidates of its first target.
    """
    total = torch.cumsum(per_target, 0)
    n_chunks = int(total[-1]) // size + 1
    limits = torch.arange(1, n_chunks, device=total.device) * size
    cuts = torch.searchsorted(total, limits, right=True).tolist()
    return list(pairwise(sorted({0, *cuts, len(per_target)})))


def _candidates(start: Tensor, count: Tensor, target_image: Tensor) -> tuple[Tensor, Tensor]:
    """Every (image, target image) pair of a chunk of targets and their runs.

    Args:
        start: ``[n_targets, n_runs]`` first image of each run.
        count: ``[n_targets, n_runs]`` images in each run.
        target_image: ``[n_targets]`` the target's own (zero-shift) image.

    Returns:
        ``(image, target)``: ``[n_candidates]`` int64 image indices each.
    """
    per_target = count.sum(dim=1)
    count = count.flatten()
    total = int(per_target.sum())
    # Image = start of its run + its rank in the run = arange - (first candidate - start).
    rebase = start.flatten() - (torch.cumsum(count, 0) - count)
    image = torch.repeat_interleave(rebase, count, output_size=total)
    image += torch.arange(total, device=image.device)
    target = torch.repeat_interleave(target_image, per_target, output_size=total)
    return image, target
