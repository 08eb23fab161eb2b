"""Shared helpers of the graph tests: reference pairs from ASE's neighbor list, batches of
structures as tensors, and seeded random periodic structures."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.neighborlist import neighbor_list as ase_neighbor_list

from forcecalc.graph.neighbors import NeighborGraph, radius_graph

#: Random positions put some atoms closer than any bond: the graph is still exact there, and
#: the warning about it (tested on its own in test_neighbors.py) is not this test's subject.
random_contacts = pytest.mark.filterwarnings(
    "ignore:.*closer than any bond:forcecalc.warning.ForcecalcWarning"
)

BACKENDS = ["vesin", "torch"]
N_RANDOM = 200


def pair_rows(i: np.ndarray, j: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """``[n_pairs, 5]`` rows ``(i, j, S)`` sorted lexicographically (a canonical pair set)."""
    rows = np.column_stack([i, j, shifts]).astype(np.int64).reshape(-1, 5)
    return rows[np.lexsort(rows.T[::-1])]


def ase_rows(atoms: Atoms, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """ASE's pairs as sorted ``(i, j, S)`` rows ``[n, 5]`` and their vectors ``[n, 3]``.

    Cached per structure object (the random structures are shared by both backends' tests);
    the cache holds the structure too, so its ``id`` is never reused.
    """
    key = (id(atoms), cutoff)
    if key not in _ASE_CACHE:
        _ASE_CACHE[key] = (atoms, _ase_rows(atoms, cutoff))
    return _ASE_CACHE[key][1]


_ASE_CACHE: dict[tuple[int, float], tuple[Atoms, tuple[np.ndarray, np.ndarray]]] = {}


def _ase_rows(atoms: Atoms, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """Uncached :func:`ase_rows`."""
    i, j, shifts, vectors = ase_neighbor_list("ijSD", atoms, cutoff)
    rows = np.column_stack([i, j, shifts]).astype(np.int64).reshape(-1, 5)
    order = np.lexsort(rows.T[::-1])
    return rows[order], vectors.reshape(-1, 3)[order]


def as_tensors(atoms_list: list[Atoms]) -> tuple[torch.Tensor, ...]:
    """``(positions, cell, pbc, system_idx)`` of a batch of structures (float64)."""
    positions = torch.tensor(np.concatenate([a.positions for a in atoms_list]))
    cell = torch.tensor(np.stack([a.cell.array for a in atoms_list]))
    pbc = torch.tensor(np.stack([a.pbc for a in atoms_list]))
    counts = torch.tensor([len(a) for a in atoms_list])
    system_idx = torch.repeat_interleave(torch.arange(len(atoms_list)), counts)
    return positions, cell, pbc, system_idx


def graph_of(atoms: Atoms, cutoff: float, backend: str, **kwargs: int) -> NeighborGraph:
    """``radius_graph`` of one structure (``kwargs``: ``max_neighbors``)."""
    return radius_graph(*as_tensors([atoms]), cutoff, backend=backend, **kwargs)


def graph_rows(graph: NeighborGraph) -> tuple[np.ndarray, np.ndarray]:
    """A graph's edges as sorted ``(i, j, S)`` rows ``[n, 5]`` and their vectors ``[n, 3]``."""
    j, i = graph.edge_index.cpu().numpy()
    rows = np.column_stack([i, j, graph.shifts.cpu().numpy()]).reshape(-1, 5)
    order = np.lexsort(rows.T[::-1])
    return rows[order], graph.vectors.detach().cpu().numpy().reshape(-1, 3)[order]


def assert_matches_ase(atoms: Atoms, cutoff: float, backend: str, label: str = "") -> None:
    """The graph of ``backend`` has exactly ASE's pairs (no duplicates) and vectors."""
    expected, expected_vectors = ase_rows(atoms, cutoff)
    rows, vectors = graph_rows(graph_of(atoms, cutoff, backend))
    assert len(np.unique(rows, axis=0)) == len(rows), f"{label}: duplicate edges"
    assert rows.shape == expected.shape, f"{label}: {len(rows)} edges, ASE has {len(expected)}"
    np.testing.assert_array_equal(rows, expected, err_msg=label)
    np.testing.assert_allclose(vectors, expected_vectors, atol=1e-9, err_msg=label)


def random_cell(rng: np.random.Generator, volume: float) -> np.ndarray:
    """A random triclinic cell of the given volume; about a third strongly skewed."""
    while True:
        cell = np.eye(3) + 0.35 * rng.normal(size=(3, 3))
        if rng.random() < 0.35:
            # Shear: add multiples of the other vectors (volume kept, angles far from 90°).
            cell[1] += rng.uniform(-3, 3) * cell[0]
            cell[2] += rng.uniform(-3, 3) * cell[0] + rng.uniform(-3, 3) * cell[1]
        det = abs(np.linalg.det(cell))
        lengths = np.linalg.norm(cell, axis=1)
        if det / lengths.prod() > 0.02:
            return cell * (volume / det) ** (1 / 3)


def random_structure(rng: np.random.Generator) -> tuple[Atoms, float]:
    """A random structure and cutoff for the comparison with ASE.

    Mostly small (1 to 30 atoms), some up to 300; densities 0.02-0.1 atoms/Å^3; random pbc per
    axis; non-periodic cell vectors sometimes zero; a third of the atoms moved outside the cell
    (by up to 3 cell vectors along periodic axes, by fractions of them along all axes);
    cutoffs from 1 Å to 3x the cell size, capped at about 5,000 pairs per structure.
    """
    n_atoms = int(rng.integers(1, 31)) if rng.random() < 0.85 else int(rng.integers(31, 301))
    density = rng.uniform(0.02, 0.1)
    cell = random_cell(rng, n_atoms / density)
    pbc = rng.random(3) < 0.5
    frac = rng.random((n_atoms, 3))
    outside = rng.random(n_atoms) < 0.33
    frac[outside] += rng.integers(-3, 4, size=(outside.sum(), 3)) * pbc
    frac[outside] += rng.uniform(-0.4, 0.4, size=(outside.sum(), 3)) * (rng.random() < 0.5)
    positions = frac @ cell
    if rng.random() < 0.4:
        cell[~pbc] = 0.0
    size = (n_atoms / density) ** (1 / 3)
    largest = (5_000 / (n_atoms * density * 4.19)) ** (1 / 3)
    cutoff = float(min(rng.uniform(1.0, max(1.0, 3 * size)), max(largest, 1.0)))
    return Atoms("H" * n_atoms, positions=positions, cell=cell, pbc=pbc), cutoff


@cache
def random_structures(seed: int, n: int) -> list[tuple[Atoms, float]]:
    """``n`` random structures and cutoffs (:func:`random_structure`), seeded."""
    rng = np.random.default_rng(seed)
    return [random_structure(rng) for _ in range(n)]
