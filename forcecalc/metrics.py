"""OC20's S2EF / IS2RS / IS2RE metrics, as the SpinConv and ForceNet papers report them.

Numpy (cells are checked by the graph builder's rule). Definitions follow OCP's evaluator
(``ocpmodels/modules/evaluator.py``) and trainer:

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
One difference from OCP: ADwT's distances are the true minimum images (the shortest of the
27 neighbouring lattice images), where OCP wraps fractional coordinates only, which is the
minimum image in a right-angled cell and can be longer in a skewed one when an atom moved by
more than half a layer spacing (OC20-EMT ``medium``, the initial structures as predictions:
2 atoms of 4,100 systems, test_ood_both's ADwT 63.93% against 63.82% OCP's way).
Every function checks its arrays' shapes (energies ``[S]``, forces and positions ``[N, 3]``,
``natoms`` ``[S]`` summing to ``N``, masks ``[N]``): a mis-shaped argument is a ValueError naming
it and the shapes, not a broadcast. Position errors wrap along periodic axes only (``pbc``);
along the others (and without a cell) they are plain displacements.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from forcecalc.graph.neighbors import cell_problem

#: S2EF EFwT thresholds: energy (eV), per-component force error (eV/Å).
EFWT_ENERGY_THRESHOLD = 0.02
EFWT_FORCE_THRESHOLD = 0.03
#: IS2RE EwT threshold (eV).
EWT_THRESHOLD = 0.02
#: IS2RS thresholds (Å and eV/Å); arange excludes the end points 0.5 and 0.4 as OCP's does.
ADWT_THRESHOLDS = np.arange(0.01, 0.5, 0.001)
AFBT_THRESHOLDS = np.arange(0.01, 0.4, 0.001)
_COS_EPS = 1e-8


class _Shapes:
    """Checks a function's arrays against shapes such as ``"N,3"``: a digit is that size, a
    letter a size bound by the first array checked with it (later ones must agree), so that a
    mis-shaped argument is a ValueError naming it instead of a broadcast."""

    def __init__(self) -> None:
        self._sizes: dict[str, tuple[int, str]] = {}

    def __call__(self, name: str, value: ArrayLike, spec: str, dtype: Any = None) -> np.ndarray:
        """``value`` as an array of shape ``spec`` (``"S"``, ``"N,3"``, ``"S,3,3"``), else a
        ValueError naming ``name``, its shape and the shape expected."""
        array = np.asarray(value, dtype=dtype)
        dims = spec.split(",")
        expected = [int(d) if d.isdigit() else self._sizes.get(d, (None, ""))[0] for d in dims]
        if array.ndim != len(dims) or any(
            size is not None and size != n for size, n in zip(expected, array.shape, strict=True)
        ):
            letters = [d for d in dict.fromkeys(dims) if d in self._sizes]
            bound = [f"{d} = {self._sizes[d][0]} {self._sizes[d][1]}" for d in letters]
            sizes = f" with {', '.join(bound)}" if bound else ""
            raise ValueError(f"{name} has shape {array.shape}, expected [{', '.join(dims)}]{sizes}")
        for d, n in zip(dims, array.shape, strict=True):
            if not d.isdigit():
                self._sizes.setdefault(d, (n, f"from {name}"))
        return array

    def natoms(self, natoms: ArrayLike) -> np.ndarray:
        """``natoms`` as ``[S]`` int64 non-negative counts summing to the ``N`` bound before."""
        counts = self("natoms", natoms, "S", dtype=np.int64)
        n_atoms, source = self._sizes["N"]
        if (counts < 0).any() or counts.sum() != n_atoms:
            raise ValueError(
                f"natoms {counts.tolist()[:10]} sums to {counts.sum()}, expected non-negative "
                f"counts summing to N = {n_atoms} ({source})"
            )
        return counts

    def free(self, fixed: ArrayLike | None, name: str = "fixed") -> np.ndarray:
        """``[N]`` bool mask of free atoms, from the ``[N]`` ``fixed`` mask (all atoms when it
        is None), ``N`` bound before."""
        if fixed is None:
            return np.ones(self._sizes["N"][0], dtype=bool)
        return ~self(name, fixed, "N", dtype=bool)


def _system_index(natoms: np.ndarray) -> np.ndarray:
    """``[sum(natoms)]`` system of each atom."""
    return np.repeat(np.arange(len(natoms)), natoms)


def energy_mae(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean absolute error of ``[S]`` energies (eV)."""
    check = _Shapes()
    return float(np.mean(np.abs(check("pred", pred, "S") - check("true", true, "S"))))


