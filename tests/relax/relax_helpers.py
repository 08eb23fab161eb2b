"""Analytic test potentials with forcecalc's Potential interface, and test structures.

The potentials are wrapped in :class:`forcecalc.checkpoint.Potential`, so that forcecalc's ASE
calculator (``load_calculator(potential)``) runs them one structure at a time: the reference
the batched engine is compared with.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import add_adsorbate, bulk, fcc100, fcc111, molecule
from ase.constraints import FixAtoms
from ase.data import covalent_radii
from torch import Tensor, nn
from toy_models import ToyModel

from forcecalc.checkpoint import CheckpointInfo, Potential
from forcecalc.graph import Batch


class MorseModel(ToyModel):
    """Pairwise Morse energy over the batch's edges, forces by autograd.

    ``E = 1/2 sum_edges D [(1 - exp(-a (d - r0)))^2 - 1] fc(d)`` with ``r0`` the sum of the two
    covalent radii (H-H: a weak ``D = 0.05`` eV well at 1.8 Å, so molecules keep their shape)
    and ``fc`` a cosine switch from ``cutoff - 1`` to ``cutoff`` (so edges built
    at ``cutoff + skin`` change nothing).  Edges beyond ``cutoff`` are dropped, as the real
    models do.
    """

    def __init__(self, cutoff: float = 4.0, depth: float = 0.5, stiffness: float = 1.6) -> None:
        super().__init__()
        self.cutoff = cutoff
        self.depth = nn.Parameter(torch.tensor(depth), requires_grad=False)
        self.stiffness = nn.Parameter(torch.tensor(stiffness), requires_grad=False)
        self.radii = nn.Parameter(torch.as_tensor(covalent_radii), requires_grad=False)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """``energy`` ``[n_systems]`` (eV) and ``forces`` ``[n_atoms, 3]`` (eV/Å)."""
        with torch.enable_grad():
            positions = batch.positions.detach().requires_grad_(True)
            vectors = batch.edge_vectors(positions=positions)
            distances = torch.linalg.norm(vectors, dim=1)
            keep = distances <= self.cutoff
            source, target = batch.edge_index[:, keep]
            d = distances[keep]
            r0 = self.radii[batch.numbers[source]] + self.radii[batch.numbers[target]]
            depth = self.depth.expand_as(d)
            hydrogens = (batch.numbers[source] == 1) & (batch.numbers[target] == 1)
            r0 = torch.where(hydrogens, 1.8, r0)
            depth = torch.where(hydrogens, 0.05, depth)
            well = depth * ((1 - torch.exp(-self.stiffness * (d - r0))) ** 2 - 1)
            inner = self.cutoff - 1.0
            t = ((d - inner) / (self.cutoff - inner)).clamp(0, 1)
            switch = 0.5 * (1 + torch.cos(math.pi * t))
            pair = 0.5 * well * switch
            energy = torch.zeros(batch.n_systems, dtype=d.dtype, device=d.device)
            energy = energy.index_add(0, batch.system_idx[target], pair)
            (gradient,) = torch.autograd.grad(energy.sum(), positions)
        return {"energy": energy.detach(), "forces": -gradient}


class HarmonicModel(ToyModel):
    """Every atom tethered to an anchor: ``E = k/2 |r - anchor|^2`` per atom.

    The anchor of an atom is ``anchors[tag]`` (``anchors`` ``[n_anchors, 3]``; give each atom
    its own tag).  Used for thermostat statistics: equipartition holds exactly.
    """

    def __init__(self, anchors: np.ndarray, spring: float = 2.0) -> None:
        super().__init__()
        self.cutoff = 1.0
        self.spring = nn.Parameter(torch.tensor(spring), requires_grad=False)
        self.anchors = nn.Parameter(torch.as_tensor(anchors), requires_grad=False)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """``energy`` ``[n_systems]`` and ``forces`` ``[n_atoms, 3]``."""
        delta = batch.positions - self.anchors[batch.tags]
        per_atom = 0.5 * self.spring * (delta**2).sum(dim=1)
        energy = torch.zeros(batch.n_systems, dtype=delta.dtype, device=delta.device)
        energy = energy.index_add(0, batch.system_idx, per_atom)
        return {"energy": energy, "forces": -self.spring * delta}


def as_potential(model: nn.Module, name: str = "morse") -> Potential:
    """``model`` as a float64 forcecalc Potential (identity normalizers)."""
    info = CheckpointInfo(
        model=name, model_kwargs={}, normalizers=_identity(), source_format="test"
    )
    return Potential(model, info).to(torch.float64)


def _identity():
    from forcecalc.checkpoint import Normalizers

    return Normalizers()


def morse_potential() -> Potential:
    """The Morse test potential in float64."""
    return as_potential(MorseModel())


class MorseVariant(ToyModel):
    """The Morse test potential with outputs a subclass changes (:meth:`outputs`); its cutoff,
    dtype, device and the rest come from the wrapped :func:`morse_potential`.

    Attributes:
        calls: forward passes so far.
    """

    def __init__(self) -> None:
        super().__init__()
        self.inner = morse_potential()
        self.calls = 0

    def __getattr__(self, name: str) -> object:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, batch: Batch, compute_stress: bool = False) -> dict[str, Tensor]:
        self.calls += 1
        return self.outputs(batch)

    def outputs(self, batch: Batch) -> dict[str, Tensor]:
        """The Morse potential's outputs (what a subclass changes)."""
        return self.inner(batch)


