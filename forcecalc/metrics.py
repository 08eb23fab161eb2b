"""OC20's S2EF / IS2RS / IS2RE metrics, as the SpinConv and ForceNet papers report them.

Pure numpy. Definitions follow OCP's evaluator (``ocpmodels/modules/evaluator.py``) and trainer:

- S2EF: forces are evaluated on free atoms only (``fixed`` False); ``forces_mae`` is the mean
  absolute error over all their Cartesian components; ``forces_cos`` the mean over free atoms of
  the cosine between predicted and true force vectors; ``energy_mae`` is over frames; ``efwt``
  is the fraction of frames whose energy error is below 0.02 eV and whose largest absolute
  force-component error over free atoms is below 0.03 eV/Å (OCP takes the max over components,
  not over per-atom error norms).
- IS2RS: ``adwt`` is, for each threshold in ``np.arange(0.01, 0.5, 0.001)`` Å, the fraction of
  structures whose mean over free atoms of the minimum-image distance between predicted and true
  positions is below it, averaged over thresholds. ``afbt`` is, for each threshold in
  ``np.arange(0.01, 0.4, 0.001)`` eV/Å, the fraction of ML-relaxed structures whose ground-truth
  largest free-atom force norm is below it, averaged over thresholds.
- IS2RE: ``energy_mae`` and ``ewt`` (fraction of structures with error below 0.02 eV).
- Median baselines (OC20): S2EF predicts the training median energy for every frame and the
  per-component training median force (over free atoms) for every free atom; IS2RE predicts the
  training median relaxed energy. IS2RS has no median baseline in OC20; the trivial baseline
  used here predicts the initial structure unchanged (see :func:`is2rs_metrics`).

Every threshold comparison is strict (``<``), as in OCP. Results are fractions, not percent.
"""

from __future__ import annotations

import numpy as np

#: S2EF EFwT thresholds: energy (eV), per-component force error (eV/Å).
EFWT_ENERGY_THRESHOLD = 0.02
EFWT_FORCE_THRESHOLD = 0.03
#: IS2RE EwT threshold (eV).
EWT_THRESHOLD = 0.02
#: IS2RS thresholds (Å and eV/Å); arange excludes the end points 0.5 and 0.4 as OCP's does.
ADWT_THRESHOLDS = np.arange(0.01, 0.5, 0.001)
AFBT_THRESHOLDS = np.arange(0.01, 0.4, 0.001)
_COS_EPS = 1e-8


def _free(n: int, fixed: np.ndarray | None) -> np.ndarray:
    """``[n]`` bool mask of free atoms (all when ``fixed`` is None)."""
    if fixed is None:
        return np.ones(n, dtype=bool)
    fixed = np.asarray(fixed, dtype=bool)
    if fixed.shape != (n,):
        raise ValueError(f"fixed has shape {fixed.shape}, expected ({n},)")
    return ~fixed


def _system_index(natoms: np.ndarray) -> np.ndarray:
    """``[sum(natoms)]`` system of each atom."""
    return np.repeat(np.arange(len(natoms)), natoms)


