"""Batched evaluation of many structures (forcecalc.predict): the calculator's numbers, one
forward pass per batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from ocp_fixtures import ocp_structures
from test_calculator import FORCENET, _slab
from toy_models import ToyModel

from forcecalc import load_calculator, load_checkpoint, predict


def test_predict_names_the_structure_and_applies_constraints() -> None:
    """predict() takes one Atoms as a list of one, names the structure holding an unknown
    element, and gives the forces that ``atoms.get_forces()`` gives (zero on FixAtoms atoms)."""
    potential = load_checkpoint(FORCENET, device="cpu", dtype="float64")
    atoms = _slab()
    (result,) = predict(atoms, potential)
    atoms.calc = load_calculator(potential)
    np.testing.assert_allclose(result["forces"], atoms.get_forces())
    assert (result["forces"][atoms.constraints[0].index] == 0).all()
    raw = predict([atoms], potential, apply_constraint=False)[0]["forces"]
    assert (raw[atoms.constraints[0].index] != 0).any()
    bad = Atoms("CuAt", positions=[[0, 0, 0], [0, 0, 2]])
    with pytest.raises(ValueError, match=r"structure 1 \(AtCu\): .*At \(atoms \[1\]\)"):
        predict([atoms, bad], potential)
    with pytest.raises(ValueError, match="dtype='float32', but the loaded Potential"):
        predict([atoms], potential, dtype="float32")
    overlapping = atoms.copy()
    overlapping.positions[1] = overlapping.positions[0]
    for batch_size in (2, "auto"):  # named by input place, not by place in a batch
        with pytest.raises(ValueError, match=r"^structure 3 \(Cu8O\): atoms 0 and 1 are 0 Å"):
            predict([atoms] * 3 + [overlapping], potential, batch_size=batch_size)
    for batch_size in ("all", True, 0):
        with pytest.raises(ValueError, match="batch_size must be 'auto' or an integer >= 1"):
            predict([atoms], potential, batch_size=batch_size)
    assert len(predict([atoms] * 3, potential, batch_size=np.int64(2))) == 3


@pytest.mark.parametrize("batch_size", [2, "auto"])
def test_predict_applies_every_constraint_as_atoms_do(batch_size: int | str) -> None:
    """With constraints applied, predict gives what ``atoms.get_potential_energy()`` and
    ``atoms.get_forces()`` give: FixCartesian zeroes the fixed components, a Hookean
    restraint adds its force and its energy (the energy lacked it); a generator of structures
    is evaluated like a list (with "auto" it gave no results)."""
    from ase.constraints import FixCartesian, Hookean

    potential = load_checkpoint(FORCENET, device="cpu", dtype="float64")
    restrained, partly_fixed = _slab(), _slab()
    restrained.set_constraint(Hookean(a1=8, a2=0, rt=1.0, k=5.0))  # O pulled toward atom 0
    partly_fixed.set_constraint(FixCartesian(8, [True, True, False]))
    structures = [restrained, partly_fixed]
    results = predict((a for a in structures), potential, batch_size=batch_size)
    assert len(results) == 2
    for atoms, result in zip(structures, results, strict=True):
        atoms = atoms.copy()
        atoms.calc = load_calculator(potential)
        assert result["energy"] == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
        np.testing.assert_allclose(result["forces"], atoms.get_forces(), atol=1e-9)
    plain = predict(structures, potential, batch_size=batch_size, apply_constraint=False)
    assert plain[0]["energy"] != pytest.approx(results[0]["energy"])  # the restraint's energy
    assert (results[1]["forces"][8, :2] == 0).all() and (plain[1]["forces"][8, :2] != 0).all()


def test_predict_with_an_automatic_batch_size_gives_the_same_results() -> None:
    """``batch_size="auto"`` (batches from the engine's memory model, split on out-of-memory)
    gives each structure's energy and forces, constrained or not, as a fixed batch size does
    (float64: to rounding), in input order."""
    potential = load_checkpoint(FORCENET, device="cpu", dtype="float64")
    structures = [_slab(), molecule("CO", cell=[8.0] * 3, pbc=True), _slab()]
    structures[1].positions += 4.0
    structures[2].rattle(0.05, seed=3)
    for apply_constraint in (True, False):
        fixed = predict(structures, potential, batch_size=2, apply_constraint=apply_constraint)
        auto = predict(structures, potential, batch_size="auto", apply_constraint=apply_constraint)
        for a, b in zip(fixed, auto, strict=True):
            assert a["energy"] == pytest.approx(b["energy"], abs=1e-10)
            np.testing.assert_allclose(a["forces"], b["forces"], atol=1e-10)


def test_predict_equals_the_calculator() -> None:
    """predict() over a batch gives the one-by-one calculator numbers."""
    structures = list(ocp_structures().values())
    potential = load_checkpoint(FORCENET, device="cpu", dtype="float64")
    results = predict(structures, potential, batch_size=4)
    calc = load_calculator(potential)
    for atoms, result in zip(structures, results, strict=True):
        atoms = atoms.copy()
        atoms.calc = calc
        assert result["energy"] == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
        np.testing.assert_allclose(result["forces"], atoms.get_forces(), atol=1e-9)


class _NaNForGold(ToyModel):
    """``E = sum |r|^2 / 2`` per system (forces ``-r``), NaN for every system holding gold."""

    cutoff = 3.0

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones((), dtype=torch.float64), requires_grad=False)

    def forward(self, batch):
        positions = batch.positions * self.scale
        per_atom = 0.5 * (positions**2).sum(dim=1)
        energy = torch.zeros(batch.n_systems, dtype=positions.dtype)
        energy = energy.index_add(0, batch.system_idx, per_atom)
        gold = torch.zeros(batch.n_systems, dtype=torch.bool)
        gold[batch.system_idx[batch.numbers == 79]] = True
        nan = torch.tensor(float("nan"), dtype=energy.dtype)
        forces = torch.where(gold[batch.system_idx, None], nan, -positions)
        return {"energy": torch.where(gold, nan, energy), "forces": forces}


@pytest.mark.parametrize("batch_size", [4, "auto"])
def test_a_structure_the_model_fails_on_gets_nan_and_the_others_their_results(batch_size):
    """A structure whose model output is NaN gets NaN energy and forces from ``predict``, and
    a warning names it; the structures batched with it get exactly their results without it
    (a screening loses none to another's failure)."""
    from forcecalc import ForcecalcWarning
    from forcecalc.checkpoint import CheckpointInfo, Normalizers, Potential

    info = CheckpointInfo("test", {}, Normalizers(), "test")
    potential = Potential(_NaNForGold(), info)
    good = [molecule("H2O"), molecule("CH4")]
    for atoms in good:
        atoms.center(vacuum=4.0)
    gold = Atoms("Au2", positions=[[4.0, 4.0, 4.0], [6.4, 4.0, 4.0]], cell=[10, 10, 10])
    alone = predict(good, potential, batch_size=batch_size)
    with pytest.warns(ForcecalcWarning) as warned:
        mixed = predict([good[0], gold, good[1]], potential, batch_size=batch_size)
    assert len(warned) == 1
    assert str(warned[0].message) == (
        "1 of 3 structures have NaN or infinite energy and forces: structure 1 (Au2): "
        "the model's energy or forces are not finite (NaN or inf)"
    )
    assert np.isnan(mixed[1]["energy"]) and np.isnan(mixed[1]["forces"]).all()
    for a, b in zip([mixed[0], mixed[2]], alone, strict=True):
        assert a["energy"] == b["energy"]
        np.testing.assert_array_equal(a["forces"], b["forces"])


class _OutOfMemoryAbove8(_NaNForGold):
    """``_NaNForGold``'s energies (no gold here), and CUDA's out-of-memory error for batches
    of more than 8 atoms."""

    def forward(self, batch):
        if batch.n_atoms > 8:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return super().forward(batch)


def test_a_structure_too_large_even_alone_gets_nan_and_a_warning():
    """``predict(batch_size="auto")``: a structure that does not fit in memory even alone
    (a simulated out-of-memory error above 8 atoms) gets NaN energy and forces and a warning
    naming it; the others their own results (it raised, losing them all)."""
    from forcecalc import ForcecalcWarning
    from forcecalc.checkpoint import CheckpointInfo, Normalizers, Potential

    potential = Potential(_OutOfMemoryAbove8(), CheckpointInfo("test", {}, Normalizers(), "test"))
    small = [molecule("H2O"), molecule("CH4")]
    for atoms in small:
        atoms.center(vacuum=4.0)
    large = Atoms("Cu9", positions=np.arange(27).reshape(9, 3) * 0.5, cell=[20, 20, 20])
    with pytest.warns(ForcecalcWarning, match=r"out of memory for structure 1 \(Cu9\) alone"):
        mixed = predict([small[0], large, small[1]], potential, batch_size="auto")
    assert np.isnan(mixed[1]["energy"]) and np.isnan(mixed[1]["forces"]).all()
    alone = predict(small, potential, batch_size="auto")
    for a, b in zip([mixed[0], mixed[2]], alone, strict=True):
        assert a["energy"] == b["energy"]
        np.testing.assert_array_equal(a["forces"], b["forces"])
