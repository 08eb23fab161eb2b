"""The lattice a neighbor search sees (:mod:`forcecalc.graph.lattice`): plane spacings,
reduced bases for cells given in a bad one, and clear refusals of lattices no search can
enumerate (nearly flat cells, vectors of almost no length) before any work."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import torch
from ase import Atoms
from graph_helpers import BACKENDS, as_tensors, assert_matches_ase, graph_rows

from forcecalc.graph.lattice import (
    plane_spacings,
    reduced_basis,
    search_lattice,
    shortest_vector,
)
from forcecalc.graph.neighbors import radius_graph


def test_plane_spacings_are_the_distances_between_lattice_planes() -> None:
    """An orthorhombic cell's spacings are its lengths; a slab's are those of its 2-D lattice
    in its plane (inf along the open axis); a hexagonal cell's in-plane ones are
    ``a sin(60°)``."""
    cells = np.array([np.diag([2.0, 3.0, 4.0]), np.diag([2.0, 3.0, 0.0]), np.eye(3)])
    cells[2, :2] = [[2.0, 0.0, 0.0], [-1.0, np.sqrt(3.0), 0.0]]
    cells[2, 2] = [0.0, 0.0, 5.0]
    pbc = np.array([[True] * 3, [True, True, False], [True] * 3])
    spacings = plane_spacings(cells, pbc)
    np.testing.assert_allclose(spacings[0], [2.0, 3.0, 4.0])
    np.testing.assert_allclose(spacings[1], [2.0, 3.0, np.inf])
    np.testing.assert_allclose(spacings[2], [np.sqrt(3.0), np.sqrt(3.0), 5.0])


def test_reduced_basis_is_the_same_lattice_with_short_vectors() -> None:
    """The reduction of a cubic lattice given in a basis skewed by ``b + 40000 a`` and ``c +
    a - 7b`` is unimodular (the same lattice) and gives back vectors of the cube's length;
    the shortest lattice vector is found."""
    cube = 3.0 * np.eye(3)
    skew = np.array([[1, 0, 0], [40000, 1, 0], [1, -7, 1]])
    vectors = skew @ cube
    basis = reduced_basis(vectors)
    assert abs(round(np.linalg.det(basis))) == 1
    np.testing.assert_allclose(np.linalg.norm(basis @ vectors, axis=1), 3.0)
    length, n = shortest_vector(basis @ vectors)
    assert length == pytest.approx(3.0)
    assert np.abs(n).sum() == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [400, 40000])
def test_a_cell_in_a_skewed_basis_gives_the_pairs_of_its_lattice(backend: str, k: int) -> None:
    """A crystal given in the basis ``(a, b + k a, c - 7 b)`` (the same lattice, needing
    millions of images in that basis) has the pairs of its cubic cell (which match ASE's), with
    the shifts in the given basis (``S @ skewed cell`` the same offsets)."""
    atoms = Atoms(
        "CuO", scaled_positions=[[0, 0, 0], [0.5, 0.4, 0.3]], cell=3.0 * np.eye(3), pbc=True
    )
    assert_matches_ase(atoms, 6.0, backend)
    change = np.array([[1, 0, 0], [k, 1, 0], [0, -7, 1]])
    skewed = atoms.copy()
    skewed.set_cell(change @ atoms.cell.array)
    basis, problem = search_lattice(skewed.cell.array[None], skewed.pbc[None], 6.0)
    assert problem is None and basis is not None  # searched in a reduced basis
    rows, vectors = graph_rows(radius_graph(*as_tensors([skewed]), 6.0, backend=backend))
    expected, expected_vectors = graph_rows(
        radius_graph(*as_tensors([atoms]), 6.0, backend=backend)
    )
    rows[:, 2:] = rows[:, 2:] @ change  # shifts in the cubic cell's basis
    order = np.lexsort(rows.T[::-1])
    np.testing.assert_array_equal(rows[order], expected)
    np.testing.assert_allclose(vectors[order], expected_vectors, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("cell", "pbc", "message"),
    [
        (
            [[3.0, 0, 0], [0, 3.0, 0], [1.5, 1.5, 1e-4]],
            [True] * 3,
            r"lattice vector of 0.0002 Å \(a \+ b - 2c\): every atom overlaps its own",
        ),
        ([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 1e-8]], [True] * 3, r"lattice vector of 1e-08 Å \(c\)"),
        ([[3.0, 0, 0], [2.0, 1e-3, 0], [0, 0, 5]], [True, True, False], r"0.003 Å \(2a - 3b\)"),
        (
            0.02 * np.eye(3),
            [True] * 3,
            r"lattice planes are only 0.02 Å apart, so a neighbor search within 6 Å would "
            r"visit 2.17e\+08 periodic images",
        ),
    ],
    ids=["nearly-flat", "tiny-vector", "nearly-flat-slab", "in-other-units"],
)
def test_a_lattice_no_search_can_enumerate_is_refused_at_once(
    backend: str, cell: list, pbc: list, message: str
) -> None:
    """A cell whose lattice puts every atom on its own images, or whose planes are so close
    that a search would visit more than a million images per atom, is refused naming the
    lattice vector (as a combination of the cell's) or the spacing, in milliseconds (these
    cells hung the search or asked for hundreds of GB)."""
    atoms = Atoms("Cu", positions=[[0.1, 0.2, 0.3]], cell=cell, pbc=pbc)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        radius_graph(*as_tensors([atoms]), 6.0, backend=backend)
    assert time.perf_counter() - start < 5.0


def test_a_wire_with_a_vector_of_almost_no_length_is_refused_at_once() -> None:
    """One periodic axis of 0.005 Å (few images, but every atom on its own): refused naming
    the lattice vector, before any search."""
    atoms = Atoms("Cu", positions=[[0, 0, 0]], cell=[0.005, 0, 0], pbc=[True, False, False])
    with pytest.raises(ValueError, match=r"lattice vector of 0.005 Å \(a\)"):
        radius_graph(*as_tensors([atoms]), 6.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_inputs_in_a_skewed_basis_lose_no_pair(backend: str) -> None:
    """float32 positions and cell in the basis ``(a, b + 40000 a, c - 7 b)``: the pairs are
    those within the cutoff in float64 arithmetic on the same float32 values (the reduced
    basis and the cutoff test are made in float64: in float32 the large integers missed the
    lattice by 0.01 Å, and pairs 0.04 Å inside the cutoff were lost)."""
    rng = np.random.default_rng(3)
    for _ in range(5):
        base = np.diag(rng.uniform(2.5, 3.5, 3))
        atoms = Atoms("Cu6", scaled_positions=rng.uniform(size=(6, 3)), cell=base, pbc=True)
        atoms.set_cell(np.array([[1, 0, 0], [40000, 1, 0], [0, -7, 1]]) @ base)
        single = [t.float() if t.is_floating_point() else t for t in as_tensors([atoms])]
        double = [t.double() if t.is_floating_point() else t for t in single]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random positions: close contacts
            rows32 = graph_rows(radius_graph(*single, 6.0, backend=backend))[0]
            rows64 = graph_rows(radius_graph(*double, 6.0, backend="torch"))[0]
        np.testing.assert_array_equal(rows32, rows64)


def test_the_refusal_names_the_system_of_a_batch() -> None:
    """In a batch, the refusal names the system (or what ``name`` calls it)."""
    good = Atoms("Cu", positions=[[0, 0, 0]], cell=3.0 * np.eye(3), pbc=True)
    flat = Atoms("Cu", positions=[[0, 0, 0]], cell=[[3, 0, 0], [0, 3, 0], [3, 3, 1e-6]], pbc=True)
    with pytest.raises(ValueError, match=r"^system 1: the cell has a lattice vector"):
        radius_graph(*as_tensors([good, flat]), 6.0)
    with pytest.raises(ValueError, match=r"^structure 7 \(Cu\): the cell"):
        radius_graph(*as_tensors([good, flat]), 6.0, name=lambda k: f"structure {k + 6} (Cu)")


@pytest.mark.parametrize(
    ("cell", "pbc", "positions"),
    [
        (
            [[2, 0, 0], [1.9, 0.3, 0], [1.8, 0.25, 0.4]],
            [True] * 3,
            [[6.899859525765012, 0.17169141946926159, -0.33097959666035215]],
        ),
        (
            [
                [1.5, 0, 0],
                [1.5 * np.cos(np.radians(20)), 1.5 * np.sin(np.radians(20)), 0],
                [0, 0, 10],
            ],
            [True, True, False],
            [[2.4163220449817295, 1.2303777228775146, 8.95448239414126]],
        ),
    ],
    ids=["skewed-cell", "slab"],
)
def test_pairs_at_the_cutoff_are_decided_as_the_models_decide(
    cell: list, pbc: list, positions: list
) -> None:
    """Periodic images exactly at the cutoff (to rounding): both backends give the same pairs,
    all strictly inside by the models' own test (``d**2 < cutoff**2`` on the edge vectors),
    a pair and its reverse together (the torch search kept one image at 6.0 Å and not its
    reverse)."""
    atoms = Atoms("Cu", positions=positions, cell=cell, pbc=pbc)
    rows = {}
    for backend in BACKENDS:
        graph = radius_graph(*as_tensors([atoms]), 6.0, backend=backend, warn_contacts=False)
        assert bool(((graph.vectors * graph.vectors).sum(dim=1) < 36.0).all())
        shifts = {tuple(s) for s in graph.shifts.tolist()}
        assert shifts == {tuple(-x for x in s) for s in shifts}
        rows[backend] = graph_rows(graph)[0]
    np.testing.assert_array_equal(rows["vesin"], rows["torch"])


def test_positions_and_cell_of_different_dtypes_are_named() -> None:
    """float32 positions with a float64 cell: a clear error (it was a matmul dtype error)."""
    with pytest.raises(ValueError, match=r"positions \(torch.float32\) and cell \(torch.float64\)"):
        radius_graph(
            torch.zeros(1, 3),
            3.0 * torch.eye(3, dtype=torch.float64)[None],
            torch.ones(1, 3, dtype=torch.bool),
            torch.zeros(1, dtype=torch.int64),
            6.0,
        )