def energy_mae(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean absolute error of ``[S]`` energies (eV)."""
    return float(np.mean(np.abs(np.asarray(pred) - np.asarray(true))))


def energy_within_threshold(
    pred: np.ndarray, true: np.ndarray, threshold: float = EWT_THRESHOLD
) -> float:
    """EwT: fraction of ``[S]`` energies with absolute error below ``threshold`` (eV)."""
    return float(np.mean(np.abs(np.asarray(pred) - np.asarray(true)) < threshold))


def forces_mae(pred: np.ndarray, true: np.ndarray, fixed: np.ndarray | None = None) -> float:
    """Mean absolute error over all components of the free atoms' ``[N, 3]`` forces."""
    free = _free(len(true), fixed)
    return float(np.mean(np.abs(np.asarray(pred)[free] - np.asarray(true)[free])))


def forces_cosine(pred: np.ndarray, true: np.ndarray, fixed: np.ndarray | None = None) -> float:
    """Mean over free atoms of the cosine between ``[N, 3]`` predicted and true forces.

    A zero vector counts as cosine 0 (each norm is clamped at 1e-8, as in torch).
    """
    free = _free(len(true), fixed)
    p = np.asarray(pred, dtype=np.float64)[free]
    t = np.asarray(true, dtype=np.float64)[free]
    norms = np.maximum(np.linalg.norm(p, axis=1), _COS_EPS) * np.maximum(
        np.linalg.norm(t, axis=1), _COS_EPS
    )
    return float(np.mean(np.sum(p * t, axis=1) / norms))


def energy_forces_within_threshold(
    energy_pred: np.ndarray,
    energy_true: np.ndarray,
    forces_pred: np.ndarray,
    forces_true: np.ndarray,
    natoms: np.ndarray,
    fixed: np.ndarray | None = None,
    energy_threshold: float = EFWT_ENERGY_THRESHOLD,
    force_threshold: float = EFWT_FORCE_THRESHOLD,
) -> float:
    """EFwT: fraction of frames with energy error < 0.02 eV and max force error < 0.03 eV/Å.

    Args:
        energy_pred, energy_true: ``[S]`` energies (eV).
        forces_pred, forces_true: ``[N, 3]`` forces of all atoms, frames concatenated.
        natoms: ``[S]`` atoms per frame (sums to N).
        fixed: ``[N]`` bool; the force criterion uses free atoms only (a frame without free
            atoms passes it).
    """
    natoms = np.asarray(natoms, dtype=np.int64)
    free = _free(int(natoms.sum()), fixed)
    err = np.abs(np.asarray(forces_pred) - np.asarray(forces_true)).max(axis=1)
    max_err = np.zeros(len(natoms))
    np.maximum.at(max_err, _system_index(natoms)[free], err[free])
    e_ok = np.abs(np.asarray(energy_pred) - np.asarray(energy_true)) < energy_threshold
    return float(np.mean(e_ok & (max_err < force_threshold)))


def s2ef_metrics(
    energy_pred: np.ndarray,
    energy_true: np.ndarray,
    forces_pred: np.ndarray,
    forces_true: np.ndarray,
    natoms: np.ndarray,
    fixed: np.ndarray | None = None,
) -> dict[str, float]:
    """All S2EF metrics: ``energy_mae``, ``forces_mae``, ``forces_cos``, ``efwt`` (see the
    module docstring; shapes as in :func:`energy_forces_within_threshold`)."""
    return {
        "energy_mae": energy_mae(energy_pred, energy_true),
        "forces_mae": forces_mae(forces_pred, forces_true, fixed),
        "forces_cos": forces_cosine(forces_pred, forces_true, fixed),
        "efwt": energy_forces_within_threshold(
            energy_pred, energy_true, forces_pred, forces_true, natoms, fixed
        ),
    }


def min_image_distances(
    pred: np.ndarray, true: np.ndarray, cell: np.ndarray, pbc: np.ndarray | None = None
) -> np.ndarray:
    """``[n]`` minimum-image distances between ``[n, 3]`` positions in one ``[3, 3]`` cell.

    Along periodic axes the fractional displacement is wrapped to [-0.5, 0.5); the result is
    exact for cells whose minimum image lies in the neighbouring cells checked (all 27).
    """
    pbc = np.ones(3, dtype=bool) if pbc is None else np.asarray(pbc, dtype=bool)
    cell = np.asarray(cell, dtype=np.float64)
    frac = np.linalg.solve(cell.T, (np.asarray(pred) - np.asarray(true)).T).T
    frac[:, pbc] -= np.floor(frac[:, pbc] + 0.5)
    shifts = np.array(np.meshgrid(*[(-1, 0, 1) if p else (0,) for p in pbc], indexing="ij"))
    shifts = shifts.reshape(3, -1).T
    candidates = (frac[:, None, :] + shifts[None, :, :]) @ cell
    return np.linalg.norm(candidates, axis=2).min(axis=1)


def mean_free_distances(
    positions_pred: np.ndarray,
    positions_true: np.ndarray,
    cell: np.ndarray,
    natoms: np.ndarray,
    fixed: np.ndarray | None = None,
    pbc: np.ndarray | None = None,
) -> np.ndarray:
    """``[S]`` mean over free atoms of the minimum-image position error of each structure.

    Args:
        positions_pred, positions_true: ``[N, 3]`` positions, structures concatenated (Å).
        cell: ``[S, 3, 3]`` cells (rows are lattice vectors).
        natoms: ``[S]`` atoms per structure.
        fixed: ``[N]`` bool; fixed atoms are left out (OC20 evaluates free atoms).
        pbc: ``[S, 3]`` or ``[3]`` periodicity (default: periodic on all axes, as OC20).
    """
    natoms = np.asarray(natoms, dtype=np.int64)
    free = _free(int(natoms.sum()), fixed)
    offsets = np.concatenate([[0], np.cumsum(natoms)])
    pbc_arr = np.ones((len(natoms), 3), dtype=bool) if pbc is None else np.asarray(pbc, bool)
    pbc_arr = np.broadcast_to(pbc_arr, (len(natoms), 3))
    out = np.empty(len(natoms))
    for s in range(len(natoms)):
        sl = slice(offsets[s], offsets[s + 1])
        keep = free[sl]
        d = min_image_distances(
            np.asarray(positions_pred)[sl][keep],
            np.asarray(positions_true)[sl][keep],
            cell[s],
            pbc_arr[s],
        )
        out[s] = d.mean() if len(d) else 0.0
    return out


def average_distance_within_threshold(
    positions_pred: np.ndarray,
    positions_true: np.ndarray,
    cell: np.ndarray,
    natoms: np.ndarray,
    fixed: np.ndarray | None = None,
    pbc: np.ndarray | None = None,
    thresholds: np.ndarray = ADWT_THRESHOLDS,
) -> float:
    """ADwT: fraction of structures whose mean free-atom position error is below a threshold,
    averaged over ``thresholds`` (Å); arguments as in :func:`mean_free_distances`."""
    mean_d = mean_free_distances(positions_pred, positions_true, cell, natoms, fixed, pbc)
    return float(np.mean(mean_d[:, None] < np.asarray(thresholds)[None, :]))


def max_free_force(
    forces: np.ndarray, natoms: np.ndarray, fixed: np.ndarray | None = None
) -> np.ndarray:
    """``[S]`` largest free-atom force norm of each structure (``[N, 3]`` forces, eV/Å);
    0 for a structure without free atoms."""
    natoms = np.asarray(natoms, dtype=np.int64)
    free = _free(int(natoms.sum()), fixed)
    norms = np.linalg.norm(np.asarray(forces, dtype=np.float64), axis=1)
    out = np.zeros(len(natoms))
    np.maximum.at(out, _system_index(natoms)[free], norms[free])
    return out


def average_forces_below_threshold(
    max_forces: np.ndarray, thresholds: np.ndarray = AFBT_THRESHOLDS
) -> float:
    """AFbT: fraction of ML-relaxed structures whose ground-truth largest free-atom force
    (``[S]``, eV/Å, e.g. from :func:`max_free_force`) is below a threshold, averaged over
    ``thresholds``."""
    return float(np.mean(np.asarray(max_forces)[:, None] < np.asarray(thresholds)[None, :]))


def is2rs_metrics(
    positions_pred: np.ndarray,
    positions_true: np.ndarray,
    cell: np.ndarray,
    natoms: np.ndarray,
    fixed: np.ndarray | None = None,
    true_max_forces: np.ndarray | None = None,
) -> dict[str, float]:
    """IS2RS metrics: ``adwt`` and, given ground-truth max forces at the predicted relaxed
    structures (``[S]``), ``afbt``. Shapes as in :func:`mean_free_distances`."""
    out = {
        "adwt": average_distance_within_threshold(
            positions_pred, positions_true, cell, natoms, fixed
        )
    }
    if true_max_forces is not None:
        out["afbt"] = average_forces_below_threshold(true_max_forces)
    return out


def is2re_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """IS2RE metrics of ``[S]`` relaxed energies: ``energy_mae`` and ``ewt``."""
    return {"energy_mae": energy_mae(pred, true), "ewt": energy_within_threshold(pred, true)}


def median_s2ef_baseline(
    train_energy: np.ndarray, train_forces: np.ndarray, train_fixed: np.ndarray | None = None
) -> tuple[float, np.ndarray]:
    """OC20's S2EF median baseline fitted on training data.

    Args:
        train_energy: ``[S]`` training frame energies.
        train_forces: ``[N, 3]`` training forces.
        train_fixed: ``[N]`` bool; the force median is over free atoms.

    Returns:
        The median energy, and the ``[3]`` per-component median force; the baseline predicts
        them for every frame and every atom.
    """
    free = _free(len(train_forces), train_fixed)
    return float(np.median(train_energy)), np.median(np.asarray(train_forces)[free], axis=0)


def median_is2re_baseline(train_relaxed_energy: np.ndarray) -> float:
    """OC20's IS2RE median baseline: the training median relaxed energy."""
    return float(np.median(train_relaxed_energy))