def _slab(kind: str, metal: str, size: tuple[int, int, int], adsorbate: str, seed: int) -> Atoms:
    build = fcc111 if kind == "111" else fcc100
    slab = build(metal, size=size, vacuum=6.0)
    site = "fcc" if kind == "111" else "hollow"
    species = molecule(adsorbate) if len(adsorbate) > 1 else adsorbate
    add_adsorbate(slab, species, 1.9, site)
    layers = size[2]
    slab.set_constraint(FixAtoms(indices=[a.index for a in slab if a.tag >= layers - 1]))
    slab.rattle(0.08, seed=seed)
    return slab


def mixed_structures() -> list[Atoms]:
    """20 structures: slabs with FixAtoms and adsorbates, molecules, bulk; 3 to 21 atoms."""
    slabs = [
        _slab("111", "Cu", (2, 2, 3), "O", 1),
        _slab("111", "Cu", (2, 2, 3), "CO", 2),
        _slab("111", "Cu", (2, 2, 3), "OH", 3),
        _slab("100", "Cu", (2, 2, 3), "O", 4),
        _slab("100", "Pt", (2, 2, 3), "CO", 5),
        _slab("111", "Pt", (2, 2, 3), "O", 6),
        _slab("111", "Ag", (2, 2, 4), "O", 7),
        _slab("100", "Ni", (2, 2, 4), "OH", 8),
    ]
    molecules = []
    for k, name in enumerate(["H2O", "CH4", "CO2", "NH3", "C2H6", "CH3OH", "H2", "C6H6"]):
        mol = molecule(name)
        mol.rattle(0.1, seed=10 + k)
        molecules.append(mol)
    bulks = []
    for k, (metal, reps) in enumerate([("Cu", (2, 1, 1)), ("Pt", (1, 1, 2)), ("Al", (2, 2, 1))]):
        crystal = bulk(metal, "fcc", cubic=True).repeat(reps)
        crystal.rattle(0.1, seed=20 + k)
        bulks.append(crystal)
    cluster = Atoms("Cu4", positions=[[0, 0, 0], [2.4, 0, 0], [0, 2.4, 0], [0.2, 0.3, 2.3]])
    cluster.rattle(0.05, seed=30)
    structures = slabs + molecules + bulks + [cluster]
    assert len(structures) == 20
    return structures


def rattled_slab(seed: int, size: tuple[int, int, int] = (2, 2, 3)) -> Atoms:
    """A Cu(111) slab with an O adatom, bottom layer fixed."""
    return _slab("111", "Cu", size, "O", seed)


class OutOfMemoryAbove(nn.Module):
    """Wraps a potential; raises CUDA's out-of-memory error for batches above ``max_atoms``.

    Attributes:
        failures: out-of-memory errors raised.
        largest_success: most atoms in a batch that was evaluated.
        calls: forward calls.
    """

    def __init__(self, potential: Potential, max_atoms: int) -> None:
        super().__init__()
        self.potential = potential
        self.max_atoms = max_atoms
        self.cutoff = potential.cutoff
        self.failures = 0
        self.largest_success = 0
        self.calls = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.potential.dtype

    @property
    def device(self) -> torch.device:
        return self.potential.device

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """The wrapped potential's outputs, or a RuntimeError like CUDA's allocator raises."""
        self.calls += 1
        if batch.n_atoms > self.max_atoms:
            self.failures += 1
            raise RuntimeError(
                "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total "
                "capacity; simulated by the test)"
            )
        self.largest_success = max(self.largest_success, batch.n_atoms)
        return self.potential(batch)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """One torch thread for the module: the test machine's cores are shared and oversubscribed
    intra-op threads slow small tensor operations down by orders of magnitude."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
