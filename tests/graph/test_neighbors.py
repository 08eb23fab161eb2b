"""Neighbor lists: both backends against ASE, edge cases, batching, the max-neighbor rule."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from devices import CUDA
from graph_helpers import (
    BACKENDS,
    N_RANDOM,
    as_tensors,
    ase_rows,
    assert_matches_ase,
    graph_of,
    graph_rows,
    pair_rows,
    random_contacts,
    random_structures,
)

from forcecalc.graph import neighbors
from forcecalc.graph.neighbors import (
    edge_vectors,
    fixed_order_edge_vectors,
    max_neighbors_mask,
    neighbor_list,
    radius_graph,
)
from forcecalc.warning import ForcecalcWarning


@random_contacts
@pytest.mark.parametrize("backend", BACKENDS)
def test_random_structures_match_ase(backend: str) -> None:
    """Both backends give exactly ASE's pair set (i, j, S) and vectors on 200 random structures.

    Random triclinic (also strongly skewed) cells, random pbc per axis, zero non-periodic cell
    vectors, atoms outside the cell, cutoffs from 1 Å to 3x the cell size, 1-300 atoms.
    """
    for index, (atoms, cutoff) in enumerate(random_structures(1234, N_RANDOM)):
        label = f"structure {index}: {len(atoms)} atoms, pbc={atoms.pbc}, cutoff={cutoff:.2f}"
        assert_matches_ase(atoms, cutoff, backend, label)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fcc_primitive_cell_needs_many_images(backend: str) -> None:
    """A 1-atom fcc primitive cell at 6 Å has the 78 neighbors of its 5 shells, all images."""
    atoms = bulk("Cu", "fcc", a=3.61)
    graph = graph_of(atoms, 6.0, backend)
    assert graph.edge_index.shape[1] == 78
    assert (graph.edge_index == 0).all()
    assert_matches_ase(atoms, 6.0, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_molecule_with_zero_cell(backend: str) -> None:
    """A non-periodic molecule with a zero cell: ASE's pairs, all with zero shift."""
    atoms = molecule("CH3CH2OH")
    assert not atoms.cell.array.any()
    graph = graph_of(atoms, 2.5, backend)
    assert (graph.shifts == 0).all()
    assert graph.edge_index.shape[1] > 0
    assert_matches_ase(atoms, 2.5, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_isolated_atom_has_no_neighbors(backend: str) -> None:
    """An atom farther than the cutoff from all others (and its images) has no edges."""
    atoms = molecule("H2O")
    atoms.append("Ar")
    atoms.positions[-1] = [20.0, 0.0, 0.0]
    atoms.set_cell([[40.0, 0, 0], [0, 40.0, 0], [0, 0, 40.0]])
    atoms.pbc = True
    graph = graph_of(atoms, 3.0, backend)
    assert not (graph.edge_index == len(atoms) - 1).any()
    assert graph.edge_index.shape[1] == 6
    alone = graph_of(Atoms("Ar", positions=[[1.0, 2.0, 3.0]]), 5.0, backend)
    assert alone.edge_index.shape == (2, 0) and alone.shifts.shape == (0, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_periodic_self_images_but_no_zero_shift_self_pair(backend: str) -> None:
    """An atom's own periodic images are edges; the zero-shift self pair never is."""
    atoms = Atoms("Cu", positions=[[0.3, 0.2, 0.1]], cell=np.diag([2.0, 2.5, 3.0]), pbc=True)
    graph = graph_of(atoms, 2.6, backend)
    rows, _ = graph_rows(graph)
    expected = pair_rows(
        np.zeros(4), np.zeros(4), np.array([[-1, 0, 0], [0, -1, 0], [0, 1, 0], [1, 0, 0]])
    )
    np.testing.assert_array_equal(rows, expected)
    multi = bulk("Cu", "fcc", a=3.61).repeat((2, 1, 1))
    graph = graph_of(multi, 6.0, backend)
    self_pairs = graph.edge_index[0] == graph.edge_index[1]
    assert self_pairs.any()
    assert (graph.shifts[self_pairs] != 0).any(dim=1).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_slab_periodic_in_plane_only(backend: str) -> None:
    """A Cu(111) slab with pbc (T, T, F): ASE's pairs, no shift along the slab normal."""
    atoms = fcc111("Cu", (3, 3, 4), vacuum=8.0)
    atoms.pbc = (True, True, False)
    graph = graph_of(atoms, 6.0, backend)
    assert (graph.shifts[:, 2] == 0).all()
    assert_matches_ase(atoms, 6.0, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unwrapped_positions(backend: str) -> None:
    """Atoms displaced by lattice vectors: same distances, shifts corrected for the originals.

    The vectors ``pos[j] - pos[i] + S @ cell`` use the unwrapped positions and equal those of
    the wrapped structure edge for edge.
    """
    wrapped = bulk("Cu", "fcc", a=3.61).repeat((2, 3, 2))
    wrapped.cell[1] += 0.7 * wrapped.cell[0]
    wrapped.wrap()
    rng = np.random.default_rng(5)
    moves = rng.integers(-4, 5, size=(len(wrapped), 3))
    unwrapped = wrapped.copy()
    unwrapped.positions += moves @ wrapped.cell.array
    assert_matches_ase(unwrapped, 5.0, backend)
    g_wrapped, g_unwrapped = graph_of(wrapped, 5.0, backend), graph_of(unwrapped, 5.0, backend)
    rows_w, vectors_w = graph_rows(g_wrapped)
    rows_u, vectors_u = graph_rows(g_unwrapped)
    # Edge (i, j, S) of the unwrapped structure is (i, j, S + moves[j] - moves[i]) wrapped.
    i, j = rows_u[:, 0], rows_u[:, 1]
    mapped = pair_rows(i, j, rows_u[:, 2:] + moves[j] - moves[i])
    np.testing.assert_array_equal(mapped, rows_w)
    np.testing.assert_allclose(
        np.sort(np.linalg.norm(vectors_u, axis=1)), np.sort(np.linalg.norm(vectors_w, axis=1))
    )


@pytest.mark.parametrize("pbc", [(True, True, True), (True, True, False)])
def test_extremely_skewed_cell(pbc: tuple[bool, bool, bool]) -> None:
    """A cell with vectors at a few degrees (shears of 12 and 30 cell lengths): ASE's pairs.

    The torch cell list reduces such a lattice before binning; the shifts refer to the given
    cell.
    """
    cell = np.array([[4.0, 0.0, 0.0], [48.3, 4.2, 0.0], [121.0, 1.7, 4.5]])
    rng = np.random.default_rng(11)
    atoms = Atoms("H12", positions=rng.random((12, 3)) @ cell, cell=cell, pbc=pbc)
    for backend in BACKENDS:
        assert_matches_ase(atoms, 5.5, backend, backend)


def test_non_periodic_axis_outside_cell() -> None:
    """Atoms far outside the cell along non-periodic axes (both backends agree with ASE)."""
    atoms = fcc111("Cu", (2, 2, 3), vacuum=5.0)
    atoms.pbc = (True, False, False)
    atoms.positions[::2] += [0.0, 40.0, -25.0]
    for backend in BACKENDS:
        assert_matches_ase(atoms, 4.0, backend)


@random_contacts
@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_equals_per_system(backend: str) -> None:
    """One call on a batch of systems returns exactly the union of the per-system graphs.

    Every edge joins two atoms of the same system, and each system's edges (indices shifted
    by the system's first atom) equal those of a call on that system alone.
    """
    atoms_list = [atoms for atoms, _ in random_structures(99, 25)]
    cutoff = 3.5
    positions, cell, pbc, system_idx = as_tensors(atoms_list)
    batched = radius_graph(positions, cell, pbc, system_idx, cutoff, backend=backend)
    source_system, target_system = system_idx[batched.edge_index]
    assert torch.equal(source_system, target_system)
    first = 0
    for index, atoms in enumerate(atoms_list):
        mine = target_system == index
        j, i = batched.edge_index[:, mine].numpy() - first
        rows = pair_rows(i, j, batched.shifts[mine].numpy())
        expected, _ = graph_rows(graph_of(atoms, cutoff, backend))
        np.testing.assert_array_equal(rows, expected, err_msg=f"system {index}")
        first += len(atoms)


def test_float32_input_searches_in_float64() -> None:
    """float32 positions: both backends find the same pairs (the search runs in float64)."""
    atoms = fcc111("Cu", (4, 4, 3), vacuum=6.0)
    atoms.rattle(0.1, seed=3)
    positions, cell, pbc, system_idx = as_tensors([atoms])
    graphs = [
        radius_graph(positions.float(), cell.float(), pbc, system_idx, 5.0, backend=backend)
        for backend in BACKENDS
    ]
    assert graphs[0].vectors.dtype == torch.float32
    rows = [graph_rows(g)[0] for g in graphs]
    np.testing.assert_array_equal(rows[0], rows[1])


def test_neighbor_list_matches_ase() -> None:
    """``neighbor_list(atoms, cutoff)`` returns ASE's (i, j, S) as numpy arrays."""
    atoms = bulk("Pt", "fcc", a=3.92, cubic=True).repeat(2)
    i, j, shifts = neighbor_list(atoms, 4.5)
    np.testing.assert_array_equal(pair_rows(i, j, shifts), ase_rows(atoms, 4.5)[0])


def test_edge_vectors_convention() -> None:
    """``vectors = pos[j] - pos[i] + shifts @ cell`` with edge_index = (source j, target i)."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    atoms.positions[0] += [0.1, -0.2, 0.05]
    graph = graph_of(atoms, 3.0, "torch")
    j, i = graph.edge_index
    positions, cell = torch.tensor(atoms.positions), torch.tensor(atoms.cell.array)
    expected = positions[j] - positions[i] + graph.shifts.double() @ cell
    torch.testing.assert_close(graph.vectors, expected)
    torch.testing.assert_close(graph.distances, expected.norm(dim=1))
    positions, cell, _, system_idx = as_tensors([atoms])
    torch.testing.assert_close(
        edge_vectors(positions, cell, system_idx, graph.edge_index, graph.shifts), expected
    )


def test_fixed_order_edge_vectors_equal_edge_vectors_with_gradients() -> None:
    """The CUDA formulation (RowIndex gathers, deterministic gradients) gives the CPU one's
    vectors and the same gradients with respect to positions and cells (forces, stress), for a
    batch of two systems."""
    systems = [bulk("Cu", "fcc", a=3.61, cubic=True), fcc111("Pt", (2, 2, 3), vacuum=5.0)]
    systems[1].pbc = True
    systems[0].rattle(0.05, seed=1)
    positions, cell, pbc, system_idx = as_tensors(systems)
    graph = radius_graph(positions, cell, pbc, system_idx, 4.0)
    weights = torch.randn(graph.edge_index.shape[1], 3, dtype=torch.float64)
    results = []
    for function in (edge_vectors, fixed_order_edge_vectors):
        p, c = positions.clone().requires_grad_(), cell.clone().requires_grad_()
        vectors = function(p, c, system_idx, graph.edge_index, graph.shifts)
        results.append((vectors, *torch.autograd.grad((vectors.sin() * weights).sum(), (p, c))))
    for ours, reference in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)


# --- the max-neighbor rule -------------------------------------------------------------


def test_max_neighbors_keeps_exactly_k_without_ties() -> None:
    """Without ties each target keeps exactly its k closest edges (all if it has fewer)."""
    rng = np.random.default_rng(0)
    target = torch.tensor(rng.integers(0, 20, size=600))
    distances = torch.tensor(rng.uniform(0.5, 6.0, size=600))
    keep = max_neighbors_mask(target, distances, 7, 20)
    for atom in range(20):
        mine = target == atom
        kept = keep[mine]
        assert int(kept.sum()) == min(7, int(mine.sum()))
        if kept.any() and (~kept).any():
            assert distances[mine][kept].max() < distances[mine][~kept].min()


def test_max_neighbors_shuffled_edges_same_result() -> None:
    """The kept edges do not depend on the order of the edges."""
    atoms = fcc111("Cu", (3, 3, 3), vacuum=6.0)
    graph = graph_of(atoms, 6.0, "vesin")
    target, distances = graph.edge_index[1], graph.distances
    keep = max_neighbors_mask(target, distances, 12, len(atoms))
    for seed in range(3):
        perm = torch.randperm(len(target), generator=torch.Generator().manual_seed(seed))
        shuffled = max_neighbors_mask(target[perm], distances[perm], 12, len(atoms))
        assert torch.equal(shuffled, keep[perm])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_max_neighbors_keeps_all_ties_of_ideal_slab(dtype: torch.dtype) -> None:
    """An ideal fcc(111) slab: all tied neighbors are kept, independent of atom order.

    With k = 8 every atom keeps its whole first shell (9 neighbors in a surface layer, 12
    inside), also when the distances are computed in float32; permuting the atoms gives the
    same edge set.
    """
    atoms = fcc111("Cu", (3, 3, 4), vacuum=7.0)
    atoms.pbc = (True, True, False)
    positions, cell, pbc, system_idx = as_tensors([atoms])
    graph = radius_graph(positions, cell, pbc, system_idx, 6.0, backend="vesin")
    vectors = edge_vectors(
        positions.to(dtype), cell.to(dtype), system_idx, graph.edge_index, graph.shifts
    )
    keep = max_neighbors_mask(graph.edge_index[1], vectors.norm(dim=1), 8, len(atoms))
    counts = torch.bincount(graph.edge_index[1][keep], minlength=len(atoms))
    layer = atoms.get_tags()  # 1 = top layer, 4 = bottom layer
    surface = torch.tensor((layer == 1) | (layer == 4))
    assert (counts[surface] == 9).all() and (counts[~surface] == 12).all()

    perm = np.random.default_rng(1).permutation(len(atoms))
    permuted = atoms[perm]
    g1 = graph_of(atoms, 6.0, "torch", max_neighbors=8)
    g2 = graph_of(permuted, 6.0, "torch", max_neighbors=8)
    rows1, _ = graph_rows(g1)
    j, i = g2.edge_index.numpy()
    rows2 = pair_rows(perm[i], perm[j], g2.shifts.numpy())
    np.testing.assert_array_equal(rows1, rows2)


def test_max_neighbors_rejects_k_below_one() -> None:
    """``max_neighbors < 1`` is a ValueError."""
    with pytest.raises(ValueError, match="max_neighbors"):
        max_neighbors_mask(torch.zeros(1, dtype=torch.int64), torch.ones(1), 0, 1)


# --- input errors ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_positions_error_names_atoms(backend: str) -> None:
    """NaN positions raise a ValueError naming the atoms."""
    positions, cell, pbc, system_idx = as_tensors([bulk("Cu", cubic=True)])
    positions[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"atoms \[2\] are NaN"):
        radius_graph(positions, cell, pbc, system_idx, 3.0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlapping_and_close_atoms(backend: str) -> None:
    """Atoms 0.005 Å apart are an error naming them and their structure in the batch; atoms
    0.3 Å apart (closer than any bond: a unit or cell mistake) a ForcecalcWarning naming
    them; 0.6 Å apart (H2 is 0.74 Å) nothing."""
    far = Atoms("H2", positions=[[0, 0, 0], [0.6, 0, 0]], cell=[6, 6, 6], pbc=True)
    close = Atoms("CuH2", positions=[[3, 3, 3], [0, 0, 0], [0, 0.3, 0]], cell=[6, 6, 6])
    overlap = Atoms("H2", positions=[[1, 1, 1], [1, 1, 1.005]], cell=[6, 6, 6], pbc=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        radius_graph(*as_tensors([far]), 3.0, backend=backend)
    with pytest.warns(ForcecalcWarning, match="atoms 1 and 2 of structure 1 in the batch are 0.3"):
        radius_graph(*as_tensors([far, close]), 3.0, backend=backend)
    with pytest.raises(ValueError, match=r"atoms 0 and 1 of structure 2 in the batch are 0.005"):
        radius_graph(*as_tensors([far, close, overlap]), 3.0, backend=backend)


@pytest.mark.parametrize(
    ("cell", "pbc", "message"),
    [
        ([[3, 0, 0], [0, 3, 0], [3, 0, 0]], [True, True, True], "linearly dependent"),
        ([[3, 0, 0], [6, 0, 0], [0, 0, 9]], [True, True, False], "linearly dependent"),
        ([[3, 0, 0], [0, 0, 0], [0, 0, 3]], [True, True, False], r"vector\(s\) \[1\] have zero"),
    ],
)
def test_degenerate_periodic_cell_errors(cell: list, pbc: list, message: str) -> None:
    """A zero-volume periodic cell or a zero periodic vector raises a clear ValueError."""
    positions = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    cell_t = torch.tensor([cell], dtype=torch.float64)
    with pytest.raises(ValueError, match=message):
        radius_graph(positions, cell_t, torch.tensor([pbc]), torch.zeros(2, dtype=torch.int64), 2.0)


def test_a_cell_problem_is_named_as_the_caller_names_the_structure() -> None:
    """A periodic cell that spans no lattice is named as the caller names the structure
    (``neighbor_list(..., name=...)``), as its overlapping atoms are; one structure without a
    name gets no "system 0" (it was always "system 0", whatever the name)."""
    atoms = Atoms("H2", positions=[[0, 0, 0], [1, 1, 1]], cell=[[3, 0, 0], [0, 0, 0], [0, 0, 3]])
    atoms.pbc = [True, True, False]
    with pytest.raises(ValueError, match=r"^my slab: cell vector\(s\) \[1\] have zero"):
        neighbor_list(atoms, 2.0, name="my slab")
    with pytest.raises(ValueError, match=r"^cell vector\(s\) \[1\] have zero"):
        neighbor_list(atoms, 2.0)


def test_other_input_errors() -> None:
    """Bad cutoff, unsorted system index or an unknown backend raise ValueError."""
    positions, cell, pbc, system_idx = as_tensors([bulk("Cu", cubic=True)] * 2)
    with pytest.raises(ValueError, match="cutoff"):
        radius_graph(positions, cell, pbc, system_idx, 0.0)
    with pytest.raises(ValueError, match="non-decreasing"):
        radius_graph(positions, cell, pbc, system_idx.flip(0), 3.0)
    with pytest.raises(ValueError, match="backend"):
        radius_graph(positions, cell, pbc, system_idx, 3.0, backend="cuda-magic")


# --- CUDA ------------------------------------------------------------------------------


@CUDA
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_matches_cpu(backend: str) -> None:
    """On a GPU both backends give the CPU's pair set and vectors for a batch of systems."""
    structures = random_structures(42, 40)
    atoms_list = [atoms for atoms, _ in structures]
    tensors = as_tensors(atoms_list)
    cpu = radius_graph(*tensors, 4.0, backend=backend)
    gpu = radius_graph(*(t.cuda() for t in tensors), 4.0, backend=backend)
    assert gpu.edge_index.is_cuda and gpu.shifts.is_cuda
    rows_cpu, vectors_cpu = graph_rows(cpu)
    rows_gpu, vectors_gpu = graph_rows(gpu)
    np.testing.assert_array_equal(rows_gpu, rows_cpu)
    np.testing.assert_allclose(vectors_gpu, vectors_cpu, atol=1e-12)


@CUDA
def test_cuda_max_neighbors_matches_cpu() -> None:
    """The max-neighbor rule keeps the same edges on the GPU (float32) as on the CPU."""
    atoms = fcc111("Cu", (4, 4, 4), vacuum=7.0)
    tensors = as_tensors([atoms])
    cpu = radius_graph(*tensors, 6.0, max_neighbors=10, backend="torch")
    gpu = radius_graph(
        tensors[0].float().cuda(),
        tensors[1].float().cuda(),
        tensors[2].cuda(),
        tensors[3].cuda(),
        6.0,
        max_neighbors=10,
        backend="torch",
    )
    np.testing.assert_array_equal(graph_rows(gpu)[0], graph_rows(cpu)[0])


def test_box_of_many_cells_is_searched_without_vesin(monkeypatch) -> None:
    """Two molecules 2,900 Å apart without periodicity (a box of ~1e5 cutoff-sized cells,
    where vesin 0.6 divides by zero and kills the process) get ASE's edges: such a system
    goes to the torch cell list; and that fallback gives vesin's graph on a bulk cell."""
    far = molecule("CO") + molecule("CO")
    far.positions[2:] += [1500.0, 2500.0, 1.0]
    assert_matches_ase(far, 6.0, "vesin", "far apart")
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.05, seed=0)
    expected = graph_rows(graph_of(atoms, 5.0, "vesin"))
    monkeypatch.setattr(neighbors, "VESIN_MAX_CELLS", 1.0)
    fallback = graph_rows(graph_of(atoms, 5.0, "vesin"))
    for a, b in zip(fallback, expected, strict=True):
        np.testing.assert_array_equal(a, b)


def test_checked_skin_takes_finite_non_negative_lengths_only():
    """A skin is a length in Å >= 0 (0: a list built at the cutoff); the calculator and the
    batched engine share this one check: NaN, inf, negatives, text and booleans are refused by
    name, numbers come back as floats."""
    assert neighbors.checked_skin(0) == 0.0 and isinstance(neighbors.checked_skin(1), float)
    assert neighbors.checked_skin(np.float32(0.5)) == 0.5
    for bad in (float("nan"), float("inf"), -0.1, "1", True, None):
        with pytest.raises(ValueError, match=r"skin must be a finite number >= 0 \(Å\)"):
            neighbors.checked_skin(bad)