def energy_within_threshold(
    pred: np.ndarray, true: np.ndarray, threshold: float = EWT_THRESHOLD
) -> float:
    """EwT: fraction of ``[S]`` energies with absolute error below ``threshold`` (eV)."""
    check = _Shapes()
    return float(np.mean(np.abs(check("pred", pred, "S") - check("true", true, "S")) < threshold))


def forces_mae(pred: np.ndarray, true: np.ndarray, fixed: np.ndarray | None = None) -> float:
    """Mean absolute error over all components of the free atoms' ``[N, 3]`` forces
    (``fixed``: ``[N]`` bool)."""
    check = _Shapes()
    pred, true = check("pred", pred, "N,3"), check("true", true, "N,3")
    free = check.free(fixed)
    return float(np.mean(np.abs(pred[free] - true[free])))


def forces_cosine(pred: np.ndarray, true: np.ndarray, fixed: np.ndarray | None = None) -> float:
    """Mean over free atoms of the cosine between ``[N, 3]`` predicted and true forces
    (``fixed``: ``[N]`` bool).

    A zero vector counts as cosine 0 (each norm is clamped at 1e-8, as in torch).
    """
    check = _Shapes()
    pred, true = check("pred", pred, "N,3"), check("true", true, "N,3")
    free = check.free(fixed)
    p = pred.astype(np.float64)[free]
    t = true.astype(np.float64)[free]
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
    check = _Shapes()
    energy_pred = check("energy_pred", energy_pred, "S")
    energy_true = check("energy_true", energy_true, "S")
    forces_pred = check("forces_pred", forces_pred, "N,3")
    forces_true = check("forces_true", forces_true, "N,3")
    natoms = check.natoms(natoms)
    free = check.free(fixed)
    err = np.abs(forces_pred - forces_true).max(axis=1)
    max_err = np.zeros(len(natoms))
    np.maximum.at(max_err, _system_index(natoms)[free], err[free])
    e_ok = np.abs(energy_pred - energy_true) < energy_threshold
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
    # first: it checks every argument's shape, naming them as this function does
    efwt = energy_forces_within_threshold(
        energy_pred, energy_true, forces_pred, forces_true, natoms, fixed
    )
    return {
        "energy_mae": energy_mae(energy_pred, energy_true),
        "forces_mae": forces_mae(forces_pred, forces_true, fixed),
        "forces_cos": forces_cosine(forces_pred, forces_true, fixed),
        "efwt": efwt,
    }


