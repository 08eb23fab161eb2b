"""Helpers of the training tests: EMT-labelled Cu(111) + O frames, tiny model configs, the OCP
fixture checkpoints.  A plain module, not a conftest.py: a second conftest.py would shadow the
repository's ``tests/conftest.py``, which other tests import as ``conftest``."""

from __future__ import annotations

import csv
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

#: A ForceNet small enough to train in seconds on one CPU core.
FORCENET_TINY = {
    "hidden_channels": 64,
    "num_interactions": 2,
    "decoder_hidden_channels": 64,
    "num_freqs": 8,
    "cutoff": 4.0,
}

#: A SpinConv small enough to train in seconds (force-centric unless overridden).
SPINCONV_TINY = {
    "hidden_channels": 8,
    "mid_hidden_channels": 32,
    "num_interactions": 1,
    "num_basis_functions": 16,
    "basis_width_scalar": 3.0,
    "sphere_size_lat": 4,
    "sphere_size_long": 4,
    "max_num_neighbors": 16,
    "cutoff": 3.5,
    "embedding_size": 8,
    "force_estimator": "random",
    "num_rand_rotations": 1,
}


def emt_frames(n: int = 20, layers: int = 2, rattle: float = 0.1, seed: int = 0) -> list:
    """``n`` rattled 2x2xlayers Cu(111) slabs with an O in the fcc site, labelled by EMT.

    Bottom layer fixed (FixAtoms), ASE's tags, every atom rattled by N(0, rattle) Å.
    """
    from ase.build import add_adsorbate, fcc111
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.constraints import FixAtoms

    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        slab = fcc111("Cu", (2, 2, layers), vacuum=5.0)
        add_adsorbate(slab, "O", 1.5, "fcc")
        bottom = [atom.index for atom in slab if atom.tag == layers]
        slab.set_constraint(FixAtoms(indices=bottom))
        del slab.info["adsorbate_info"]
        slab.positions += rng.normal(0.0, rattle, slab.positions.shape)
        slab.calc = EMT()
        energy, forces = slab.get_potential_energy(), slab.get_forces(apply_constraint=False)
        slab.calc = SinglePointCalculator(slab, energy=energy, forces=forces)
        frames.append(slab)
    return frames


@cache
def _frames() -> tuple:
    return tuple(emt_frames())


def training_frames() -> list:
    """The tests' 20 EMT frames (9 atoms each; built once, never modified by training)."""
    return list(_frames())


@pytest.fixture(autouse=True)
def one_thread():
    """Train on one thread (the machine is shared; results do not depend on it).  Autouse in
    every module that imports it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ocp_checkpoint(name: str) -> Path:
    """The OCP-format fixture checkpoint ``tests/data/ocp/<name>.pt``."""
    return Path(__file__).resolve().parents[1] / "data" / "ocp" / f"{name}.pt"


def assert_same_metrics(expected: Path, got: Path) -> None:
    """The two ``metrics.csv`` files hold the same rows: same columns, same steps, every number
    equal to float tolerance (except ``time``, the wall time)."""
    with open(expected, newline="") as a, open(got, newline="") as b:
        rows_a, rows_b = list(csv.DictReader(a)), list(csv.DictReader(b))
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for row_a, row_b in zip(rows_a, rows_b, strict=True):
        assert row_a.keys() == row_b.keys()
        for key in row_a.keys() - {"time"}:
            try:
                value = float(row_a[key])
            except ValueError:
                assert row_a[key] == row_b[key], (row_a["step"], key)
                continue
            assert float(row_b[key]) == pytest.approx(value, rel=1e-6, abs=1e-12), (
                row_a["step"],
                key,
            )
