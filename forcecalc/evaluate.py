"""Evaluation of a model on OC20-EMT splits: the papers' S2EF, IS2RS and IS2RE tables.

* S2EF: the model on every stored frame (or a seeded sample of them) against the stored EMT
  energies and forces.
* IS2RS / IS2RE: each system's initial structure is relaxed with the model (forcecalc's batched
  engine), then compared with the stored EMT-relaxed structure (ADwT), checked with EMT's own
  forces at the model's minimum (AFbT: ground truth is computable here, unlike in OC20), and its
  model energy compared with the stored relaxed energy (IS2RE).
* The papers' median baselines, fitted on a training split, sit beside them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from forcecalc import metrics
from forcecalc.checkpoint import Potential
from forcecalc.data.store import label_energy
from forcecalc.predict import predict

if TYPE_CHECKING:
    from ase import Atoms


def stacked_forces(structures: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The labelled (unconstrained) forces of ``structures`` stacked ``[N, 3]``, their atom
    counts ``[S]`` and the fixed-atom mask ``[N]``."""
    unlabelled = [
        k
        for k, a in enumerate(structures)
        if a.calc is None or "forces" not in a.calc.results or label_energy(a.calc.results) is None
    ]
    if unlabelled:
        raise ValueError(
            f"frames {unlabelled[:10]} ({len(unlabelled)} of {len(structures)}) have no stored "
            "energy and forces to evaluate against"
        )
    forces = np.concatenate([a.get_forces(apply_constraint=False) for a in structures])
    natoms = np.array([len(a) for a in structures])
    fixed = np.concatenate([_fixed(a) for a in structures])
    return forces, natoms, fixed


def label_energies(structures: Sequence) -> np.ndarray:
    """``[S]`` the labelled energies of ``structures`` (``energy``, else ``free_energy``, the
    rule training reads labels by)."""
    return np.array([label_energy(a.calc.results) for a in structures])


def _fixed(atoms: Atoms) -> np.ndarray:
    from forcecalc.graph.batch import fixed_mask

    return fixed_mask(atoms)


