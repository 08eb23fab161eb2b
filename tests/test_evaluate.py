"""The OC20 evaluation of a model on labelled frames (forcecalc.evaluate)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import add_adsorbate, fcc111
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms, Hookean
from ocp_fixtures import OCP_DATA
from toy_models import ToyModel

from forcecalc import ForcecalcWarning, load_checkpoint, predict
from forcecalc.checkpoint import CheckpointInfo, Normalizers, Potential
from forcecalc.data.oc20emt import dataset_attrs
from forcecalc.data.store import FrameBatch, open_dataset, write_dataset
from forcecalc.evaluate import (
    DATASET_ATTRS,
    check_same_dataset,
    evaluate_relaxations,
    evaluate_s2ef,
    median_is2re_metrics,
)
from forcecalc.metrics import ADWT_THRESHOLDS, forces_mae


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


def _write_split(path: Path, pairs: list[tuple[Atoms, Atoms]], attrs: Any = None) -> Path:
    """An IS2RS split file of (initial, relaxed) structure pairs: EMT-labelled frames 2s and
    2s+1 of system s, and the systems table IS2RS reads; root attributes ``attrs``."""
    frames = []
    for structure in (atoms for pair in pairs for atoms in pair):
        atoms = structure.copy()
        atoms.calc = EMT()
        energy, forces = atoms.get_potential_energy(), atoms.get_forces(apply_constraint=False)
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        frames.append(atoms)
    systems = np.arange(len(pairs))
    table = {
        "initial_frame": 2 * systems,
        "relaxed_frame": 2 * systems + 1,
        "relaxed_energy": [frames[2 * s + 1].get_potential_energy() for s in systems],
    }
    return write_dataset(
        path, FrameBatch.from_atoms(frames, system=systems.repeat(2)), table, attrs
    )


def _cluster() -> tuple[Atoms, Atoms]:
    """A Cu4 tetrahedron without a cell (pbc False, zero cell), and it with atom 0 moved by
    0.0902 Å (mean displacement 0.02255 Å)."""
    relaxed = Atoms("Cu4", positions=[[0, 0, 0], [2.5, 0, 0], [1.25, 2.1, 0], [1.25, 0.7, 2.0]])
    initial = relaxed.copy()
    initial.positions[0] += [0.0902, 0, 0]
    return initial, relaxed


def test_relaxations_use_each_systems_periodicity(tmp_path: Path) -> None:
    """evaluate_relaxations scores each system with its stored pbc: a molecule without a cell
    (pbc False, zero cell: a singular matrix before) by its atoms' plain displacements, a
    periodic slab whose atom sits one lattice vector (plus 0.0902 Å) away by minimum images;
    ADwT of both (0 steps: the model's structures are the initial ones)."""
    slab = fcc111("Cu", size=(2, 2, 2), vacuum=5.0, periodic=True)
    del slab.info["adsorbate_info"]  # which the store does not keep
    moved = slab.copy()
    moved.positions[-1] += slab.cell[0] + [0.0902, 0, 0]  # mean over 8 atoms: 0.011275 Å
    path = _write_split(tmp_path / "mixed.h5", [_cluster(), (moved, slab)])
    potential = load_checkpoint(OCP_DATA / "forcenet_small.pt", device="cpu", dtype="float64")
    with open_dataset(path) as dataset:
        scores = evaluate_relaxations(potential, dataset, steps=0)
    want = np.mean([np.mean(d < ADWT_THRESHOLDS) for d in (0.02255, 0.011275)])
    assert scores["is2rs"]["adwt"] == pytest.approx(want)
    assert scores["baseline_initial_structure"]["adwt"] == pytest.approx(want)


def test_splits_of_two_generated_data_sets_are_refused(tmp_path: Path) -> None:
    """A training split and a split that both carry the generator's data-set attributes
    (DATASET_ATTRS, what forcecalc.data.oc20emt writes) but differ in them (another seed) are
    refused by check_same_dataset and the IS2RE median baseline, naming both files and the
    attributes; splits of one data set pass, and so do files without the attributes
    (converted user data)."""
    assert set(DATASET_ATTRS) == set(dataset_attrs("tiny", 0))
    pair = [_cluster()]
    seed0, seed1 = dataset_attrs("tiny", 0), dataset_attrs("tiny", 1)
    test = open_dataset(_write_split(tmp_path / "test_id.h5", pair, {**seed0, "split": "test_id"}))
    train = open_dataset(_write_split(tmp_path / "train.h5", pair, {**seed0, "split": "train"}))
    other = open_dataset(_write_split(tmp_path / "s1" / "train.h5", pair, {**seed1, "split": "x"}))
    user = open_dataset(_write_split(tmp_path / "user.h5", pair))
    check_same_dataset(train, test)
    check_same_dataset(other, user)
    check_same_dataset(user, test)
    assert median_is2re_metrics(train, test)["energy_mae"] == 0.0
    message = (
        r"s1/train.h5 and \S*/test_id.h5 come from different generated data sets \(seed 1 != 0"
    )
    with pytest.raises(ValueError, match=message):
        check_same_dataset(other, test)
    with pytest.raises(ValueError, match=message):
        median_is2re_metrics(other, test)


class _FailsOnGold(ToyModel):
    """Zero energy and forces (nothing moves), NaN for every system holding gold: a model
    that fails on some systems only."""

    cutoff = 3.0

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones((), dtype=torch.float64), requires_grad=False)

    def forward(self, batch):
        gold = torch.zeros(batch.n_systems, dtype=torch.bool)
        gold[batch.system_idx[batch.numbers == 79]] = True
        energy = torch.where(gold, torch.nan, 0.0).to(torch.float64) * self.scale
        forces = torch.where(gold[batch.system_idx, None], torch.nan, 0.0) * batch.positions
        return {"energy": energy, "forces": forces}


