"""The OC20 evaluation of a model on labelled frames (forcecalc.evaluate)."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import add_adsorbate, fcc111
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms, Hookean
from ocp_fixtures import OCP_DATA

from forcecalc import load_checkpoint, predict
from forcecalc.evaluate import evaluate_s2ef
from forcecalc.metrics import forces_mae


def _frames(free_energy_only: bool = False) -> list:
    """Three EMT-labelled O/Cu(111) slabs (bottom layer fixed), labels stored as ``energy``
    or as ``free_energy`` alone (what some DFT codes' readers give)."""
    frames = []
    for seed in range(3):
        slab = fcc111("Cu", size=(2, 2, 2), vacuum=6.0)
        add_adsorbate(slab, "O", 1.3, "fcc")
        slab.set_constraint(FixAtoms(mask=slab.get_tags() == 2))
        slab.pbc = True
        slab.rattle(0.05, seed=seed)
        slab.calc = EMT()
        energy, forces = slab.get_potential_energy(), slab.get_forces(apply_constraint=False)
        key = "free_energy" if free_energy_only else "energy"
        slab.calc = SinglePointCalculator(slab, **{key: energy, "forces": forces})
        frames.append(slab)
    return frames


def test_s2ef_scores_the_models_predictions_on_free_atoms() -> None:
    """The S2EF metrics are those of the model's predictions against the stored labels, the
    force MAE over free atoms only (OC20's convention), and frames labelled with a free energy
    alone score the same (the rule training reads labels by), as do frames with a restraint
    (Hookean), whose energy belongs to neither the labels nor the model."""
    potential = load_checkpoint(OCP_DATA / "forcenet_small.pt", device="cpu", dtype="float64")
    frames = _frames()
    scores = evaluate_s2ef(potential, frames)
    results = predict(frames, potential, apply_constraint=False)
    predicted = np.concatenate([r["forces"] for r in results])
    labels = np.concatenate([a.get_forces(apply_constraint=False) for a in frames])
    free = np.concatenate([a.get_tags() != 2 for a in frames])
    assert scores["frames"] == 3
    assert scores["forces_mae"] == pytest.approx(forces_mae(predicted, labels, ~free))
    energies = np.array([a.get_potential_energy() for a in frames])
    expected = np.mean(np.abs(np.array([r["energy"] for r in results]) - energies))
    assert scores["energy_mae"] == pytest.approx(expected)
    assert evaluate_s2ef(potential, _frames(free_energy_only=True)) == pytest.approx(scores)
    restrained = _frames()  # a restraint is no part of the labels nor of the model's output
    restrained[0].set_constraint([*restrained[0].constraints, Hookean(8, 0, rt=1.0, k=5.0)])
    assert evaluate_s2ef(potential, restrained) == pytest.approx(scores)


def test_s2ef_refuses_unlabelled_and_empty_data() -> None:
    """Frames without stored labels, and a data set without frames, are errors that say so
    (before the model runs)."""
    potential = load_checkpoint(OCP_DATA / "forcenet_small.pt", device="cpu")
    unlabelled = _frames()
    unlabelled[1].calc = None
    with pytest.raises(ValueError, match=r"frames \[1\] .* no stored energy and forces"):
        evaluate_s2ef(potential, unlabelled)
    with pytest.raises(ValueError, match="has no frames"):
        evaluate_s2ef(potential, [])