def sample_frames(n_frames: int, max_frames: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``max_frames`` frames, drawn without replacement by ``seed``."""
    if max_frames is None or max_frames >= n_frames:
        return np.arange(n_frames)
    return np.sort(np.random.default_rng(seed).choice(n_frames, max_frames, replace=False))


def evaluate_s2ef(
    potential: Potential,
    dataset: Sequence,
    batch_size: int = 16,
    max_frames: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """S2EF metrics (free atoms, as OC20) of ``potential`` on the frames of ``dataset``."""
    if len(dataset) == 0:
        raise ValueError(f"{getattr(dataset, 'path', 'the data set')} has no frames to evaluate")
    frames = [dataset[int(i)] for i in sample_frames(len(dataset), max_frames, seed)]
    forces_true, natoms, fixed = stacked_forces(frames)  # the labels checked before the model
    # the model's own outputs, as the labels are read (no restraint energy or force added)
    results = predict(frames, potential, batch_size=batch_size, apply_constraint=False)
    return {
        **metrics.s2ef_metrics(
            np.array([r["energy"] for r in results]),
            label_energies(frames),
            np.concatenate([r["forces"] for r in results]),
            forces_true,
            natoms,
            fixed,
        ),
        "frames": len(frames),
    }


def median_s2ef_metrics(
    train: Sequence, dataset: Sequence, max_frames: int | None = None, seed: int = 0
) -> dict[str, float]:
    """The S2EF median baseline: training medians of energy and force components."""
    train_frames = [train[int(i)] for i in sample_frames(len(train), 20_000, seed)]
    train_forces, _, train_fixed = stacked_forces(train_frames)
    median_energy, median_force = metrics.median_s2ef_baseline(
        label_energies(train_frames), train_forces, train_fixed
    )
    frames = [dataset[int(i)] for i in sample_frames(len(dataset), max_frames, seed)]
    forces_true, natoms, fixed = stacked_forces(frames)
    return metrics.s2ef_metrics(
        np.full(len(frames), median_energy),
        label_energies(frames),
        np.broadcast_to(median_force, forces_true.shape),
        forces_true,
        natoms,
        fixed,
    )


def _emt_forces(structures: Sequence) -> np.ndarray:
    from ase.calculators.emt import EMT

    forces = []
    for atoms in structures:
        atoms = atoms.copy()
        atoms.calc = EMT()
        forces.append(atoms.get_forces(apply_constraint=False))
    return np.concatenate(forces)


def evaluate_relaxations(
    potential: Potential,
    dataset: Any,
    optimizer: str = "lbfgs",
    fmax: float = 0.05,
    steps: int = 300,
    batch_size: int | str = "auto",
    max_systems: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """IS2RS (ADwT, AFbT against EMT) and IS2RE (energy MAE, EwT) of ``potential``.

    Args:
        potential: the model.
        dataset: an OC20-EMT split (:func:`forcecalc.data.open_dataset`), which stores each
            system's initial and EMT-relaxed structure.
        optimizer, fmax, steps, batch_size: of the batched relaxation.
        max_systems: evaluate a seeded sample of at most this many systems.
        seed: of the sample.

    Returns:
        ``{"is2rs": {...}, "is2re": {...}, "converged": fraction, "systems": n,
        "baseline_initial_structure": {...}}`` where the baseline relaxes nothing (ADwT /
        AFbT of the initial structures).
    """
    from forcecalc.relax import relax

    if dataset.n_systems == 0:
        raise ValueError(
            f"{getattr(dataset, 'path', 'the data set')} has no systems (initial and relaxed "
            "structures) to relax: IS2RS needs an OC20-EMT split, not converted frames"
        )
    systems = sample_frames(dataset.n_systems, max_systems, seed)
    initial = [dataset.initial(int(s)) for s in systems]
    reference = [dataset.relaxed(int(s)) for s in systems]
    relaxed = relax(
        initial, potential, optimizer=optimizer, fmax=fmax, steps=steps, batch_size=batch_size
    )
    natoms = np.array([len(a) for a in reference])
    fixed = np.concatenate([_fixed(a) for a in reference])
    cells = np.stack([a.cell.array for a in reference])
    true_positions = np.concatenate([a.positions for a in reference])
    out: dict[str, Any] = {"systems": len(systems)}
    for name, structures in (("model", relaxed), ("initial", initial)):
        max_forces = metrics.max_free_force(_emt_forces(structures), natoms, fixed)
        out[name] = metrics.is2rs_metrics(
            np.concatenate([a.positions for a in structures]),
            true_positions,
            cells,
            natoms,
            fixed,
            true_max_forces=max_forces,
        )
    out["is2rs"] = out.pop("model")
    out["baseline_initial_structure"] = out.pop("initial")
    out["is2re"] = metrics.is2re_metrics(
        np.array([a.get_potential_energy() for a in relaxed]),
        np.array([a.get_potential_energy() for a in reference]),
    )
    out["converged"] = float(np.mean([a.info["relax_converged"] for a in relaxed]))
    return out


def median_is2re_metrics(
    train: Any, dataset: Any, max_systems: int | None = None, seed: int = 0
) -> dict[str, float]:
    """The IS2RE median baseline: the training median relaxed energy for every system, on the
    same seeded sample of at most ``max_systems`` systems as :func:`evaluate_relaxations`."""
    train_energy = np.asarray(train.systems["relaxed_energy"], dtype=np.float64)
    systems = sample_frames(dataset.n_systems, max_systems, seed)
    true = np.asarray(dataset.systems["relaxed_energy"], dtype=np.float64)[systems]
    return metrics.is2re_metrics(
        np.full(len(true), metrics.median_is2re_baseline(train_energy)), true
    )


#: The quick check of a shipped model: OC20-EMT ``tiny`` of this seed (not the training seed).
CHECK_SEED = 7


def check_sample() -> list:
    """Frames for a quick accuracy check: every third frame of OC20-EMT ``tiny`` (seed
    :data:`CHECK_SEED`) test_id and val_id splits, generated on the fly (~10 s on one core)."""
    import tempfile
    from pathlib import Path

    from forcecalc.data import open_dataset
    from forcecalc.data.oc20emt import generate

    with tempfile.TemporaryDirectory(prefix="oc20emt-check-") as folder:
        generate("tiny", folder, seed=CHECK_SEED, workers=1, progress=False)
        frames = []
        for split in ("test_id", "val_id"):
            with open_dataset(Path(folder) / f"{split}.h5") as dataset:
                frames += [dataset[i] for i in range(0, len(dataset), 3)]
    return frames


def check_forces_mae(potential: Potential | str, frames: Sequence | None = None) -> float:
    """Force MAE (free atoms, eV/Å) of ``potential`` on :func:`check_sample` frames."""
    frames = check_sample() if frames is None else frames
    device = "cpu" if isinstance(potential, str) else None
    results = predict(frames, potential, batch_size=8, device=device, apply_constraint=False)
    forces_true, _, fixed = stacked_forces(frames)
    forces_pred = np.concatenate([r["forces"] for r in results])
    return metrics.forces_mae(forces_pred, forces_true, fixed)
