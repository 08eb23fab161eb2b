"""Periodic neighbor lists and the batched graph container."""

from forcecalc.graph.batch import Batch
from forcecalc.graph.cell_list import batched_cell_list
from forcecalc.graph.neighbors import (
    NeighborGraph,
    edge_vectors,
    max_neighbors_mask,
    neighbor_list,
    radius_graph,
)

__all__ = [
    "Batch",
    "NeighborGraph",
    "batched_cell_list",
    "edge_vectors",
    "max_neighbors_mask",
    "neighbor_list",
    "radius_graph",
]
