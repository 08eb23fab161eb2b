"""OC20 metrics against hand-computed values on small arrays."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from forcecalc import metrics as m


def test_energy_mae_and_ewt() -> None:
    """Energy MAE is the mean absolute error; EwT counts errors strictly below 0.02 eV."""
    assert m.energy_mae(np.array([1.0, 2.0, 3.0]), np.array([1.5, 2.0, 2.0])) == pytest.approx(0.5)
    pred = np.array([0.0, 0.01, 0.03, -0.0199, 0.25])
    true = np.array([0.0, 0.0, 0.0, 0.0, 0.23])  # errors 0, .01, .03, .0199, .02 (not < .02)
    assert m.energy_within_threshold(np.array([0.02]), np.array([0.0])) == 0.0
    assert m.energy_within_threshold(pred[:4], true[:4]) == 0.75
    assert m.is2re_metrics(pred[:4], true[:4]) == pytest.approx(
        {"energy_mae": (0.01 + 0.03 + 0.0199) / 4, "ewt": 0.75}
    )


def test_forces_mae_and_cosine_on_free_atoms() -> None:
    """Force MAE averages |error| over the free atoms' components; the cosine averages over
    free atoms, with a zero vector counting as 0."""
    true = np.array([[1.0, 0, 0], [0, 2, 0], [5, 5, 5]])
    pred = np.array([[0.0, 0, 0], [0, 1, 0], [0, 0, 0]])
    fixed = np.array([False, False, True])
    assert m.forces_mae(pred, true, fixed) == pytest.approx(2 / 6)
    assert m.forces_mae(pred, true) == pytest.approx((2 + 15) / 9)
    pred = np.array([[1.0, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    true = np.array([[2.0, 0, 0], [0, -3, 0], [1, 0, 0], [1, 2, 3]])
    assert m.forces_cosine(pred, true) == pytest.approx((1 - 1 + 2**-0.5 + 0) / 4)
    fixed = np.array([False, True, False, True])
    assert m.forces_cosine(pred, true, fixed) == pytest.approx((1 + 2**-0.5) / 2)


def test_efwt() -> None:
    """EFwT: a frame succeeds when its energy error is < 0.02 eV and its largest absolute
    force-component error over free atoms is < 0.03 eV/Å (fixed atoms ignored)."""
    natoms = np.array([3, 2, 2])
    e_true = np.zeros(3)
    e_pred = np.array([0.019, 0.0, 0.025])
    f_true = np.zeros((7, 3))
    f_pred = np.zeros((7, 3))
    f_pred[0] = [0.029, -0.029, 0.0]  # frame 0: within
    f_pred[2] = [9.0, 9.0, 9.0]  # frame 0: fixed atom, ignored
    f_pred[4] = [0.0, 0.0, -0.031]  # frame 1: force error too large
    fixed = np.array([False, False, True, False, False, False, False])
    assert m.energy_forces_within_threshold(e_pred, e_true, f_pred, f_true, natoms, fixed) == (
        pytest.approx(1 / 3)
    )  # frame 2 fails on energy
    assert m.energy_forces_within_threshold(e_pred, e_true, f_pred, f_true, natoms) == 0.0
    out = m.s2ef_metrics(e_pred, e_true, f_pred, f_true, natoms, fixed)
    assert out["efwt"] == pytest.approx(1 / 3)
    assert out["energy_mae"] == pytest.approx((0.019 + 0.025) / 3)
    assert out["forces_mae"] == pytest.approx((0.058 + 0.031) / 18)


def test_min_image_distances_match_brute_force() -> None:
    """PBC-aware distances equal the minimum over explicit images, also in a skewed cell;
    non-periodic axes are not wrapped."""
    rng = np.random.default_rng(0)
    cell = np.array([[4.0, 0, 0], [3.2, 2.5, 0], [0.4, 0.3, 12.0]])
    true = rng.uniform(0, 4, (50, 3))
    pred = true + rng.uniform(-6, 6, (50, 3))
    images = np.array(list(itertools.product(range(-3, 4), repeat=3))) @ cell
    brute = np.linalg.norm((pred - true)[:, None, :] + images[None], axis=2).min(axis=1)
    np.testing.assert_allclose(m.min_image_distances(pred, true, cell), brute, atol=1e-12)
    pbc = np.array([True, True, False])
    images_2d = np.array([(i, j, 0) for i in range(-3, 4) for j in range(-3, 4)]) @ cell
    brute_2d = np.linalg.norm((pred - true)[:, None, :] + images_2d[None], axis=2).min(axis=1)
    np.testing.assert_allclose(m.min_image_distances(pred, true, cell, pbc), brute_2d, atol=1e-12)


def test_adwt() -> None:
    """ADwT over 490 thresholds 0.01..0.499 Å: a structure whose free atoms moved 0.01 Å
    across the periodic boundary and 0 Å (mean 0.005) counts at every threshold, one with mean
    0.1005 Å at the 399 thresholds above it; fixed atoms are left out."""
    assert len(m.ADWT_THRESHOLDS) == 490 and len(m.AFBT_THRESHOLDS) == 390
    cell = np.stack([np.eye(3) * 10.0] * 2)
    true = np.array([[0.005, 1, 1], [2, 2, 2], [3, 3, 3], [1, 1, 1], [4, 4, 4]])
    pred = true.copy()
    pred[0, 0] = 9.995  # 0.01 Å away through the boundary
    pred[2] += 3.0  # fixed atom: ignored
    pred[3, 1] += 0.201  # structure 2: mean of 0.201 and 0
    fixed = np.array([False, False, True, False, False])
    natoms = np.array([3, 2])
    np.testing.assert_allclose(
        m.mean_free_distances(pred, true, cell, natoms, fixed), [0.005, 0.1005], atol=1e-12
    )
    want = (490 + 399) / (2 * 490)
    assert m.average_distance_within_threshold(pred, true, cell, natoms, fixed) == pytest.approx(
        want
    )
    assert m.is2rs_metrics(pred, true, cell, natoms, fixed) == pytest.approx({"adwt": want})
    assert m.average_distance_within_threshold(
        pred, true, cell, natoms, fixed, thresholds=np.array([0.05])
    ) == pytest.approx(0.5)


def test_afbt_and_max_free_force() -> None:
    """AFbT over 390 thresholds 0.01..0.399 eV/Å of ground-truth max free-atom force norms:
    0.005 passes all, 0.2005 the 199 above it, 0.5 none."""
    forces = np.array([[3.0, 4, 0], [0, 0, 1], [10, 0, 0], [0, 0.2005, 0]])
    natoms = np.array([2, 2])
    fixed = np.array([False, False, True, False])
    np.testing.assert_allclose(m.max_free_force(forces, natoms, fixed), [5.0, 0.2005])
    max_forces = np.array([0.005, 0.2005, 0.5])
    want = (390 + 199 + 0) / (3 * 390)
    assert m.average_forces_below_threshold(max_forces) == pytest.approx(want)
    cell = np.stack([np.eye(3) * 10.0] * 3)
    pos = np.zeros((3, 3))
    out = m.is2rs_metrics(pos, pos, cell, np.ones(3, int), true_max_forces=max_forces)
    assert out == pytest.approx({"adwt": 1.0, "afbt": want})


def test_median_baselines() -> None:
    """The S2EF median baseline is the median training energy and the per-component median
    force over free atoms; the IS2RE one the median relaxed energy."""
    energy = np.array([1.0, 3.0, 2.0, 10.0])
    forces = np.array([[1.0, -2, 0], [3, 0, 1], [100, 100, 100], [2, 5, -1]])
    fixed = np.array([False, False, True, False])
    e, f = m.median_s2ef_baseline(energy, forces, fixed)
    assert e == 2.5
    np.testing.assert_array_equal(f, [2.0, 0.0, 0.0])
    assert m.median_is2re_baseline(np.array([-1.0, 0.5, 2.0])) == 0.5


def _brute_min_image(delta: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """``[n]`` shortest images of ``[n, 3]`` displacements over 7 images per periodic axis."""
    ranges = [range(-3, 4) if p else (0,) for p in pbc]
    images = np.array(list(itertools.product(*ranges))) @ cell
    return np.linalg.norm(delta[:, None, :] + images[None], axis=2).min(axis=1)


def test_non_periodic_axes_take_plain_displacements() -> None:
    """Along non-periodic axes position errors are plain displacements whatever the cell
    vector there (zero for a slab without a vertical cell, or for a molecule without a cell:
    no singular-matrix error), along periodic ones minimum images; pbc is per structure in
    mean_free_distances and is2rs_metrics; periodic vectors that span no lattice are a
    ValueError."""
    rng = np.random.default_rng(1)
    true = rng.uniform(0, 4, (20, 3))
    pred = true + rng.uniform(-6, 6, (20, 3))
    delta = pred - true
    slab = np.array([[4.0, 0, 0], [1.5, 3.5, 0], [0, 0, 0]])
    wire = np.array([[0, 0, 0], [0, 0, 0], [0.5, 0.2, 3.0]])
    for cell, pbc in [
        (slab, [True, True, False]),
        (wire, [False, False, True]),
        (np.zeros((3, 3)), [False, False, False]),
        (np.diag([4.0, 5.0, 6.0]), [False, True, False]),
    ]:
        want = _brute_min_image(delta, cell, np.array(pbc))
        np.testing.assert_allclose(m.min_image_distances(pred, true, cell, pbc), want, atol=1e-12)
    np.testing.assert_allclose(
        m.min_image_distances(pred, true, np.zeros((3, 3)), [False] * 3),
        np.linalg.norm(delta, axis=1),
    )
    cells = np.stack([np.zeros((3, 3)), slab])
    pbc = np.array([[False] * 3, [True, True, False]])
    natoms = np.array([8, 12])
    means = [
        np.linalg.norm(delta[:8], axis=1).mean(),
        _brute_min_image(delta[8:], slab, pbc[1]).mean(),
    ]
    np.testing.assert_allclose(
        m.mean_free_distances(pred, true, cells, natoms, pbc=pbc), means, atol=1e-12
    )
    small = np.full(20, 0.005)  # a molecule whose atoms all moved 0.005 Å
    moved = true + small[:, None] / np.sqrt(3)
    assert m.is2rs_metrics(moved, true, cells, natoms, pbc=pbc) == pytest.approx({"adwt": 1.0})
    with pytest.raises(ValueError, match=r"cell of structure 1: cell vector\(s\) \[2\] have zero"):
        m.mean_free_distances(pred, true, cells, natoms, pbc=[[False] * 3, [True] * 3])
    with pytest.raises(ValueError, match="linearly dependent"):
        m.min_image_distances(pred, true, np.array([[1.0, 0, 0], [2, 0, 0], [0, 0, 5]]))


BAD_SHAPES = [
    (m.energy_mae, ([1.0, 2.0, 3.0], [[1.0], [2.0], [3.0]]), r"true has shape \(3, 1\)"),
    (m.energy_within_threshold, ([1.0, 2.0, 3.0], [[1.0], [2.0], [3.0]]), r"true has shape"),
    (m.is2re_metrics, ([1.0, 2.0], [1.0, 2.0, 3.0]), r"true has shape \(3,\), expected \[S\]"),
    (m.forces_mae, (np.zeros((4, 3)), np.zeros((4, 1))), r"true has shape \(4, 1\)"),
    (m.forces_mae, (np.zeros((4, 3)), np.zeros((4, 3)), [True, False]), "fixed has shape"),
    (m.forces_cosine, (np.zeros((4, 3)), np.zeros(3)), r"true has shape \(3,\)"),
    (
        m.energy_forces_within_threshold,
        ([0.0, 0.0], [0.0, 0.0], np.zeros((4, 3)), np.zeros((4, 3)), [2, 3]),
        "natoms .* sums to 5, expected .* N = 4",
    ),
    (
        m.s2ef_metrics,
        ([0.0, 0.0], [0.0, 0.0, 0.0], np.zeros((4, 3)), np.zeros((4, 3)), [2, 2]),
        r"energy_true has shape \(3,\), expected \[S\] with S = 2 from energy_pred",
    ),
    (
        m.s2ef_metrics,
        ([0.0, 0.0], [0.0, 0.0], np.zeros((4, 3)), np.zeros((4, 3)), [1, 1, 2]),
        r"natoms has shape \(3,\), expected \[S\] with S = 2",
    ),
    (
        m.mean_free_distances,
        (np.zeros((4, 3)), np.zeros((4, 3)), np.stack([np.eye(3)] * 3), [2, 2]),
        r"natoms has shape \(2,\), expected \[S\] with S = 3 from cell",
    ),
    (
        m.mean_free_distances,
        (np.zeros((4, 3)), np.zeros((4, 3)), np.stack([np.eye(3)] * 2), [2, 2], None, [True]),
        r"pbc has shape \(1,\), expected \[3\]",
    ),
    (
        m.is2rs_metrics,
        (np.zeros((4, 3)), np.zeros((4, 3)), np.stack([np.eye(3)] * 2), [2, 2], None, [0.1]),
        r"true_max_forces has shape \(1,\), expected \[S\]",
    ),
    (m.max_free_force, (np.zeros((4, 3)), [4], [False] * 3), "fixed has shape"),
    (m.average_forces_below_threshold, (np.zeros((2, 1)),), r"max_forces has shape \(2, 1\)"),
    (m.median_s2ef_baseline, ([1.0], np.zeros((2, 3)), [False]), "train_fixed has shape"),
    (m.median_is2re_baseline, ([[1.0, 2.0]],), r"train_relaxed_energy has shape \(1, 2\)"),
]


@pytest.mark.parametrize(
    ("function", "args", "message"),
    BAD_SHAPES,
    ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(BAD_SHAPES)],
)
def test_mis_shaped_arrays_are_errors(function, args: tuple, message: str) -> None:
    """Every public metric checks its arrays' shapes (energies [S] and [S], forces [N, 3] and
    [N, 3], natoms [S] summing to N, masks [N]) and refuses a mismatch with a ValueError
    naming the argument and the shapes, instead of broadcasting (energy_mae([1, 2, 3],
    [[1], [2], [3]]) was 0.889, its 3x3 broadcast)."""
    with pytest.raises(ValueError, match=message):
        function(*args)