def _fails_on_gold() -> Potential:
    return Potential(_FailsOnGold(), CheckpointInfo("test", {}, Normalizers(), "test"))


def _gold(atoms: Atoms) -> Atoms:
    """``atoms`` (with its labels, if any) with every Cu made Au."""
    gold = atoms.copy()
    gold.numbers[gold.numbers == 29] = 79
    if atoms.calc is not None:
        gold.calc = SinglePointCalculator(gold, **atoms.calc.results)
    return gold


def test_s2ef_leaves_the_frames_the_model_fails_on_out_and_counts_them() -> None:
    """A frame whose model energy or forces are not finite is left out of the S2EF scores
    (not a NaN score for the whole split), named in one warning by its place in the data set
    (not a second one by its place in the evaluated sample) and counted as failed: the scores
    are those of the other frames alone; with every frame failed, no score (None), never
    NaN."""
    potential, frames = _fails_on_gold(), _frames()
    mixed = [frames[0], _gold(frames[1]), frames[1], frames[2]]
    with pytest.warns(ForcecalcWarning) as warned:
        scores = evaluate_s2ef(potential, mixed)
    assert [str(w.message) for w in warned] == [
        "the data set: 1 of 4 frames failed and are left out of the scores (counted as "
        "'failed'): frames [1]: the model's energy or forces are not finite (NaN or inf)"
    ]
    assert scores == evaluate_s2ef(potential, frames) | {"frames": 4, "failed": 1}
    with pytest.warns(ForcecalcWarning):
        none = evaluate_s2ef(potential, [_gold(frames[0])])
    assert none == {key: None for key in ("energy_mae", "forces_mae", "forces_cos", "efwt")} | {
        "frames": 1,
        "failed": 1,
    }


def test_relaxations_the_model_fails_on_are_left_out_and_counted(tmp_path: Path) -> None:
    """A system whose relaxation failed (here the model's NaN output at its first
    evaluation) is left out of the IS2RS and IS2RE scores, never scored as the model's result
    where it stopped (its unrelaxed initial structure, whose ADwT counted before), named in
    a warning by its system index and counted as failed and unconverged: the scores are those
    of the other systems alone; the initial-structure baseline scores every system."""
    cluster = _cluster()
    gold = (_gold(cluster[0]), _gold(cluster[1]))
    potential = _fails_on_gold()
    with open_dataset(_write_split(tmp_path / "mixed.h5", [cluster, gold])) as dataset:
        with pytest.warns(ForcecalcWarning, match=r"mixed.h5: 1 of 2 systems failed") as warned:
            scores = evaluate_relaxations(potential, dataset)
        forcenet = load_checkpoint(OCP_DATA / "forcenet_small.pt", device="cpu")
        everything = evaluate_relaxations(forcenet, dataset, steps=0)  # fails on none
    assert len(warned) == 1
    assert "systems [1]: the model's energy or forces are not finite" in str(warned[0].message)
    with open_dataset(_write_split(tmp_path / "alone.h5", [cluster])) as dataset:
        alone = evaluate_relaxations(potential, dataset)
    assert scores["failed"] == 1 and scores["systems"] == 2 and scores["converged"] == 0.5
    assert scores["is2rs"] == alone["is2rs"] and scores["is2re"] == alone["is2re"]
    assert scores["baseline_initial_structure"] == everything["baseline_initial_structure"]
