"""The torch cell list (``forcecalc.graph.cell_list``): its code paths and edge cases give
exactly ASE's pairs."""

from __future__ import annotations

import pytest
import torch
from ase.build import bulk, molecule
from graph_helpers import (
    as_tensors,
    assert_matches_ase,
    graph_of,
    random_contacts,
    random_structures,
)

from forcecalc.graph import cell_list
from forcecalc.graph.neighbors import radius_graph


def test_torch_backend_empty_system_in_batch() -> None:
    """A system without atoms inside a batch (and a batch without atoms) are handled."""
    first, last = bulk("Cu", "fcc", a=3.61), molecule("H2O")
    positions, cell, pbc, _ = as_tensors([first, last])
    cell = torch.cat([cell[:1], torch.eye(3, dtype=torch.float64)[None] * 5, cell[1:]])
    pbc = torch.cat([pbc[:1], torch.ones(1, 3, dtype=torch.bool), pbc[1:]])
    system_idx = torch.tensor([0, 2, 2, 2])
    graph = radius_graph(positions, cell, pbc, system_idx, 3.0, backend="torch")
    expected = graph_of(first, 3.0, "vesin").edge_index.shape[1]
    expected += graph_of(last, 3.0, "vesin").edge_index.shape[1]
    assert graph.edge_index.shape[1] == expected
    empty = cell_list.batched_cell_list(
        torch.zeros(0, 3), cell, pbc, torch.zeros(0, dtype=torch.int64), 3.0
    )
    assert empty[0].shape == (2, 0) and empty[1].shape == (0, 3)


@random_contacts
@pytest.mark.parametrize(
    ("table_factor", "max_candidates"), [(0, 1 << 18), (1 << 20, 1 << 18), (8, 1000)]
)
def test_cell_list_code_paths_agree(
    monkeypatch: pytest.MonkeyPatch, table_factor: int, max_candidates: int
) -> None:
    """Binary-search and dense-table bin lookups, and tiny candidate chunks, give ASE's pairs."""
    monkeypatch.setattr(cell_list, "DENSE_TABLE_FACTOR", table_factor)
    monkeypatch.setattr(cell_list, "DENSE_TABLE_MIN", 0 if table_factor == 0 else 1 << 16)
    monkeypatch.setattr(cell_list, "MAX_CANDIDATES", max_candidates)
    for index, (atoms, cutoff) in enumerate(random_structures(7, 30)):
        assert_matches_ase(atoms, cutoff, "torch", f"structure {index}")
