"""A batched cell-list neighbor search in plain tensor operations (CPU and CUDA).

:func:`batched_cell_list` finds, for every system of a batch at once, exactly the pairs of
``ase.neighborlist.neighbor_list("ijS", atoms, cutoff)``.  The steps, all vectorized over the
atoms of every system:

1. **Frame.**  Each system gets a full-rank ``frame``: its periodic cell vectors, completed by
   orthonormal vectors spanning the complement of the periodic ones on the non-periodic axes
   (so zero or arbitrary cell vectors on non-periodic axes are fine).  Fractional
   coordinates ``f = x @ inv(frame)``: along periodic axes in units of the cell vector, along
   non-periodic axes in Å.
2. **Wrap.**  Along periodic axes the atoms are moved into ``[0, 1)`` by an integer lattice
   translation ``wrap`` (remembered, to correct the shifts at the end).
3. **Reach.**  A pair closer than ``cutoff`` differs by less than ``reach[a] = cutoff * |b_a|``
   in fractional coordinate ``a`` (``b_a`` is column ``a`` of ``inv(frame)``, and
   ``1 / |b_a|`` is the distance between the lattice planes of axis ``a``).
4. **Images.**  Every atom gets the periodic images ``f + S`` (integer ``S``, zero on
   non-periodic axes) whose periodic coordinates lie within ``reach`` of the cell
   ``[0, 1)``: the only images within ``cutoff`` of an atom in the cell.  Small cells
   (``reach > 1``) simply get more images per axis.
5. **Bins.**  The images are binned on a grid over each system's region (periodic axes:
   ``(-reach, 1 + reach)``; non-periodic axes: the atoms' bounding box), with bins at least
   ``reach`` wide, so an atom's neighbors lie in the 27 bins around its own.  A bin's key is
   ``(system, bx, by, bz)`` flattened to one int64; the images are sorted by key.
6. **Pairs.**  Each atom (a target) scans the 27 bins around its own: bin ranges come from
   ``searchsorted`` on the sorted keys, candidate pairs from ``repeat_interleave``, and the
   pairs closer than ``cutoff`` (float64) are kept, except an atom's zero-shift self pair.

The images and candidate pairs are ``O(n_atoms)`` for a fixed density and cutoff; the
candidates are processed in chunks of at most :data:`MAX_CANDIDATES` to bound memory.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import Tensor

#: Candidate pairs generated at once (memory is about 100 bytes per candidate).
MAX_CANDIDATES = 1 << 21

#: Bins per axis and system at most (bounds the int64 bin keys; wider bins stay correct).
MAX_BINS_PER_AXIS = 1 << 15

#: Relative safety margin on the reach, so rounding never drops a pair at the cutoff.
_REACH_MARGIN = 1e-9

#: The 27 bin offsets ``{-1, 0, 1}^3``, ``[27, 3]``.
_OFFSETS = torch.cartesian_prod(*(torch.tensor([-1, 0, 1]),) * 3)


def batched_cell_list(
    positions: Tensor, cell: Tensor, pbc: Tensor, system_idx: Tensor, cutoff: float
) -> tuple[Tensor, Tensor]:
    """All pairs closer than ``cutoff`` in every system of a batch, in one pass.

    Returns exactly the pair set of ``ase.neighborlist.neighbor_list("ijS", atoms, cutoff)``
    for each system (``i`` target, ``j`` source, ``S`` shift), with global atom indices:
    ``positions[j] - positions[i] + shifts @ cell[system]`` is shorter than ``cutoff``.
    An atom's periodic images are edges; its zero-shift self pair is not.  Edges are grouped
    by target in atom order.  The search runs in float64 whatever the input dtype.

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

    inverse = torch.linalg.inv(_frame(cell, pbc))
    reach = cutoff * torch.linalg.norm(inverse, dim=1) * (1 + _REACH_MARGIN)
    periodic = pbc[system_idx]
    frac = torch.einsum("ni,nij->nj", pos, inverse[system_idx])
    wrap = torch.where(periodic, torch.floor(frac), 0.0)
    frac = frac - wrap
    pos = pos - torch.einsum("na,nab->nb", wrap, cell[system_idx])

    image_atom, image_shift = _images(frac, reach[system_idx], periodic)
    image_system = system_idx[image_atom]
    image_pos = pos[image_atom] + torch.einsum(
        "na,nab->nb", image_shift.to(torch.float64), cell[image_system]
    )
    grid = _Grid(frac, system_idx, pbc, reach)
    image_key = grid.keys(frac[image_atom] + image_shift, image_system)
    image_key, order = torch.sort(image_key, stable=True)
    image_atom, image_shift, image_pos = image_atom[order], image_shift[order], image_pos[order]
    image_self = (image_shift == 0).all(dim=1)

    start, count = grid.neighbor_ranges(frac, system_idx, image_key)
    sources, targets, shifts = [], [], []
    for lo, hi in _chunks(count.sum(dim=1)):
        image, target = _candidates(start[lo:hi], count[lo:hi], lo)
        diff = image_pos[image] - pos[target]
        atom = image_atom[image]
        keep = ((diff * diff).sum(dim=1) < cutoff * cutoff) & ~(
            (atom == target) & image_self[image]
        )
        image, target, atom = image[keep], target[keep], atom[keep]
        sources.append(atom)
        targets.append(target)
        shifts.append(image_shift[image])
    source, target, shift = torch.cat(sources), torch.cat(targets), torch.cat(shifts)
    wrap = wrap.to(torch.int64)
    return torch.stack([source, target]), shift - wrap[source] + wrap[target]


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

    Args:
        frac: ``[n_atoms, 3]`` wrapped fractional coordinates.
        system_idx: ``[n_atoms]`` system of each atom.
        pbc: ``[n_systems, 3]`` bool.
        reach: ``[n_systems, 3]`` minimal bin width per axis (fractional units).
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
        #: ``[n_systems, 3]`` int64 bins per axis.
        self.n_bins = torch.floor(extent / reach).clamp(1, MAX_BINS_PER_AXIS).to(torch.int64)
        #: ``[n_systems, 3]`` bins per fractional unit (0 where the extent is 0).
        self.scale = torch.where(extent > 0, self.n_bins / extent, 0.0)
        per_system = self.n_bins.prod(dim=1)
        #: ``[n_systems]`` key of each system's first bin.
        self.offset = torch.cumsum(per_system, 0) - per_system

    def bins(self, frac: Tensor, system: Tensor) -> Tensor:
        """``[n, 3]`` int64 bin of points ``frac`` ``[n, 3]`` of systems ``system`` ``[n]``."""
        raw = torch.floor((frac - self.origin[system]) * self.scale[system]).to(torch.int64)
        return torch.minimum(raw.clamp(min=0), self.n_bins[system] - 1)

    def key(self, bins: Tensor, system: Tensor) -> Tensor:
        """``[...]`` int64 keys of bins ``[..., 3]`` of systems ``system`` (broadcast)."""
        n_bins = self.n_bins[system]
        linear = (bins[..., 0] * n_bins[..., 1] + bins[..., 1]) * n_bins[..., 2] + bins[..., 2]
        return self.offset[system] + linear

    def keys(self, frac: Tensor, system: Tensor) -> Tensor:
        """``[n]`` int64 keys of the bins holding points ``frac`` ``[n, 3]``."""
        return self.key(self.bins(frac, system), system)

    def neighbor_ranges(
        self, frac: Tensor, system: Tensor, sorted_keys: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Where the images of the 27 bins around each atom lie in the sorted images.

        Args:
            frac: ``[n_atoms, 3]`` wrapped fractional coordinates of the atoms.
            system: ``[n_atoms]`` system of each atom.
            sorted_keys: ``[n_images]`` sorted bin keys of the images.

        Returns:
            ``(start, count)``: ``[n_atoms, 27]`` int64 each; images
            ``start[a, k] .. start[a, k] + count[a, k] - 1`` are in the ``k``-th bin around
            atom ``a`` (count 0 for bins outside the grid).
        """
        around = self.bins(frac, system).unsqueeze(1) + _OFFSETS.to(frac.device)
        n_bins = self.n_bins[system].unsqueeze(1)
        inside = ((around >= 0) & (around < n_bins)).all(dim=2)
        keys = self.key(around, system.unsqueeze(1))
        start = torch.searchsorted(sorted_keys, keys)
        end = torch.searchsorted(sorted_keys, keys, right=True)
        return start, torch.where(inside, end - start, 0)


def _chunks(per_target: Tensor) -> list[tuple[int, int]]:
    """Split targets into ranges of at most :data:`MAX_CANDIDATES` candidates.

    Args:
        per_target: ``[n_targets]`` int64 candidates of each target.

    Returns:
        ``(lo, hi)`` target ranges covering ``0 .. n_targets`` (a single target with more
        candidates than the limit gets a range of its own).
    """
    total = torch.cumsum(per_target, 0)
    n_chunks = int(total[-1]) // MAX_CANDIDATES + 1
    limits = torch.arange(1, n_chunks, device=total.device) * MAX_CANDIDATES
    cuts = torch.searchsorted(total, limits, right=True).tolist()
    bounds = sorted({0, *cuts, len(per_target)})
    return list(pairwise(bounds))


def _candidates(start: Tensor, count: Tensor, first_target: int) -> tuple[Tensor, Tensor]:
    """Every (image, target) pair of a chunk of targets and their 27 surrounding bins.

    Args:
        start: ``[n_targets, 27]`` first image of each bin.
        count: ``[n_targets, 27]`` images in each bin.
        first_target: atom index of the chunk's first target.

    Returns:
        ``(image, target)``: ``[n_candidates]`` int64 each.
    """
    count = count.reshape(-1)
    total = int(count.sum())
    # Image = start of its bin + its rank inside the bin = arange - (first candidate - start).
    rebase = start.reshape(-1) - (torch.cumsum(count, 0) - count)
    image = torch.repeat_interleave(rebase, count, output_size=total)
    image += torch.arange(total, device=image.device)
    targets = torch.arange(len(start), device=image.device) + first_target
    target = torch.repeat_interleave(
        targets, count.view(len(start), 27).sum(dim=1), output_size=total
    )
    return image, target
