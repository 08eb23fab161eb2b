"""Two atoms flying head-on: the test structure for what happens where atoms meet."""

from __future__ import annotations

from ase import Atoms, units


def head_on_pair(symbols: str, gap: float, step: float, offset: float = 0.0) -> Atoms:
    """Two free atoms ``gap`` Å apart along x (the second ``offset`` Å off that line), not
    periodic, with momenta that move each ``step`` Å toward the other in an MD step of 0.5 fs
    (forces aside): with ``step = gap / 2`` they meet in the first step."""
    pair = Atoms(symbols, positions=[[0, 0, 0], [gap, offset, 0]], cell=[9, 9, 9], pbc=False)
    speed = step / (0.5 * units.fs)
    pair.set_momenta(pair.get_masses()[:, None] * [[speed, 0, 0], [-speed, 0, 0]])
    return pair
