"""Evaluation of a model on OC20-EMT splits: the papers' S2EF, IS2RS and IS2RE tables.

* S2EF: the model on every stored frame (or a seeded sample of them) against the stored EMT
  energies and forces.
* IS2RS / IS2RE: each system's initial structure is relaxed with the model (forcecalc's batched
  engine), then compared with the stored EMT-relaxed structure (ADwT, minimum image along the
  stored structure's periodic axes), checked with EMT's own forces at the model's minimum
  (AFbT: ground truth is computable here, unlike in OC20), and its model energy compared with
  the stored relaxed energy (IS2RE).
* The papers' median baselines, fitted on a training split, sit beside them; the training
  split must come from the same generated data set (:func:`check_same_dataset`).

The ``check_*`` functions check a data set's files without building frames or loading a model,
so that a command can refuse bad inputs before any expensive work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from forcecalc import metrics
from forcecalc.checkpoint import Potential
from forcecalc.data.store import label_energy
from forcecalc.predict import model_outputs, predict
from forcecalc.relax.relaxation import MODEL_NOT_FINITE
from forcecalc.warning import warn

if TYPE_CHECKING:
    from ase import Atoms

    from forcecalc.data.store import Dataset

#: Frames of the training split (a seeded sample) the S2EF median baseline is fitted on.
MEDIAN_TRAIN_FRAMES = 20_000
#: The systems-table columns IS2RS / IS2RE read from an evaluated split.
SYSTEM_COLUMNS = ("initial_frame", "relaxed_frame", "relaxed_energy")
#: The root attributes with which the OC20-EMT generator describes the data set a split file
#: belongs to (:func:`forcecalc.data.oc20emt.dataset_attrs`), equal in all its splits.
DATASET_ATTRS = (
    "generator",
    "generator_version",
    "size",
    "seed",
    "config",
    "plan",
    "gas_references",
    "lattice_constants",
    "frame_kinds",
    "energy",
)
#: Atoms whose forces :func:`unlabelled_frames` reads at a time.


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
    """``[F]`` sorted indices of at most ``max_frames`` frames (or systems) of ``n_frames``,
    drawn without replacement by ``seed``."""
    if max_frames is None or max_frames >= n_frames:
        return np.arange(n_frames)
    return np.sort(np.random.default_rng(seed).choice(n_frames, max_frames, replace=False))


def _named(dataset: Any, label: str | None) -> str:
    """How an error names ``dataset``: ``label`` (a command's ``--data FILE``), else its
    path."""
    return label or str(getattr(dataset, "path", "the data set"))


def _difference(key: str, a: Any, b: Any) -> str:
    """Attribute ``key`` differing (``a``, ``b``) for an error message: both values, or only
    the name where one is long (JSON text)."""
    texts = ["(none)" if value is None else repr(value) for value in (a, b)]
    return f"{key} {texts[0]} != {texts[1]}" if max(map(len, texts)) <= 40 else f"{key} differs"


def check_same_dataset(
    train: Any, dataset: Any, train_label: str | None = None, label: str | None = None
) -> None:
    """A ValueError naming both files and the attributes in which they differ, when ``train``
    and ``dataset`` both carry the generator's :data:`DATASET_ATTRS` (a ``generator``
    attribute) but differ in them: splits of two generated data sets (another seed, size or
    generator version), whose in-domain and held-out adsorbates and bulks differ. Files
    without them (user data converted to the store) and frame lists pass.

    Args:
        train, dataset: opened data sets (their ``attrs``).
        train_label, label: how the error names them (default: their paths).
    """
    train_attrs, attrs = getattr(train, "attrs", {}), getattr(dataset, "attrs", {})
    if "generator" not in train_attrs or "generator" not in attrs:
        return
    differing = [
        _difference(key, train_attrs.get(key), attrs.get(key))
        for key in DATASET_ATTRS
        if train_attrs.get(key) != attrs.get(key)
    ]
    if differing:
        train_name = train_label or f"the training split {_named(train, None)}"
        raise ValueError(
            f"{train_name} and {_named(dataset, label)} come from different generated data "
            f"sets ({', '.join(differing)}): use the splits of one `forcecalc data oc20emt` run"
        )


def unlabelled_frames(dataset: Dataset, frames: np.ndarray) -> np.ndarray:
    """``[U]`` those of the ``[F]`` frame indices ``frames`` whose stored energy or forces are
    missing (:meth:`~forcecalc.data.store.Dataset.missing_labels`)."""
    energy, forces = dataset.missing_labels()
    return frames[(energy | forces)[frames]]


def check_frames(
    dataset: Dataset,
    frames: np.ndarray,
    label: str | None = None,
    purpose: str = "to evaluate against",
) -> None:
    """A ValueError naming ``dataset`` (``label``, default its path) if it has no frames, or
    if some of the ``[F]`` frame indices ``frames`` have no stored energy and forces;
    ``purpose`` ends the message."""
    name = _named(dataset, label)
    if len(dataset) == 0:
        raise ValueError(f"{name} has no frames {purpose}")
    missing = unlabelled_frames(dataset, frames)
    if len(missing):
        raise ValueError(
            f"{name}: frames {missing[:10].tolist()} ({len(missing)} of {len(frames)}) have no "
            f"stored energy and forces {purpose}"
        )


def check_is2rs_systems(
    dataset: Dataset, max_systems: int | None = None, seed: int = 0, label: str | None = None
) -> None:
    """A ValueError naming ``dataset`` (``label``, default its path) unless IS2RS and IS2RE
    can read the seeded sample of at most ``max_systems`` of its systems (the sample of
    :func:`evaluate_relaxations`): a systems table with the :data:`SYSTEM_COLUMNS`, whose
    frames exist, and a relaxed energy (column and relaxed frame) for each system."""
    name = _named(dataset, label)
    if dataset.n_systems == 0:
        raise ValueError(
            f"{name} has no systems (initial and relaxed structures) to relax: IS2RS needs an "
            "OC20-EMT split, not converted frames"
        )
    missing = [column for column in SYSTEM_COLUMNS if column not in dataset.systems]
    if missing:
        raise ValueError(
            f"{name}: its systems table lacks {', '.join(missing)}: IS2RS reads each system's "
            f"initial and relaxed frames and relaxed energy ({', '.join(SYSTEM_COLUMNS)}), as an "
            "OC20-EMT split stores them"
        )
    systems = sample_frames(dataset.n_systems, max_systems, seed)
    frames = np.stack([dataset.systems[c][systems] for c in SYSTEM_COLUMNS[:2]]).astype(np.int64)
    outside = systems[((frames < 0) | (frames >= len(dataset))).any(axis=0)]
    if len(outside):
        raise ValueError(
            f"{name}: systems {outside[:10].tolist()} name initial or relaxed frames outside its "
            f"{len(dataset)} frames"
        )
    relaxed_energy = np.asarray(dataset.systems["relaxed_energy"], dtype=np.float64)[systems]
    unknown = systems[
        ~(np.isfinite(relaxed_energy) & np.isfinite(dataset.frames["energy"][frames[1]]))
    ]
    if len(unknown):
        raise ValueError(
            f"{name}: systems {unknown[:10].tolist()} ({len(unknown)} of {len(systems)}) have "
            "no relaxed energy (relaxed_energy, or their relaxed frame's) to score IS2RE against"
        )


def check_is2re_train(train: Dataset, label: str | None = None) -> None:
    """A ValueError naming ``train`` (``label``, default its path) unless it has systems
    with a relaxed_energy each, what the IS2RE median baseline is fitted on."""
    name = _named(train, label)
    energy = train.systems.get("relaxed_energy")
    if energy is None or len(energy) == 0:
        raise ValueError(
            f"{name} has no systems with a relaxed_energy to fit the IS2RE median baseline on "
            "(the systems table of an OC20-EMT split)"
        )
    unknown = np.flatnonzero(~np.isfinite(np.asarray(energy, dtype=np.float64)))
    if len(unknown):
        raise ValueError(
            f"{name}: systems {unknown[:10].tolist()} ({len(unknown)} of {len(energy)}) have no "
            "relaxed_energy to fit the IS2RE median baseline on"
        )


#: The scores of S2EF, IS2RS and IS2RE, None (JSON's null) where no frame or system is left
#: to score (all failed).
S2EF_SCORES = ("energy_mae", "forces_mae", "forces_cos", "efwt")
IS2RS_SCORES = ("adwt", "afbt")
IS2RE_SCORES = ("energy_mae", "ewt")


def warn_left_out(dataset: Any, what: str, reasons: dict[int, str], total: int) -> None:
    """One warning naming the ``what`` (``"frames"``, ``"systems"``) of ``dataset`` that
    failed and are left out of the scores, ``reasons`` ``{index in the data set: why}``
    grouped by why (the first 10 indices of each); none when ``reasons`` is empty."""
    if not reasons:
        return
    grouped: dict[str, list[int]] = {}
    for index in sorted(reasons):
        grouped.setdefault(reasons[index], []).append(index)
    named = "; ".join(
        f"{what} {indices[:10]}{' and more' if len(indices) > 10 else ''}: {why}"
        for why, indices in grouped.items()
    )
    warn(
        f"{_named(dataset, None)}: {len(reasons)} of {total} {what} failed and are left out "
        f"of the scores (counted as 'failed'): {named}"
    )


def evaluate_s2ef(
    potential: Potential,
    dataset: Sequence,
    batch_size: int = 16,
    max_frames: int | None = None,
    seed: int = 0,
) -> dict[str, float | None]:
    """S2EF metrics (free atoms, as OC20) of ``potential`` on the frames of ``dataset``.

    A frame whose model energy or forces are not finite (NaN or inf) is left out of the
    scores, named in a warning (:func:`warn_left_out`, by its place in ``dataset``) and
    counted in ``"failed"``; ``"frames"`` counts the frames evaluated, failed ones included;
    the scores are None when every frame failed."""
    if len(dataset) == 0:
        raise ValueError(f"{getattr(dataset, 'path', 'the data set')} has no frames to evaluate")
    sample = sample_frames(len(dataset), max_frames, seed)
    frames = [dataset[int(i)] for i in sample]
    forces_true, natoms, fixed = stacked_forces(frames)  # the labels checked before the model
    # the model's own outputs, as the labels are read (no restraint energy or force added)
    outputs, reasons = model_outputs(frames, potential, batch_size)
    finite = np.array([k not in reasons for k in range(len(frames))])
    failed = {int(sample[k]): why for k, why in reasons.items()}
    warn_left_out(dataset, "frames", failed, len(frames))
    scores: dict[str, float | None] = dict.fromkeys(S2EF_SCORES)
    if finite.any():
        atoms = np.repeat(finite, natoms)
        scores = metrics.s2ef_metrics(
            np.array([energy for energy, _ in outputs])[finite],
            label_energies(frames)[finite],
            np.concatenate([forces for _, forces in outputs])[atoms],
            forces_true[atoms],
            natoms[finite],
            fixed[atoms],
        )
    return {**scores, "frames": len(frames), "failed": len(failed)}


def median_s2ef_metrics(
    train: Sequence, dataset: Sequence, max_frames: int | None = None, seed: int = 0
) -> dict[str, float]:
    """The S2EF median baseline: training medians of energy and force components (of a
    seeded sample of :data:`MEDIAN_TRAIN_FRAMES` training frames), on the frames of
    ``dataset`` (a sample of at most ``max_frames``, as :func:`evaluate_s2ef`'s)."""
    check_same_dataset(train, dataset)
    if len(train) == 0:
        raise ValueError(f"{_named(train, None)} has no frames to fit the median baseline on")
    train_frames = [train[int(i)] for i in sample_frames(len(train), MEDIAN_TRAIN_FRAMES, seed)]
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
        ``{"systems": n, "failed": n_failed, "is2rs": {...}, "is2re": {...}, "converged":
        fraction, "baseline_initial_structure": {...}}`` where the baseline relaxes nothing
        (ADwT / AFbT of the initial structures, of every system: it depends on no model). A
        system whose relaxation failed (``info["relax_error"]``, or a model energy or forces
        that are not finite) is left out of the model's IS2RS and IS2RE scores, which would
        otherwise score the structure where it stopped, perhaps the unrelaxed initial one,
        as the model's result: it is named in a warning (:func:`warn_left_out`), counted in
        ``"failed"`` and as not converged; the scores are None when every system failed.
    """
    from forcecalc.relax import relax

    check_is2rs_systems(dataset, max_systems, seed)
    systems = sample_frames(dataset.n_systems, max_systems, seed)
    initial = [dataset.initial(int(s)) for s in systems]
    reference = [dataset.relaxed(int(s)) for s in systems]
    relaxed = relax(
        initial, potential, optimizer=optimizer, fmax=fmax, steps=steps, batch_size=batch_size
    )
    failed = {
        int(system): why
        for system, atoms in zip(systems, relaxed, strict=True)
        if (why := _relaxation_failure(atoms)) is not None
    }
    warn_left_out(dataset, "systems", failed, len(systems))
    scored = [k for k, system in enumerate(systems) if int(system) not in failed]
    model, truth = [relaxed[k] for k in scored], [reference[k] for k in scored]
    out: dict[str, Any] = {"systems": len(systems), "failed": len(failed)}
    out["is2rs"] = _is2rs_scores(model, truth) if scored else dict.fromkeys(IS2RS_SCORES)
    out["is2re"] = (
        metrics.is2re_metrics(
            np.array([a.get_potential_energy() for a in model]),
            np.array([a.get_potential_energy() for a in truth]),
        )
        if scored
        else dict.fromkeys(IS2RE_SCORES)
    )
    out["converged"] = float(np.mean([a.info["relax_converged"] for a in relaxed]))
    out["baseline_initial_structure"] = _is2rs_scores(initial, reference)
    return out


def _relaxation_failure(atoms: Atoms) -> str | None:
    """Why the relaxation of ``atoms`` (a :func:`~forcecalc.relax.relax` result) failed: its
    ``info["relax_error"]``, or a final energy or forces that are not finite; None if it
    did not."""
    if "relax_error" in atoms.info:
        return str(atoms.info["relax_error"])
    forces = atoms.get_forces(apply_constraint=False)
    if not (np.isfinite(atoms.get_potential_energy()) and np.isfinite(forces).all()):
        return MODEL_NOT_FINITE
    return None


def _is2rs_scores(structures: Sequence, reference: Sequence) -> dict[str, float]:
    """IS2RS (ADwT, and AFbT with EMT's forces at ``structures``) of ``structures`` against
    the EMT-relaxed ``reference`` structures of the same systems (their cells, periodicity
    and fixed atoms)."""
    natoms = np.array([len(a) for a in reference])
    fixed = np.concatenate([_fixed(a) for a in reference])
    return metrics.is2rs_metrics(
        np.concatenate([a.positions for a in structures]),
        np.concatenate([a.positions for a in reference]),
        np.stack([a.cell.array for a in reference]),
        natoms,
        fixed,
        true_max_forces=metrics.max_free_force(_emt_forces(structures), natoms, fixed),
        pbc=np.stack([a.pbc for a in reference]),
    )


def median_is2re_metrics(
    train: Any, dataset: Any, max_systems: int | None = None, seed: int = 0
) -> dict[str, float]:
    """The IS2RE median baseline: the training median relaxed energy for every system, on the
    same seeded sample of at most ``max_systems`` systems as :func:`evaluate_relaxations`."""
    check_is2re_train(train)
    check_is2rs_systems(dataset, max_systems, seed)
    check_same_dataset(train, dataset)
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
