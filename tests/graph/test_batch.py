"""The Batch container: fields from ASE structures, dtype moves, differentiable edge vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import add_adsorbate, bulk, fcc111, molecule
from ase.constraints import FixAtoms

from forcecalc.graph import Batch, radius_graph


def slab_with_adsorbate() -> Atoms:
    """Cu(111) 2x2x3 with an O adsorbate, OC20 tags, the bottom layer fixed (FixAtoms)."""
    slab = fcc111("Cu", (2, 2, 3), vacuum=6.0)
    add_adsorbate(slab, "O", 1.5, "fcc")
    layer = slab.get_tags()  # ase: 1 = top layer ... 3 = bottom layer, 0 = adsorbate
    slab.set_tags(np.select([layer == 0, layer == 1], [2, 1], 0))
    slab.set_constraint(FixAtoms(mask=layer == 3))
    return slab


def test_from_atoms_fields() -> None:
    """natoms, system_idx, numbers, tags, fixed (FixAtoms), cell, pbc and edges of a batch.

    The edges equal ``radius_graph`` on the concatenated structures.
    """
    slab, water = slab_with_adsorbate(), molecule("H2O")
    batch = Batch.from_atoms([slab, water], cutoff=4.0)
    n_slab = len(slab)
    assert batch.n_systems == 2 and batch.n_atoms == n_slab + 3
    assert batch.natoms.tolist() == [n_slab, 3]
    assert batch.system_idx.tolist() == [0] * n_slab + [1] * 3
    assert batch.numbers.tolist() == [*slab.numbers.tolist(), 8, 1, 1]
    assert batch.tags.tolist() == [*slab.get_tags().tolist(), 0, 0, 0]
    assert sorted(set(slab.get_tags().tolist())) == [0, 1, 2]
    # fcc111 lists the bottom layer first: those 4 atoms are fixed, all others free.
    assert batch.fixed.tolist() == [True] * 4 + [False] * (n_slab - 4 + 3)
    torch.testing.assert_close(batch.cell[0], torch.tensor(slab.cell.array))
    assert batch.pbc.tolist() == [slab.pbc.tolist(), [False] * 3]
    assert batch.positions.dtype == torch.float64 and batch.numbers.dtype == torch.int64
    graph = radius_graph(batch.positions, batch.cell, batch.pbc, batch.system_idx, 4.0)
    assert batch.n_edges == graph.edge_index.shape[1] > 0
    assert torch.equal(batch.edge_index, graph.edge_index)
    assert torch.equal(batch.shifts, graph.shifts)
    single = Batch.from_atoms(water, cutoff=4.0)
    assert single.n_systems == 1 and single.n_edges == 6


def test_from_atoms_max_neighbors() -> None:
    """``max_neighbors`` is applied: each atom of bulk Cu keeps its 12 tied nearest neighbors."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    batch = Batch.from_atoms(atoms, cutoff=6.0, max_neighbors=10)
    counts = torch.bincount(batch.edge_index[1], minlength=len(atoms))
    assert (counts == 12).all()


def test_to_float32_casts_only_floats() -> None:
    """``.to(dtype=float32)`` casts positions and cell; indices, masks and edges keep theirs."""
    batch = Batch.from_atoms(slab_with_adsorbate(), cutoff=4.0)
    moved = batch.to(dtype=torch.float32)
    assert moved.positions.dtype == torch.float32 and moved.cell.dtype == torch.float32
    for name in ("numbers", "system_idx", "natoms", "tags", "edge_index", "shifts"):
        assert getattr(moved, name).dtype == torch.int64
        assert torch.equal(getattr(moved, name), getattr(batch, name))
    assert moved.fixed.dtype == torch.bool and moved.pbc.dtype == torch.bool
    torch.testing.assert_close(moved.positions.double(), batch.positions, atol=1e-5, rtol=0)
    assert Batch.from_atoms(molecule("H2O"), 3.0, dtype=torch.float32).positions.dtype == (
        torch.float32
    )


def test_edge_vectors_differentiable() -> None:
    """Edge vectors are differentiable in positions and cell (gradcheck, float64).

    Also the gradient of the summed edge lengths w.r.t. positions is the sum of unit vectors
    (``+u`` on the source, ``-u`` on the target).
    """
    atoms = bulk("Cu", "fcc", a=3.61).repeat((2, 1, 1))
    atoms.rattle(0.05, seed=1)
    batch = Batch.from_atoms(atoms, cutoff=3.0)
    positions = batch.positions.clone().requires_grad_(True)
    cell = batch.cell.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda p, c: batch.edge_vectors(p, c).norm(dim=1), (positions, cell)
    )
    vectors = batch.edge_vectors(positions)
    (grad,) = torch.autograd.grad(vectors.norm(dim=1).sum(), positions)
    units = (vectors / vectors.norm(dim=1, keepdim=True)).detach()
    expected = torch.zeros_like(grad)
    expected.index_add_(0, batch.edge_index[0], units)
    expected.index_add_(0, batch.edge_index[1], -units)
    torch.testing.assert_close(grad, expected)


def test_with_positions_keeps_edges() -> None:
    """``with_positions`` swaps positions (and cell) but keeps the edges and shifts."""
    batch = Batch.from_atoms(molecule("CH4"), cutoff=2.0)
    moved = batch.with_positions(batch.positions + 0.01)
    assert torch.equal(moved.edge_index, batch.edge_index)
    torch.testing.assert_close(moved.edge_vectors(), batch.edge_vectors())
    emptied = batch.with_edges(batch.edge_index[:, :0], batch.shifts[:0])
    assert emptied.n_edges == 0


@pytest.mark.parametrize(
    ("atoms", "message"),
    [
        (Atoms(), "has no atoms"),
        (Atoms("H2", positions=[[0, 0, 0], [np.nan, 0, 0]]), r"atoms \[1\] are NaN"),
        (Atoms("X", positions=[[0, 0, 0]]), "invalid atomic numbers"),
        # beyond ASE's element table: named by their numbers (ASE has no formula for them)
        (Atoms(numbers=[119, 1], positions=[[0, 0, 0], [1, 0, 0]]), r"1 \(2 atoms\): .*\[119\]"),
        (Atoms(numbers=[-1], positions=[[0, 0, 0]]), r"1 \(1 atoms\): .*numbers \[-1\]"),
        (Atoms("H", cell=[[2, 0, 0], [0, 0, 0], [0, 0, 2]], pbc=True), r"vector\(s\) \[1\]"),
        (Atoms("H", cell=[[2, 0, 0], [4, 0, 0], [0, 0, 2]], pbc=True), "linearly dependent"),
        (
            Atoms("H", cell=[[2, 0, 0], [4, 0, 0], [0, 0, 9]], pbc=[True, True, False]),
            "linearly dependent",
        ),
    ],
)
def test_from_atoms_errors(atoms: Atoms, message: str) -> None:
    """Unusable structures raise a ValueError naming the structure and the problem."""
    with pytest.raises(ValueError, match=message):
        Batch.from_atoms([molecule("H2O"), atoms], cutoff=3.0)
