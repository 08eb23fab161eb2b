"""The engine's parts: neighbor-list reuse, out-of-memory recovery, loaded potentials."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from relax_helpers import mixed_structures, morse_potential, single_thread

from forcecalc.graph import radius_graph
from forcecalc.relax import (
    md,
    relax,
)
from forcecalc.relax.engine import Evaluator, SystemSet
from forcecalc.relax.memory import (
    CPU_MEMORY_MODEL,
    MemoryModel,
)

__all__ = ["single_thread"]


def _pairs(systems: SystemSet, cutoff: float) -> set[tuple[int, int, tuple[int, ...]]]:
    """The set's edges shorter than ``cutoff`` as (source, target, shift)."""
    batch = systems.batch(0, systems.n_systems)
    keep = torch.linalg.norm(batch.edge_vectors(), dim=1) < cutoff
    edges = batch.edge_index[:, keep].T.tolist()
    shifts = batch.shifts[keep].tolist()
    return {(j, i, tuple(s)) for (j, i), s in zip(edges, shifts, strict=True)}


def _fresh_pairs(systems: SystemSet, cutoff: float) -> set[tuple[int, int, tuple[int, ...]]]:
    graph = radius_graph(systems.positions, systems.cell, systems.pbc, systems.system_idx, cutoff)
    edges = graph.edge_index.T.tolist()
    return {(j, i, tuple(s)) for (j, i), s in zip(edges, graph.shifts.tolist(), strict=True)}


def test_neighbor_lists_are_rebuilt_per_system_beyond_half_the_skin():
    """Contract: a system's graph (built at cutoff + skin) is kept while none of its atoms
    moved more than skin/2 and rebuilt, for that system only, once one did; the edges within
    the cutoff always equal a fresh neighbor list's."""
    structures = mixed_structures()[:4]
    systems = SystemSet(cutoff=4.0, skin=0.6, device=torch.device("cpu"))
    systems.extend(structures, [0, 1, 2, 3])
    assert systems.builds == [1, 1, 1, 1]
    shift = torch.zeros_like(systems.positions)
    shift[systems.system_idx == 1] = 0.25 / np.sqrt(3)  # 0.25 Å, below skin/2 = 0.3
    shift[systems.system_idx == 2] = 0.35 / np.sqrt(3)  # 0.35 Å: stale
    shift[0] = 0.29  # atom 0 (system 0) moves 0.29 * sqrt(3) = 0.5 Å: stale
    systems.positions = systems.positions + shift
    assert systems.refresh_neighbors() == 2
    assert systems.builds == [2, 1, 2, 1]
    assert _pairs(systems, 4.0) == _fresh_pairs(systems, 4.0)


def test_without_a_skin_every_moved_system_is_rebuilt_and_no_other():
    """Contract: with skin 0, a system whose atoms moved at all is rebuilt at the next
    refresh (its list holds the cutoff's pairs only), and one that did not move (just built:
    entering the batch) is not built again; the edges always equal a fresh neighbor list's."""
    systems = SystemSet(cutoff=4.0, skin=0.0, device=torch.device("cpu"))
    systems.extend(mixed_structures()[:3], [0, 1, 2])
    assert systems.refresh_neighbors() == 0 and systems.builds == [1, 1, 1]
    shift = torch.zeros_like(systems.positions)
    shift[systems.system_idx == 1] = 1e-9
    systems.positions = systems.positions + shift
    assert systems.refresh_neighbors() == 1 and systems.builds == [1, 2, 1]
    assert _pairs(systems, 4.0) == _fresh_pairs(systems, 4.0)


def test_leaving_and_entering_systems_keep_consistent_edges():
    """Contract: after systems leave (keep) and others enter (extend), every system's edges
    still equal a fresh neighbor list, with atom indices remapped."""
    structures = mixed_structures()
    systems = SystemSet(cutoff=4.0, skin=0.5, device=torch.device("cpu"))
    systems.extend(structures[:6], list(range(6)))
    keep = torch.tensor([True, False, True, False, False, True])
    atom_keep = systems.keep(keep)
    assert int(atom_keep.sum()) == systems.n_atoms
    assert systems.ids == [0, 2, 5]
    systems.extend(structures[10:13], [10, 11, 12])
    assert systems.ids == [0, 2, 5, 10, 11, 12]
    assert _pairs(systems, 4.5) == _fresh_pairs(systems, 4.5)


def test_evaluator_chunks_by_cost_and_recovers_from_oom():
    """Contract: the evaluator cuts a set into forward passes within its cost cap and returns
    the same energies and forces as one pass."""
    structures = mixed_structures()[:8]
    potential = morse_potential()
    systems = SystemSet(potential.cutoff, 0.5, torch.device("cpu"))
    systems.extend(structures, list(range(8)))
    whole = Evaluator(potential, CPU_MEMORY_MODEL.with_budget(float("inf")))
    energy, forces = whole(systems)
    assert whole.forward_calls == 1
    per_atom = MemoryModel(bytes_per_atom=1.0, bytes_per_edge=0.0, budget=30.0)
    chunked = Evaluator(potential, per_atom)
    energy2, forces2 = chunked(systems)
    assert chunked.forward_calls > 2
    torch.testing.assert_close(energy2, energy)
    torch.testing.assert_close(forces2, forces)


def test_a_loaded_potential_runs_as_it_is_or_is_refused():
    """``relax`` and ``md`` run a loaded Potential in its own precision and on its own device;
    asking for another one is an error naming both (as the calculators do), never a run in
    a precision other than the one asked for."""
    potential = morse_potential()  # float64, on the CPU
    atoms = mixed_structures()[0]
    relaxed = relax([atoms], potential, steps=2, batch_size=1, device="cpu", dtype="float64")
    assert len(relaxed) == 1
    for run in (relax, md):
        with pytest.raises(ValueError, match="dtype='float32', but the loaded Potential is"):
            run([atoms], potential, steps=1, dtype="float32")
