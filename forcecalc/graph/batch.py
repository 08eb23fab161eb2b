"""The batched graph container: many structures as flat tensors plus a per-atom system index."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from forcecalc.graph.neighbors import Backend, cell_problem, edge_vectors, radius_graph

if TYPE_CHECKING:
    from ase import Atoms

#: Largest atomic number forcecalc accepts anywhere (a model may accept fewer: OCP's SpinConv
#: embeddings have rows 0..89, ForceNet's tables 0..100).
MAX_ATOMIC_NUMBER = 118


@dataclass(frozen=True)
class Batch:
    """Structures of a batch, flattened; atoms of system ``s`` are contiguous.

    Attributes:
        positions: ``[n_atoms, 3]`` Cartesian positions (Å).
        numbers: ``[n_atoms]`` int64 atomic numbers.
        cell: ``[n_systems, 3, 3]`` lattice vectors as rows (Å).
        pbc: ``[n_systems, 3]`` bool periodicity per axis.
        system_idx: ``[n_atoms]`` int64 system of each atom (non-decreasing).
        natoms: ``[n_systems]`` int64 atoms per system.
        tags: ``[n_atoms]`` int64 OC20 tags (0 subsurface, 1 surface, 2 adsorbate).
        fixed: ``[n_atoms]`` bool, True for atoms held by ``ase.constraints.FixAtoms``.
        edge_index: ``[2, n_edges]`` int64 (source j, target i); see
            :mod:`forcecalc.graph.neighbors` for the convention.
        shifts: ``[n_edges, 3]`` int64 integer cell shifts of the edges.
    """

    positions: Tensor
    numbers: Tensor
    cell: Tensor
    pbc: Tensor
    system_idx: Tensor
    natoms: Tensor
    tags: Tensor
    fixed: Tensor
    edge_index: Tensor
    shifts: Tensor

    @property
    def n_atoms(self) -> int:
        return self.positions.shape[0]

    @property
    def n_systems(self) -> int:
        return self.cell.shape[0]

    @property
    def n_edges(self) -> int:
        return self.edge_index.shape[1]

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Batch:
        """A copy on ``device`` with float tensors (positions, cell) cast to ``dtype``."""
        moved = {}
        for f in fields(self):
            value: Tensor = getattr(self, f.name)
            if value.is_floating_point():
                value = value.to(device=device, dtype=dtype)
            else:
                value = value.to(device=device)
            moved[f.name] = value
        return Batch(**moved)

    def edge_vectors(self, positions: Tensor | None = None, cell: Tensor | None = None) -> Tensor:
        """``[n_edges, 3]`` edge vectors, differentiable in ``positions`` and ``cell``.

        ``positions`` / ``cell`` default to the batch's own (pass tensors that require grad
        to differentiate through them).
        """
        return edge_vectors(
            self.positions if positions is None else positions,
            self.cell if cell is None else cell,
            self.system_idx,
            self.edge_index,
            self.shifts,
        )

    def with_edges(self, edge_index: Tensor, shifts: Tensor) -> Batch:
        """A copy with other edges (same atoms): ``edge_index`` ``[2, n_edges]`` int64
        (source j, target i), ``shifts`` ``[n_edges, 3]`` integer cell shifts."""
        return replace(self, edge_index=edge_index, shifts=shifts)

    def with_positions(self, positions: Tensor, cell: Tensor | None = None) -> Batch:
        """A copy with new ``positions`` ``[n_atoms, 3]`` (and ``cell`` ``[n_systems, 3, 3]``),
        keeping the edges."""
        return replace(self, positions=positions, cell=self.cell if cell is None else cell)

    @classmethod
    def from_atoms(
        cls,
        atoms: Sequence | object,
        cutoff: float,
        max_neighbors: int | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
        backend: Backend = "auto",
    ) -> Batch:
        """Build a batch (with its neighbor graph) from one ``ase.Atoms`` or a sequence of them.

        The neighbor search always runs on float64 positions; ``dtype`` is the dtype of the
        returned positions and cell.

        Raises:
            ValueError: empty structure, NaN/inf positions, unknown atomic numbers, or a
                periodic axis with a zero-length cell vector (the message names the system
                and the atoms).
        """
        atoms_list = [atoms] if hasattr(atoms, "positions") else list(atoms)
        if not atoms_list:
            raise ValueError("no structures given")
        batch = cls.from_arrays(*atoms_to_arrays(atoms_list), device=device)
        graph = radius_graph(
            batch.positions,
            batch.cell,
            batch.pbc,
            batch.system_idx,
            cutoff,
            max_neighbors=max_neighbors,
            backend=backend,
        )
        return batch.with_edges(graph.edge_index, graph.shifts).to(dtype=dtype)

    @classmethod
    def from_arrays(
        cls,
        positions: np.ndarray,
        numbers: np.ndarray,
        cell: np.ndarray,
        pbc: np.ndarray,
        natoms: np.ndarray,
        tags: np.ndarray,
        fixed: np.ndarray,
        device: torch.device | str = "cpu",
    ) -> Batch:
        """A batch without edges from flat numpy arrays (float64 positions and cells)."""
        natoms_t = torch.as_tensor(np.asarray(natoms, dtype=np.int64), device=device)
        system_idx = torch.repeat_interleave(torch.arange(len(natoms_t), device=device), natoms_t)
        return cls(
            positions=torch.as_tensor(np.asarray(positions, dtype=np.float64), device=device),
            numbers=torch.as_tensor(np.asarray(numbers, dtype=np.int64), device=device),
            cell=torch.as_tensor(np.asarray(cell, dtype=np.float64), device=device).reshape(
                -1, 3, 3
            ),
            pbc=torch.as_tensor(np.asarray(pbc, dtype=bool), device=device).reshape(-1, 3),
            system_idx=system_idx,
            natoms=natoms_t,
            tags=torch.as_tensor(np.asarray(tags, dtype=np.int64), device=device),
            fixed=torch.as_tensor(np.asarray(fixed, dtype=bool), device=device),
            edge_index=torch.zeros(2, 0, dtype=torch.int64, device=device),
            shifts=torch.zeros(0, 3, dtype=torch.int64, device=device),
        )


def fixed_mask(atoms: Atoms) -> np.ndarray:
    """``[n_atoms]`` bool: atoms held in place by an ``ase.constraints.FixAtoms``."""
    from ase.constraints import FixAtoms

    mask = np.zeros(len(atoms), dtype=bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            mask[constraint.get_indices()] = True
    return mask


def check_atoms(atoms: Atoms, index: int | None = None) -> None:
    """Raise ``ValueError`` naming the problem if ``atoms`` cannot be evaluated, and the
    structure: by ``index`` (its place among several) if given."""
    name = "the structure" if index is None else f"structure {index}"
    if not hasattr(atoms, "get_chemical_formula"):
        raise ValueError(f"{name} is a {type(atoms).__name__}, not an ase.Atoms")
    if len(atoms) == 0:
        raise ValueError(f"{name} has no atoms")

    def label() -> str:  # only on error: the formula costs 0.1 ms, a cost on every MD step
        from ase.data import chemical_symbols

        numbers = np.asarray(atoms.numbers)
        if ((numbers < 0) | (numbers >= len(chemical_symbols))).any():  # no formula for them
            return f"{name} ({len(atoms)} atoms)"
        return f"{name} ({atoms.get_chemical_formula()})"

    positions = np.asarray(atoms.positions)
    bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
    if len(bad):
        raise ValueError(
            f"{label()}: positions of atoms {bad[:10].tolist()} are NaN or inf (when they "
            "were finite at the start, a step of the optimizer or integrator diverged: a line "
            "search with forces that are no energy gradient, or too long a time step)"
        )
    numbers = np.asarray(atoms.numbers)
    bad = np.flatnonzero((numbers < 1) | (numbers > MAX_ATOMIC_NUMBER))
    if len(bad):
        raise ValueError(
            f"{label()}: atoms {bad[:10].tolist()} have invalid atomic numbers "
            f"{numbers[bad[:10]].tolist()}"
        )
    cell = np.asarray(atoms.cell.array, dtype=np.float64)
    if not np.isfinite(cell).all():
        raise ValueError(f"{label()}: the cell contains NaN or inf")
    problem = cell_problem(cell[None], np.asarray(atoms.pbc)[None])
    if problem is not None:
        raise ValueError(f"{label()}: {problem[1]}")


def atoms_to_arrays(atoms_list: Sequence) -> tuple[np.ndarray, ...]:
    """Checked, concatenated arrays of ``ase.Atoms``, in :meth:`Batch.from_arrays`' order:
    ``(positions [N, 3], numbers [N], cell [S, 3, 3], pbc [S, 3], natoms [S], tags [N],
    fixed [N])``.

    Raises:
        ValueError: from :func:`check_atoms`, naming the structure and the problem.
    """
    for index, atoms in enumerate(atoms_list):
        check_atoms(atoms, index if len(atoms_list) > 1 else None)
    positions = np.concatenate([a.positions for a in atoms_list]).astype(np.float64)
    numbers = np.concatenate([a.numbers for a in atoms_list])
    cell = np.stack([a.cell.array for a in atoms_list]).astype(np.float64)
    pbc = np.stack([a.pbc for a in atoms_list])
    natoms = np.array([len(a) for a in atoms_list])
    tags = np.concatenate([a.get_tags() for a in atoms_list])
    fixed = np.concatenate([fixed_mask(a) for a in atoms_list])
    return positions, numbers, cell, pbc, natoms, tags, fixed