def _lattice(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """The ``[3, 3]`` ``cell`` with the vectors of non-periodic axes (``pbc``: ``[3]``)
    replaced by an orthonormal basis of the space orthogonal to the periodic ones: an
    invertible matrix with the same lattice translations, whatever (zero, say) the
    non-periodic vectors were, in which a displacement's coordinates along the periodic axes
    are those of its projection onto their span. ``cell`` itself when all axes are periodic."""
    if pbc.all():
        return cell
    n_periodic = int(pbc.sum())
    complement = np.linalg.svd(cell[pbc])[2] if n_periodic else np.eye(3)
    lattice = cell.copy()
    lattice[~pbc] = complement[n_periodic:]
    return lattice


def _min_image(displacement: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """``[n]`` lengths of the shortest lattice images of ``[n, 3]`` displacements in a sound
    ``[3, 3]`` cell, periodic along ``pbc`` (``[3]`` bool)."""
    lattice = _lattice(cell, pbc)
    frac = np.linalg.solve(lattice.T, displacement.T).T
    frac[:, pbc] -= np.floor(frac[:, pbc] + 0.5)
    shifts = np.array(np.meshgrid(*[(-1, 0, 1) if p else (0,) for p in pbc], indexing="ij"))
    shifts = shifts.reshape(3, -1).T
    candidates = (frac[:, None, :] + shifts[None, :, :]) @ lattice
    return np.linalg.norm(candidates, axis=2).min(axis=1)


def min_image_distances(
    pred: np.ndarray, true: np.ndarray, cell: np.ndarray, pbc: np.ndarray | None = None
) -> np.ndarray:
    """``[n]`` minimum-image distances between ``[n, 3]`` positions in one ``[3, 3]`` cell.

    Along periodic axes (``pbc``: ``[3]`` bool, default all) the fractional displacement is
    wrapped to [-0.5, 0.5); the result is exact for cells whose minimum image lies in the
    neighbouring cells checked (all 27). Along non-periodic axes the displacement is plain,
    whatever their cell vectors (zero, for a molecule); a cell whose periodic vectors span no
    lattice is a ValueError.
    """
    check = _Shapes()
    pred, true = check("pred", pred, "N,3"), check("true", true, "N,3")
    cell = check("cell", cell, "3,3", dtype=np.float64)
    pbc = np.ones(3, dtype=bool) if pbc is None else check("pbc", pbc, "3", dtype=bool)
    problem = cell_problem(cell[None], pbc[None])
    if problem is not None:
        raise ValueError(f"cell: {problem[1]}")
    return _min_image(pred - true, cell, pbc)


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
        pbc: ``[S, 3]`` or ``[3]`` periodicity (default: periodic on all axes, as OC20); along
            non-periodic axes errors are plain displacements (see :func:`min_image_distances`).
    """
    check = _Shapes()
    positions_pred = check("positions_pred", positions_pred, "N,3")
    positions_true = check("positions_true", positions_true, "N,3")
    cell = check("cell", cell, "S,3,3", dtype=np.float64)
    natoms = check.natoms(natoms)
    free = check.free(fixed)
    if pbc is None:
        pbc_arr = np.ones((len(natoms), 3), dtype=bool)
    elif np.ndim(pbc) == 1:
        pbc_arr = np.broadcast_to(check("pbc", pbc, "3", dtype=bool), (len(natoms), 3))
    else:
        pbc_arr = check("pbc", pbc, "S,3", dtype=bool)
    problem = cell_problem(cell, pbc_arr)
    if problem is not None:
        raise ValueError(f"cell of structure {problem[0]}: {problem[1]}")
    offsets = np.concatenate([[0], np.cumsum(natoms)])
    out = np.empty(len(natoms))
    for s in range(len(natoms)):
        sl = slice(offsets[s], offsets[s + 1])
        keep = free[sl]
        d = _min_image(positions_pred[sl][keep] - positions_true[sl][keep], cell[s], pbc_arr[s])
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
    averaged over ``[T]`` ``thresholds`` (Å); arguments as in :func:`mean_free_distances`."""
    thresholds = _Shapes()("thresholds", thresholds, "T")
    mean_d = mean_free_distances(positions_pred, positions_true, cell, natoms, fixed, pbc)
    return float(np.mean(mean_d[:, None] < thresholds[None, :]))


def max_free_force(
    forces: np.ndarray, natoms: np.ndarray, fixed: np.ndarray | None = None
) -> np.ndarray:
    """``[S]`` largest free-atom force norm of each structure (``[N, 3]`` forces, eV/Å;
    ``natoms`` ``[S]``; ``fixed`` ``[N]`` bool); 0 for a structure without free atoms."""
    check = _Shapes()
    forces = check("forces", forces, "N,3", dtype=np.float64)
    natoms = check.natoms(natoms)
    free = check.free(fixed)
    norms = np.linalg.norm(forces, axis=1)
    out = np.zeros(len(natoms))
    np.maximum.at(out, _system_index(natoms)[free], norms[free])
    return out


def average_forces_below_threshold(
    max_forces: np.ndarray, thresholds: np.ndarray = AFBT_THRESHOLDS
) -> float:
    """AFbT: fraction of ML-relaxed structures whose ground-truth largest free-atom force
    (``[S]``, eV/Å, e.g. from :func:`max_free_force`) is below a threshold, averaged over
    ``[T]`` ``thresholds``."""
    check = _Shapes()
    max_forces = check("max_forces", max_forces, "S")
    thresholds = check("thresholds", thresholds, "T")
    return float(np.mean(max_forces[:, None] < thresholds[None, :]))


def is2rs_metrics(
    positions_pred: np.ndarray,
    positions_true: np.ndarray,
    cell: np.ndarray,
    natoms: np.ndarray,
    fixed: np.ndarray | None = None,
    true_max_forces: np.ndarray | None = None,
    pbc: np.ndarray | None = None,
) -> dict[str, float]:
    """IS2RS metrics: ``adwt`` and, given ground-truth max forces at the predicted relaxed
    structures (``[S]``), ``afbt``. Shapes and ``pbc`` as in :func:`mean_free_distances`."""
    check = _Shapes()
    check("natoms", natoms, "S")
    if true_max_forces is not None:
        check("true_max_forces", true_max_forces, "S")
    out = {
        "adwt": average_distance_within_threshold(
            positions_pred, positions_true, cell, natoms, fixed, pbc
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
    check = _Shapes()
    train_energy = check("train_energy", train_energy, "S")
    train_forces = check("train_forces", train_forces, "N,3")
    free = check.free(train_fixed, "train_fixed")
    return float(np.median(train_energy)), np.median(train_forces[free], axis=0)


def median_is2re_baseline(train_relaxed_energy: np.ndarray) -> float:
    """OC20's IS2RE median baseline: the training median relaxed energy (``[S]``)."""
    return float(np.median(_Shapes()("train_relaxed_energy", train_relaxed_energy, "S")))
