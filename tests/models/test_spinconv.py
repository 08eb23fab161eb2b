"""SpinConv: OCP checkpoint compatibility, reference outputs, continuity, conservative forces,
stress, invariances, batching and the spin convolution itself."""

from __future__ import annotations

import copy
import math
import warnings
from functools import cache

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from devices import CUDA, DEVICES, CaptureSafety
from ocp_fixtures import load_ocp_raw, ocp_reference, ocp_structures

import forcecalc.models.spinconv as spinconv_module
from forcecalc.checkpoint import CheckpointInfo, Normalizers, Potential
from forcecalc.graph.batch import Batch
from forcecalc.graph.gather import RowIndex
from forcecalc.models.spinconv import EmbeddingBlock, SphereProjections, SpinConv, SpinConvBlock

#: The envelope variants of the OCP fixtures (20 neighbors kept within 6 Å) cut in every
#: slab: the warning that says so (tested on its own) is not these tests' subject.
pytestmark = pytest.mark.filterwarnings(
    "ignore:an atom has more than .* neighbors within:forcecalc.warning.ForcecalcWarning"
)


MODELS = [
    "spinconv_small_fc",
    "spinconv_small_ec",
    pytest.param("spinconv_all", marks=pytest.mark.slow),
]
DTYPES = [torch.float64, torch.float32]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Run this module's (small, latency-bound) evaluations on one intra-op thread: on a
    shared two-core machine, two spinning OpenMP threads made them up to 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _state_dict(raw: dict) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in raw["state_dict"].items()}


def _fixture_rotations(name: str) -> torch.Tensor:
    """The reference's force-block rotations, in float64 (``torch.tensor`` of a list would
    round them to float32 and shift forces by ~1e-6 near a pole)."""
    return torch.tensor(ocp_reference()["models"][name]["rotations"], dtype=torch.float64)


@cache
def _loaded(name: str, forces: str = "compat", rotations: str = "fixture") -> SpinConv:
    """Float64 model of fixture ``name`` in eval mode; force-centric models get the fixture's
    rotations (``rotations="fixture"``) or the default fixed set (``"default"``)."""
    raw = load_ocp_raw(name)
    options = dict(raw["config"]["model_attributes"])
    if options["force_estimator"] == "grad":
        options["forces"] = forces
    elif rotations == "fixture":
        options["rotations"] = _fixture_rotations(name)
    model = SpinConv(**options)
    model.load_state_dict(_state_dict(raw), strict=True)
    return model.double().eval()


def _model(name: str, dtype: torch.dtype = torch.float64, **kwargs) -> SpinConv:
    model = _loaded(name, **kwargs)
    return model if dtype == torch.float64 else copy.deepcopy(model).to(dtype)


def _denormalize(name: str, energy: torch.Tensor, forces: torch.Tensor) -> tuple:
    norm = load_ocp_raw(name)["normalizers"]
    e_std, e_mean = float(norm["target"]["std"]), float(norm["target"]["mean"])
    f_std = float(norm["grad_target"]["std"])
    energy = energy.detach().double().numpy() * e_std + e_mean
    return energy, forces.detach().double().numpy() * f_std


def _run(
    model: SpinConv,
    atoms_list,
    dtype: torch.dtype,
    cutoff: float | None = None,
    device: str = "cpu",
) -> dict:
    batch = Batch.from_atoms(atoms_list, cutoff=cutoff or model.cutoff, dtype=dtype)
    if device != "cpu":
        model = copy.deepcopy(model).to(device)
    out = model(batch.to(device))
    return {k: v.detach().cpu() for k, v in out.items()}


def _non_tie(name: str) -> list[str]:
    results = ocp_reference()["models"][name]["results"]
    return [s for s, r in results.items() if not r["tie_cut"]]


def _relative_force_error(forces: np.ndarray, reference: np.ndarray) -> float:
    """max |F - F_ref| / max |F_ref| (absolute where the reference vanishes by symmetry)."""
    return float(np.abs(forces - reference).max() / max(np.abs(reference).max(), 1e-3))


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("name", MODELS)
def test_strict_load(name):
    """Every SpinConv fixture checkpoint loads into ``SpinConv(**model_attributes)`` with
    ``strict=True``: the same keys and shapes, and the force-block rotations are not saved."""
    raw = load_ocp_raw(name)
    sd = _state_dict(raw)
    force_centric = raw["config"]["model_attributes"]["force_estimator"] == "random"
    for rotations in (None, _fixture_rotations(name)) if force_centric else (None,):
        options = dict(raw["config"]["model_attributes"])
        if rotations is not None:
            options["rotations"] = rotations
        model = SpinConv(**options)
        assert model.load_state_dict(sd, strict=True)
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert ours == {k: tuple(v.shape) for k, v in sd.items()}
        assert "rotations" not in ours


@pytest.mark.parametrize("name", MODELS)
def test_fresh_model_state_dict_matches_checkpoint_layout(name):
    """A freshly initialised model has exactly the checkpoint's keys, shapes and dtypes, and its
    fixed Gaussian centres are bitwise the checkpoint's."""
    raw = load_ocp_raw(name)
    fresh = SpinConv(**raw["config"]["model_attributes"]).state_dict()
    saved = _state_dict(raw)
    assert {k: (tuple(v.shape), v.dtype) for k, v in fresh.items()} == {
        k: (tuple(v.shape), v.dtype) for k, v in saved.items()
    }
    for key in ("distance_expansion_forces.offset", "dist_block.distance_expansion.offset"):
        assert torch.equal(fresh[key], saved[key])


# --------------------------------------------------------------------------- references


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", MODELS)
def test_matches_reference(name, dtype, device):
    """Energies and forces equal the original's float64 references (denormalised) on every
    structure without a tie at the max-neighbor cut, on the CPU and on CUDA: float64 within
    1e-6 eV and 1e-6 x max|F|, float32 within 2e-3 eV (x |E|/20 for large |E|) and 2e-3 x
    max|F|; the same bounds hold for the forces minus their per-structure mean."""
    model = _model(name, dtype)
    structures = ocp_structures()
    results = ocp_reference()["models"][name]["results"]
    e_tol, f_tol = (1e-6, 1e-6) if dtype == torch.float64 else (2e-3, 2e-3)
    for structure in _non_tie(name):
        out = _run(model, structures[structure], dtype, device=device)
        assert out["energy"].dtype == dtype and out["forces"].dtype == dtype
        energy, forces = _denormalize(name, out["energy"], out["forces"])
        ref_energy = results[structure]["energy"]
        ref_forces = np.asarray(results[structure]["forces"])
        scale = max(1.0, abs(ref_energy) / 20.0) if dtype == torch.float32 else 1.0
        assert abs(energy[0] - ref_energy) <= e_tol * scale, structure
        assert _relative_force_error(forces, ref_forces) <= f_tol, structure
        centred = forces - forces.mean(axis=0)
        ref_centred = ref_forces - ref_forces.mean(axis=0)
        if len(forces) > 1:
            assert _relative_force_error(centred, ref_centred) <= f_tol, structure


# --------------------------------------------------------------------------- continuity


def _all_structures() -> list:
    return [a.copy() for a in ocp_structures().values()]


def _per_structure(batch_forces: torch.Tensor, atoms_list) -> list[np.ndarray]:
    sizes = [len(a) for a in atoms_list]
    return [f.numpy() for f in torch.split(batch_forces, sizes)]


@pytest.mark.parametrize("name", ["spinconv_small_fc", "spinconv_small_ec"])
def test_repeated_calls_bit_identical(name):
    """Two calls on the same batch give bit-identical energies and forces (force-centric: with
    the default fixed rotation set)."""
    model = _model(name, rotations="default")
    structures = _all_structures()
    first = _run(model, structures, torch.float64)
    second = _run(model, structures, torch.float64)
    assert torch.equal(first["forces"], second["forces"])
    assert torch.equal(first["energy"], second["energy"])


@pytest.mark.parametrize(
    ("name", "forces"),
    [
        ("spinconv_small_fc", "compat"),
        ("spinconv_small_ec", "compat"),
        ("spinconv_small_ec", "conservative"),
        pytest.param("spinconv_all", "compat", marks=pytest.mark.slow),
    ],
)
def test_continuity(name, forces):
    """The original's failure, fixed: in float64, moving every atom by 1e-9 Å (random
    directions) or translating the structure rigidly by (0.3, -0.7, 1.1) Å changes forces by
    < 1e-6 x max|F| (energies by < 1e-9 relative) on every fixture structure, tie-cut ones
    included, with the default fixed rotation set (and both energy-centric force modes)."""
    model = _model(name, forces=forces, rotations="default")
    structures = _all_structures()
    base = _run(model, structures, torch.float64)

    rng = np.random.default_rng(7)
    moved = []
    for atoms in structures:
        step = rng.normal(size=(len(atoms), 3))
        moved.append(atoms.copy())
        moved[-1].positions += 1e-9 * step / np.linalg.norm(step, axis=1, keepdims=True)
    translated = []
    for atoms in structures:
        translated.append(atoms.copy())
        translated[-1].translate([0.3, -0.7, 1.1])
    reference = _per_structure(base["forces"], structures)
    for variant in (moved, translated):
        out = _run(model, variant, torch.float64)
        torch.testing.assert_close(out["energy"], base["energy"], rtol=1e-9, atol=1e-9)
        for atoms, forces, ref in zip(
            structures, _per_structure(out["forces"], variant), reference, strict=True
        ):
            assert _relative_force_error(forces, ref) < 1e-6, atoms.info["name"]


# --------------------------------------------------------------------------- conservative


def _energy(model: SpinConv, batch: Batch, positions=None, cell=None) -> float:
    return float(model(batch.with_positions(positions, cell))["energy"].detach().sum())


def _finite_difference_force(
    model: SpinConv, batch: Batch, atom: int, axis: int, step: float = 1e-5
) -> float:
    """Minus the central finite-difference derivative of the energy along one coordinate."""
    shifted = []
    for sign in (1.0, -1.0):
        positions = batch.positions.clone()
        positions[atom, axis] += sign * step
        shifted.append(_energy(model, batch, positions))
    return -(shifted[0] - shifted[1]) / (2 * step)


@pytest.mark.parametrize("structure", ["o_pt100", "ch3_au211"])
def test_conservative_forces_and_stress_match_finite_differences(structure):
    """``forces="conservative"``: forces equal minus the central finite-difference gradient of
    the energy (step 1e-5 Å), and the stress equals the finite-difference derivative of the
    energy under a symmetric strain ``r -> r (I + e)``, ``cell -> cell (I + e)``, divided by
    the volume."""
    model = _model("spinconv_small_ec", forces="conservative")
    atoms = ocp_structures()[structure]
    batch = Batch.from_atoms(atoms, cutoff=model.cutoff)
    out = model(batch, compute_stress=True)
    forces, stress = out["forces"].detach(), out["stress"].detach()[0]
    step = 1e-5
    scale = float(forces.abs().max())
    for atom, axis in [(0, 0), (len(atoms) // 2, 2), (len(atoms) - 1, 1)]:
        numeric = _finite_difference_force(model, batch, atom, axis, step)
        assert abs(float(forces[atom, axis]) - numeric) < 1e-6 * scale, (atom, axis)
    volume = abs(float(torch.linalg.det(batch.cell[0])))
    stress_scale = float(stress.abs().max())
    for i, j in [(0, 0), (2, 2), (0, 1), (1, 2), (2, 0)]:
        strained = []
        for sign in (1.0, -1.0):
            deformation = torch.eye(3, dtype=torch.float64)
            deformation[i, j] += 0.5 * sign * step
            deformation[j, i] += 0.5 * sign * step
            strained.append(
                _energy(model, batch, batch.positions @ deformation, batch.cell @ deformation)
            )
        numeric = (strained[0] - strained[1]) / (2 * step) / volume
        assert abs(float(stress[i, j]) - numeric) < 1e-5 * stress_scale, (i, j)
    assert torch.equal(stress, stress.T)


def test_dft_matrices_built_once_serve_every_mode():
    """The DFT matrices a spin convolution keeps and the model's splat table (constants, by
    dtype and device) give the same results as fresh ones: after a ``torch.inference_mode``
    forward has built them, a training forward and backward (autograd through the spin
    convolutions) works and its outputs equal those of a copy that builds its own; after
    ``model.double()`` they are float64."""
    model = copy.deepcopy(_model("spinconv_small_fc", dtype=torch.float32))
    batch = Batch.from_atoms(ocp_structures()["o_pt100"], cutoff=model.cutoff).to(
        "cpu", torch.float32
    )
    with torch.inference_mode():
        model(batch)
    assert model._splat_tables
    fresh = copy.deepcopy(model)
    fresh._splat_tables.clear()
    for block in fresh.modules():
        if isinstance(block, SpinConvBlock):
            block._dft.clear()
    torch.manual_seed(0)
    kept = model.train()(batch)
    torch.manual_seed(0)
    new = fresh.train()(batch)
    torch.testing.assert_close(kept["forces"], new["forces"], rtol=0, atol=0)
    (kept["energy"].sum() + kept["forces"].square().sum()).backward()
    assert model.message_blocks[0].spinconvblock.conv1.weight.grad.abs().sum() > 0
    model.eval().double()
    block = model.message_blocks[0].spinconvblock
    cos, _, inverse = block.dft_matrices(torch.float64, torch.device("cpu"))
    assert cos.dtype == inverse.dtype == torch.float64
    assert model.splat_table(torch.float64, torch.device("cpu")).dtype == torch.float64
    assert model(batch.to("cpu", torch.float64))["forces"].dtype == torch.float64


def test_energy_centric_under_inference_mode_is_a_clear_error():
    """Conservative forces are an autograd gradient: ``torch.inference_mode`` (no autograd at
    all) gets an error that says so, not autograd's 'does not require grad', from the forward
    and from the fixed-shape forward."""
    model = _model("spinconv_small_ec", forces="conservative")
    batch = Batch.from_atoms(ocp_structures()["o_pt100"], cutoff=model.cutoff)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        model(batch)
    inputs = model.fixed_shape_inputs(batch)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        model.fixed_shape_forward(inputs)


def test_fill_untrained_pairs():
    """An ordered pair whose distance scaling is still at its initialization gets that of the
    reverse pair if trained, else the mean of the two self pairs if both are trained; pairs
    involving an untrained element, trained pairs and the diagonal are untouched; a second
    call changes nothing."""
    torch.manual_seed(0)
    model = SpinConv(
        hidden_channels=8,
        mid_hidden_channels=16,
        num_interactions=1,
        num_basis_functions=8,
        sphere_size_lat=4,
        sphere_size_long=4,
        embedding_size=4,
    )
    block = model.dist_block
    n = block.max_num_elements
    scalar = block.dist_scalar.weight.detach().view(n, n)
    offset = block.dist_offset.weight.detach().view(n, n)
    with torch.no_grad():
        for (a, b), value in {(29, 29): 0.4, (79, 79): -0.2, (8, 8): 0.1, (29, 8): 0.7}.items():
            scalar[a, b], offset[a, b] = value, -value
    before = (scalar.clone(), offset.clone())
    block.dist_offset.weight.requires_grad_(False)  # a frozen table is left as it is
    assert spinconv_module.fill_untrained_pairs(model) == []
    assert torch.equal(scalar, before[0]) and torch.equal(offset, before[1])
    block.dist_offset.weight.requires_grad_(True)
    filled = spinconv_module.fill_untrained_pairs(model)
    assert sorted(filled) == [(8, 29), (8, 79), (29, 79), (79, 8), (79, 29)]
    assert scalar[29, 79] == scalar[79, 29] == pytest.approx(0.1)
    assert offset[8, 79] == pytest.approx(0.05)
    assert scalar[8, 29] == pytest.approx(0.7) and offset[8, 29] == pytest.approx(-0.7)
    changed = (scalar != before[0]) | (offset != before[1])
    assert int(changed.sum()) == 5 and scalar[29, 8] == before[0][29, 8]
    assert scalar[1, 29] == before[0][1, 29] and scalar[29, 29] == before[0][29, 29]
    assert spinconv_module.fill_untrained_pairs(model) == []


def test_compat_forces_are_the_distance_only_gradient():
    """``forces="compat"`` (OCP's definition) differs from the full gradient where neighbors
    are projected off the pole, and equals it for a dimer (every projection is on the pole)."""
    compat = _model("spinconv_small_ec", forces="compat")
    full = _model("spinconv_small_ec", forces="conservative")
    slab = ocp_structures()["o_pt100"]
    f_compat = _run(compat, slab, torch.float64)["forces"]
    f_full = _run(full, slab, torch.float64)["forces"]
    assert (f_compat - f_full).abs().max() > 1e-3 * f_full.abs().max()
    dimer = ocp_structures()["n2_box"]
    torch.testing.assert_close(
        _run(compat, dimer, torch.float64)["forces"],
        _run(full, dimer, torch.float64)["forces"],
        rtol=1e-12,
        atol=1e-14,
    )


def test_conservative_gradients_finite_at_poles_and_double_backward():
    """Conservative forces and stress are finite where projections lie exactly on the pole (the
    reverse edge, periodic self-images of a one-atom cell), and training mode builds a graph for
    a force loss (double backward) with finite parameter gradients."""
    model = copy.deepcopy(_model("spinconv_small_ec", forces="conservative"))
    for name in ("cu_fcc_prim", "n2_box"):
        batch = Batch.from_atoms(ocp_structures()[name], cutoff=model.cutoff)
        out = model(batch, compute_stress=True)
        assert torch.isfinite(out["forces"]).all() and torch.isfinite(out["stress"]).all()
    model.train()
    batch = Batch.from_atoms(
        [ocp_structures()["n2_box"], ocp_structures()["o_pt100"]], cutoff=model.cutoff
    )
    out = model(batch)
    assert out["forces"].requires_grad
    loss = out["forces"].pow(2).sum() + out["energy"].pow(2).sum()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    conv_grad = model.message_blocks[0].spinconvblock.conv1.weight.grad
    assert conv_grad is not None and conv_grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("name", "forces"),
    [
        ("spinconv_small_ec", "conservative"),
        ("spinconv_small_ec", "compat"),
        ("spinconv_small_fc", "compat"),
    ],
)
def test_edges_along_the_frame_helper_get_a_defined_roll(name, forces):
    """Where an edge points along its frame's helper direction (a centrosymmetric neighborhood
    makes the mean neighbor vector vanish, so the helper is (1, 1, 1) and every edge along a
    cube diagonal is on it: B2 CuPd, bcc, CH4 as ASE builds it), OCP's roll comes from rounding
    noise amplified 1e7 times; here it comes from ROLL_FALLBACK.  So conservative forces stay
    finite and small (they were ~1e7 eV/A), and energies do not change when a translation
    changes the rounding, nor do direct and compat forces (OCP's changed CH4's force-centric
    forces by up to 7 eV/A).  Conservative forces there may: such symmetric sites put
    projections exactly on the bin edges of the bilinear splat, where the energy has kinks and
    rounding picks the one-sided derivative."""
    model = _model(name, forces=forces) if "ec" in name else _model(name, rotations="default")
    b2 = Atoms(
        "CuPd", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5]], cell=[2.99] * 3, pbc=True
    ).repeat((2, 1, 1))
    for atoms in (b2, molecule("CH4")):
        moved = atoms.copy()
        moved.positions += [0.37, -0.81, 0.55]
        before, after = _run(model, atoms, torch.float64), _run(model, moved, torch.float64)
        assert torch.isfinite(before["forces"]).all()
        assert before["forces"].abs().max() < 100.0
        assert abs(float(after["energy"][0] - before["energy"][0])) < 1e-9
        if forces == "compat":
            assert (after["forces"] - before["forces"]).abs().max() < 1e-8


def test_near_a_centrosymmetric_site_the_roll_comes_from_the_fallback(monkeypatch):
    """Atoms 1e-9 A off a centrosymmetric site (a perfect crystal read back from a file with
    8 decimals) leave the mean neighbor vector ~1e-9 A long: OCP's helper then turns ~1e4 rad
    per A and the roll of a diagonal edge follows the direction of that vector, so conservative
    forces went as ~1/displacement (2.5e3 eV/A on B2 CuPd, 1e6 with this fixture's weights).
    Edges within 1e-3 rad of such a hypersensitive helper take the fallback roll: forces stay
    those of the symmetric crystal's size.  Edges along a helper that is not hypersensitive
    (CH4's hydrogens: their mean vector points along their C-H bond, 1e-4 rad from it) keep
    the original's roll."""
    model = _model("spinconv_small_ec", forces="conservative")
    b2 = Atoms(
        "CuPd", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5]], cell=[2.99] * 3, pbc=True
    ).repeat(2)
    moved = b2.copy()
    moved.positions += 1e-9 * np.random.default_rng(7).normal(size=(len(b2), 3))
    ch4 = molecule("CH4")
    symmetric = _run(model, b2, torch.float64)["forces"].abs().max()
    assert _run(model, moved, torch.float64)["forces"].abs().max() < 3 * symmetric
    ch4_forces = _run(model, ch4, torch.float64)["forces"]
    monkeypatch.setattr(spinconv_module, "HELPER_EPS2", spinconv_module.POLE_EPS2)
    assert _run(model, moved, torch.float64)["forces"].abs().max() > 100 * symmetric
    assert torch.equal(_run(model, ch4, torch.float64)["forces"], ch4_forces)


def _rotation(axis, angle: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


@pytest.mark.parametrize("forces", ["compat", "conservative"])
def test_dimer_energy_rotation_invariant(forces):
    """Rotating a molecule (N2 in its box, CO in a big box) changes the energy by < 1e-10
    relative (float64) and the energy-centric forces rotate with it."""
    model = _model("spinconv_small_ec", forces=forces)
    co = molecule("CO", cell=[20.0, 20.0, 20.0], pbc=False)
    co.center()
    for atoms in (ocp_structures()["n2_box"], co):
        for angle in (0.4, 1.1, 2.9):
            rotation = _rotation([0.3, -0.5, 0.8], angle)
            rotated = atoms.copy()
            centre = atoms.positions.mean(axis=0)
            rotated.positions = (atoms.positions - centre) @ rotation.T + centre
            before = _run(model, atoms, torch.float64)
            after = _run(model, rotated, torch.float64)
            energy = float(before["energy"][0])
            assert abs(float(after["energy"][0]) - energy) < 1e-10 * max(abs(energy), 1.0)
            expected = before["forces"].numpy() @ rotation.T
            scale = np.abs(expected).max()
            assert np.abs(after["forces"].numpy() - expected).max() < 1e-10 * scale


@pytest.mark.parametrize("name", ["spinconv_small_ec", "spinconv_small_fc"])
def test_slab_energy_nearly_rotation_invariant(name):
    """Rotating a slab together with its cell changes the energy by < 1e-6 relative: the
    original is not exactly invariant (it adds 1e-4 to every component of the mean neighbor
    vector that fixes the roll of an edge frame), and neither is this re-implementation."""
    model = _model(name)
    atoms = ocp_structures()["ch3_au211"]
    before = float(_run(model, atoms, torch.float64)["energy"][0])
    for angle in (0.7, 2.2):
        rotation = _rotation([1.0, 2.0, -0.5], angle)
        rotated = atoms.copy()
        rotated.positions = atoms.positions @ rotation.T
        rotated.cell = atoms.cell.array @ rotation.T
        after = float(_run(model, rotated, torch.float64)["energy"][0])
        assert abs(after - before) < 1e-6 * abs(before)


# --------------------------------------------------------------------------- batching, graphs


@pytest.mark.parametrize("name", MODELS)
def test_batch_equals_single(name):
    """A batch of several fixture structures gives the per-structure energies and forces of one
    structure at a time (float64, to rounding)."""
    model = _model(name)
    names = ["o_pt100", "n2_box", "cu_fcc_prim"]
    if name != "spinconv_all":
        names.append("ch3_au211")
    structures = [ocp_structures()[n] for n in names]
    together = _run(model, structures, torch.float64)
    forces = _per_structure(together["forces"], structures)
    for i, atoms in enumerate(structures):
        alone = _run(model, atoms, torch.float64)
        torch.testing.assert_close(
            together["energy"][i], alone["energy"][0], rtol=1e-11, atol=1e-11
        )
        np.testing.assert_allclose(forces[i], alone["forces"].numpy(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["spinconv_small_fc", "spinconv_small_ec"])
def test_superset_graph_gives_same_result(name):
    """The model cuts the caller's graph itself: a graph built at cutoff + 1.5 Å (a skin), or
    already cut to ``max_neighbors`` by the graph builder, gives the same outputs."""
    model = _model(name)
    structures = [ocp_structures()[n] for n in ("co_cu111", "n2_box")]
    plain = _run(model, structures, torch.float64)
    skin = _run(model, structures, torch.float64, cutoff=model.cutoff + 1.5)
    batch = Batch.from_atoms(structures, cutoff=model.cutoff, max_neighbors=model.max_neighbors)
    cut = {k: v.detach() for k, v in model(batch).items()}
    for other in (skin, cut):
        torch.testing.assert_close(other["energy"], plain["energy"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(other["forces"], plain["forces"], rtol=1e-10, atol=1e-12)


def test_max_neighbors_attribute_is_used():
    """``max_neighbors`` (initially ``max_num_neighbors``) is the rule applied in ``forward``;
    changing it changes the graph (not the energy readout's divisor)."""
    model = copy.deepcopy(_model("spinconv_small_fc"))
    assert model.max_neighbors == model.max_num_neighbors == 20
    assert model.cutoff == 6.0
    atoms = ocp_structures()["co_cu111"]
    before = _run(model, atoms, torch.float64)
    model.max_neighbors = 12
    after = _run(model, atoms, torch.float64)
    assert not torch.allclose(before["energy"], after["energy"])


# --------------------------------------------------------------------------- fixed shapes

#: The variants a fixed-shape forward must reproduce: (fixture, options of ``_model``,
#: envelope).  Energy-centric ones need the gradient tables; the envelope weights the grids.
FIXED_SHAPE_VARIANTS = [
    ("spinconv_small_fc", {}, False),
    ("spinconv_small_fc", {}, True),
    ("spinconv_small_ec", {"forces": "compat"}, False),
    ("spinconv_small_ec", {"forces": "conservative"}, True),
]


def _variant(name: str, options: dict, envelope: bool, dtype=torch.float64) -> SpinConv:
    model = copy.deepcopy(_model(name, dtype, **options))
    model.envelope = envelope
    return model


def _fixed_shape(model: SpinConv, atoms_list, dtype: torch.dtype = torch.float64) -> tuple:
    batch = Batch.from_atoms(atoms_list, cutoff=model.cutoff, dtype=dtype)
    inputs = model.fixed_shape_inputs(batch)
    return inputs, model.fixed_shape_forward(inputs), model(batch, model.defines_stress)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("name", "options", "envelope"), FIXED_SHAPE_VARIANTS)
def test_fixed_shape_forward_equals_forward(dtype, name, options, envelope):
    """The fixed-shape forward (padded edges and width, the tables built outside: what a CUDA
    graph replays) gives the forward's energies, forces and (energy-centric) stress, for
    single structures and a batch, padding included: N2 has 2 edges in a capacity of 8 and a
    width of 1 padded to 8; the one-atom fcc cell keeps 42 edges tied at the cut (width above
    max_neighbors, rounded up to 48)."""
    model = _variant(name, options, envelope, dtype)
    structures = dict(ocp_structures())
    # strained by 1e-8: the one-atom cell puts projected directions exactly on bin edges of
    # the splat, where the conservative stress jumps (rounding picks the side); the ties at
    # the cut (within 1e-5 Å) stay
    prim = structures["cu_fcc_prim"].copy()
    strain = np.eye(3) + 1e-8 * np.random.default_rng(0).normal(size=(3, 3))
    prim.set_cell(prim.cell[:] @ strain, scale_atoms=True)
    structures["cu_fcc_prim"] = prim
    cases = [[structures[name]] for name in ("co_cu111", "n2_box", "cu_fcc_prim")]
    cases.append([structures[name] for name in ("o_pt100", "n2_box", "oh_ni111_skew")])
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    for atoms_list in cases:
        inputs, fixed, plain = _fixed_shape(model, atoms_list, dtype)
        flags = {"overflow", "cut"} if envelope else {"overflow"}  # cut: the envelope's
        assert fixed.keys() == {*plain, *flags} and not fixed["overflow"]
        for key, value in plain.items():
            torch.testing.assert_close(fixed[key], value, rtol=tolerance, atol=tolerance)
    inputs, _, _ = _fixed_shape(model, [structures["n2_box"]])
    assert inputs["candidate_index"].shape == (2, 8) and inputs["edges"].shape == (8,)
    assert inputs["columns"].shape == (8,)
    inputs, _, _ = _fixed_shape(model, [prim])
    assert inputs["columns"].shape == inputs["edges"].shape == (48,)
    graph = model._kept_graph(inputs)
    assert int((graph["target_slot"] < graph["incoming"].numel()).sum()) == 42


@pytest.mark.parametrize(("name", "options", "envelope"), FIXED_SHAPE_VARIANTS)
def test_fixed_shape_inputs_of_a_skin_graph_serve_moved_atoms(name, options, envelope):
    """The selection (cutoff, max-neighbor rule) runs inside the fixed-shape forward, so the
    inputs built once from a graph at ``cutoff + skin`` serve every later step with new
    positions alone (``Potential.moved``): the results equal the forward at the moved
    positions, atoms entering and leaving the cutoff and the cut included, with the same
    input shapes (one graph replays them all)."""
    model = _variant(name, options, envelope)
    atoms = ocp_structures()["co_cu111"].copy()
    first = Batch.from_atoms(atoms, cutoff=model.cutoff + 1.0, dtype=torch.float64)
    inputs = model.fixed_shape_inputs(first)
    shapes = {k: v.shape for k, v in inputs.items()}
    rng = np.random.default_rng(0)
    for _ in range(3):
        moved = atoms.copy()
        moved.positions += rng.normal(scale=0.15, size=atoms.positions.shape).clip(-0.45, 0.45)
        batch = first.with_positions(torch.as_tensor(moved.positions))
        moved_inputs = Potential.moved(inputs, batch)
        assert {k: v.shape for k, v in moved_inputs.items()} == shapes
        fixed = model.fixed_shape_forward(moved_inputs)
        plain = model(Batch.from_atoms(moved, cutoff=model.cutoff, dtype=torch.float64))
        assert not fixed["overflow"]
        for key in ("energy", "forces"):
            torch.testing.assert_close(fixed[key], plain[key], rtol=1e-12, atol=1e-12)


def test_more_kept_edges_than_room_is_reported():
    """The inputs have room for the edges kept when they were built (per atom and in all);
    if moved atoms keep more (new ties at the cut), the forward says so instead of dropping
    edges silently."""
    model = _model("spinconv_small_fc")
    inputs = model.fixed_shape_inputs(
        Batch.from_atoms(ocp_structures()["co_cu111"], cutoff=model.cutoff, dtype=torch.float64)
    )
    assert not bool(model.fixed_shape_forward(inputs)["overflow"])
    for narrow in ({"columns": torch.arange(4)}, {"edges": torch.arange(100)}):
        assert bool(model.fixed_shape_forward({**inputs, **narrow})["overflow"])


def test_kept_edges_are_stored_without_per_atom_padding():
    """Kept edges sit in one list (padded in all, not per atom): a slab whose atoms keep
    different numbers of edges needs little more room than it has edges."""
    from ase.build import add_adsorbate, fcc111

    from forcecalc.checkpoint import load_checkpoint

    model = load_checkpoint("spinconv-ec", device="cpu").model  # 4 Å: 8 to 19 edges per atom
    slab = fcc111("Pt", (3, 3, 3), vacuum=8.0)
    add_adsorbate(slab, molecule("CO"), 1.9, "ontop")
    inputs = model.fixed_shape_inputs(Batch.from_atoms(slab, cutoff=model.cutoff))
    graph = model._kept_graph(inputs)
    n_kept = int((graph["target_slot"] < graph["incoming"].numel()).sum())
    n_atoms = len(inputs["numbers"])
    assert len(inputs["edges"]) <= 1.25 * (n_kept + n_atoms)
    assert len(inputs["edges"]) < n_atoms * len(inputs["columns"])


def test_gradient_tables_are_the_adjoints_of_their_gathers():
    """The energy-centric fixed-shape forward's backward passes read prebuilt tables (on CUDA,
    a gather through ``inverse``; in a double backward, through ``position``).  Each must be
    the adjoint of its gather: ``<gather(v), w> = <v, sum over the readers of w>`` for every
    ``v`` and every ``w`` that vanishes on the padding edges' entries (nobody reads those
    edges: their gradients are zero)."""
    model = _model("spinconv_small_ec")
    structures = ocp_structures()
    batch = Batch.from_atoms(
        [structures[name] for name in ("o_pt100", "n2_box", "co_cu111")], cutoff=model.cutoff
    )
    inputs = model.fixed_shape_inputs(batch)
    graph = model._kept_graph(inputs)
    n_atoms, width = graph["incoming"].shape
    padding = graph["target_slot"] >= n_atoms * width  # [edges]
    assert padding.any()
    tables = model.gradient_tables({"numbers": inputs["numbers"], **graph})
    generator = torch.Generator().manual_seed(0)
    for rows, dead in zip(
        tables,
        (padding, None, padding.unsqueeze(1).expand(-1, width), None),
        strict=True,
    ):
        for table in (rows, rows.transposed()):
            values = torch.randn(table.n_rows, 2, generator=generator, dtype=torch.float64)
            weights = torch.randn(*table.index.shape, 2, generator=generator, dtype=torch.float64)
            if dead is not None and table is rows:
                weights[dead] = 0.0
            summed = table.transposed().gather(weights.reshape(table.index.numel(), 2)).sum(1)
            left = (table.gather(values) * weights).sum()
            torch.testing.assert_close(left, (values * summed).sum(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("name", "options", "envelope"), FIXED_SHAPE_VARIANTS)
def test_fixed_shape_forward_never_reads_values_on_the_host(name, options, envelope):
    """CUDA graph capture forbids every operation whose result shape or control flow depends
    on tensor values (``.item()``, ``nonzero``, ``bool(tensor)``), and so does a table built
    on a first backward pass.  The meta device has shapes and no values, so such an operation
    fails there: the fixed-shape forward (with its backward pass, energy-centric) runs on it,
    the plain forward (edge selection, table building) does not.  Nor may it store a Python
    number by indexing, a host-to-device copy on CUDA (:class:`CaptureSafety`)."""
    model = _variant(name, options, envelope)
    batch = Batch.from_atoms(ocp_structures()["co_cu111"], cutoff=model.cutoff)
    inputs = model.fixed_shape_inputs(batch)
    meta = model.to("meta")
    with CaptureSafety():
        out = meta.fixed_shape_forward({k: v.to("meta") for k, v in inputs.items()})
    assert out["energy"].shape == (1,) and out["forces"].shape == (batch.n_atoms, 3)
    assert ("stress" in out) == model.defines_stress
    with pytest.raises((RuntimeError, NotImplementedError)):
        meta(batch.to("meta"))


def test_fixed_shape_forward_needs_forces():
    """A model without forces (``regress_forces=False``) has no fixed-shape forward, and says
    so."""
    raw = load_ocp_raw("spinconv_small_fc")
    model = SpinConv(**{**raw["config"]["model_attributes"], "regress_forces": False})
    assert not model.fixed_shapes and _model("spinconv_small_ec").fixed_shapes
    batch = Batch.from_atoms(ocp_structures()["n2_box"], cutoff=model.cutoff)
    with pytest.raises(ValueError, match="regresses forces"):
        model.fixed_shape_inputs(batch)


# --------------------------------------------------------------------------- options


def test_rotation_options():
    """Default rotations: a fixed seeded set (same in every instance, orthogonal, not in the
    state_dict); ``"random"``: fresh rotations each call; an explicit ``[R, 3, 3]`` tensor:
    used as given (its length sets R)."""
    raw = load_ocp_raw("spinconv_small_fc")
    options = dict(raw["config"]["model_attributes"])
    a, b = SpinConv(**options), SpinConv(**options)
    assert torch.equal(a.rotations, b.rotations)
    assert a.rotations.shape == (options["num_rand_rotations"], 3, 3)
    eye = torch.eye(3, dtype=a.rotations.dtype).expand_as(a.rotations)
    torch.testing.assert_close(a.rotations @ a.rotations.transpose(1, 2), eye)
    assert "rotations" not in a.state_dict()

    random_model = SpinConv(**options, rotations="random")
    random_model.load_state_dict(_state_dict(raw))
    random_model = random_model.double().eval()
    atoms = ocp_structures()["co_cu111"]
    first = _run(random_model, atoms, torch.float64)
    second = _run(random_model, atoms, torch.float64)
    assert not torch.equal(first["forces"], second["forces"])
    torch.testing.assert_close(first["energy"], second["energy"], rtol=1e-12, atol=1e-12)

    two = _fixture_rotations("spinconv_small_fc")[:2]
    explicit = SpinConv(**options, rotations=two)
    assert explicit.rotations.shape == (2, 3, 3)
    with pytest.raises(ValueError, match="shape"):
        SpinConv(**options, rotations=torch.eye(3))
    with pytest.raises(ValueError, match="orthogonal"):
        SpinConv(**options, rotations=2 * torch.eye(3).expand(2, 3, 3))
    with pytest.raises(ValueError, match="determinant"):  # orthogonal, but a reflection
        SpinConv(**options, rotations=-two)


def test_options_we_do_not_implement_raise():
    """Unsupported options raise a clear ``ValueError``; OCP's bookkeeping options are
    accepted and ignored."""
    base = {"hidden_channels": 16, "mid_hidden_channels": 16, "num_basis_functions": 8}
    SpinConv(**base, num_atoms=3, bond_feat_dim=50, num_targets=1, otf_graph=True, use_pbc=True)
    SpinConv(**base, show_timing_info=True, model_ref_number=3, readout="add")
    for bad in (
        {"sphere_message": "rotspharmwd", "lmax": 2},
        {"output_message": "rotspharmwd", "lmax": 2},
        {"force_estimator": "mean"},
        {"forces": "conservative"},
        {"forces": "exact", "force_estimator": "grad"},
        {"force_estimator": "grad", "rotations": "random"},
        {"rotations": "fixed"},
        {"hidden_channels": 12},
    ):
        with pytest.raises(ValueError):
            SpinConv(**{**base, **bad})


def test_stress_and_elements_errors():
    """Stress is only defined for the energy-centric model with conservative forces
    (``defines_stress``): not for direct forces, nor for OCP's compat forces, whose stress
    would be the partial derivative through the distance features only (not the energy's
    strain derivative); atomic numbers beyond the embeddings raise ``ValueError``."""
    fc, compat = _model("spinconv_small_fc"), _model("spinconv_small_ec")
    ec = _model("spinconv_small_ec", forces="conservative")
    assert not fc.defines_stress and not compat.defines_stress and ec.defines_stress
    assert compat.energy_gradient and ec.energy_gradient and not fc.energy_gradient
    batch = Batch.from_atoms(ocp_structures()["n2_box"], cutoff=6.0)
    with pytest.raises(ValueError, match="stress"):
        fc(batch, compute_stress=True)
    with pytest.raises(ValueError, match="stress needs forces='conservative'"):
        compat(batch, compute_stress=True)
    assert "stress" not in compat.fixed_shape_forward(compat.fixed_shape_inputs(batch))
    out = ec(batch, compute_stress=True)
    assert out["stress"].shape == (1, 3, 3)
    heavy = Atoms("U2", positions=[[0, 0, 0], [2.5, 0, 0]], cell=[10, 10, 10], pbc=True)
    with pytest.raises(ValueError, match="atomic numbers"):
        ec(Batch.from_atoms(heavy, cutoff=6.0))
    # the same range, as the calculators and the trainer read it
    assert ec.supported_numbers() == list(range(1, ec.max_num_elements))
    assert 92 not in ec.supported_numbers()
    potential = Potential(ec, CheckpointInfo("spinconv", {}, Normalizers(), "forcecalc"))
    with pytest.raises(ValueError, match="no parameters for element"):
        potential.check_numbers(torch.tensor([1, 92]))


def test_isolated_atom_and_no_edges():
    """An atom without neighbors (and a batch without any edge) is evaluated as the original
    evaluates it: the readout of an empty neighborhood (finite, the same alone or in a batch;
    the force-centric force of an empty neighborhood is the force block's bias, not zero)."""
    model = _model("spinconv_small_fc")
    lonely = Atoms("Cu", positions=[[0, 0, 0]], cell=[20, 20, 20], pbc=False)
    out = _run(model, [lonely, ocp_structures()["n2_box"]], torch.float64)
    assert torch.isfinite(out["energy"]).all() and torch.isfinite(out["forces"]).all()
    alone = _run(model, lonely, torch.float64)
    torch.testing.assert_close(alone["energy"][0], out["energy"][0])
    torch.testing.assert_close(alone["forces"][0], out["forces"][0])
    ec = _model("spinconv_small_ec", forces="conservative")
    assert torch.isfinite(_run(ec, lonely, torch.float64)["forces"]).all()


# --------------------------------------------------------------------------- spin convolution


def _direct_spin_convolution(
    block: SpinConvBlock, values: torch.Tensor, directions: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Straightforward reference: bilinear splat onto the lat/long grid with scatter-adds, then
    OCP's ``Conv1d`` with circular padding, Swish, AvgPool over the first ``long`` outputs and
    GroupNorm."""
    lat, long = block.lat, block.long
    n, width, _ = directions.shape
    d = directions.reshape(-1, 3)
    y, z = d[:, 1], d[:, 2]
    pole = y * y + z * z < 1e-12
    y, z = torch.where(pole, 0.0, y), torch.where(pole, 0.0, z)
    col = (torch.atan2(y, z) + math.pi) / (2 * math.pi) * long
    row = (0.99 * (torch.asin(d[:, 0].clamp(-1, 1)) + math.pi / 2) / math.pi + 0.005) * (lat - 1)
    x0, y0 = col.floor(), row.floor()
    dx, dy = col - x0, row - y0
    x0, y0 = x0.long() % long, y0.long() % lat
    x1, y1 = (x0 + 1) % long, (y0 + 1) % lat
    grid = torch.zeros(n * lat * long, values.shape[-1], dtype=values.dtype)
    base = torch.arange(n).repeat_interleave(width) * lat * long
    flat = values.reshape(-1, values.shape[-1]) * valid.reshape(-1, 1)
    for yy, xx, w in (
        (y0, x0, (1 - dx) * (1 - dy)),
        (y0, x1, dx * (1 - dy)),
        (y1, x0, (1 - dx) * dy),
        (y1, x1, dx * dy),
    ):
        grid.index_add_(0, base + yy * long + xx, flat * w.unsqueeze(1))
    grid = grid.view(n, lat * long, -1).transpose(1, 2).reshape(n, -1, long)  # (c, lat) channels
    conv = block.conv1(grid)  # circular padding long // 2
    pooled = torch.nn.functional.avg_pool1d((conv * torch.sigmoid(conv))[:, :, :long], long)
    return block.GroupNorm(pooled.view(n, -1))


@pytest.mark.parametrize(("lat", "long"), [(8, 8), (7, 9), (16, 12), (5, 1)])
def test_spectral_spin_convolution_matches_direct_conv1d(lat, long):
    """The Fourier-space projection + spin convolution equals the direct computation (scatter
    splat, OCP's circular ``Conv1d``, Swish, pooling, GroupNorm) for even and odd longitudes,
    including directions exactly on the poles and padding slots."""
    torch.manual_seed(lat * 100 + long)
    channels, mid, n, width = 16, 32, 5, 7
    block = SpinConvBlock(channels, mid, lat, long).double()
    torch.nn.init.normal_(block.GroupNorm.weight)
    torch.nn.init.normal_(block.GroupNorm.bias)
    directions = torch.nn.functional.normalize(
        torch.randn(n, width, 3, dtype=torch.float64), dim=-1
    )
    directions[0, 0] = torch.tensor([1.0, 0.0, 0.0])
    directions[1, 1] = torch.tensor([-1.0, 1e-18, -1e-18])
    valid = torch.ones(n, width, dtype=torch.bool)
    valid[2, 5:] = False
    features = torch.randn(n * width, channels, dtype=torch.float64)
    neighbors = torch.arange(n * width).view(n, width)
    neighbors[~valid] = n * width  # padding index
    projections = SphereProjections.from_directions(
        directions, RowIndex(neighbors, n * width), lat, long, torch.float64
    )
    ours = projections.spin_convolution(block, features)
    values = features[torch.where(valid, neighbors, 0)]
    direct = _direct_spin_convolution(block, values, directions, valid)
    torch.testing.assert_close(ours, direct, rtol=1e-10, atol=1e-10)


def test_chunked_spin_convolution_equals_one_pass(monkeypatch):
    """Projecting and convolving the grids chunk by chunk (to bound memory), and evaluating the
    mixtures of experts in chunks of rows (to stay in cache), gives the results of one pass,
    for the message blocks and the force block, and for conservative forces (gradients through
    the chunks)."""
    model = _model("spinconv_small_fc")
    structures = [ocp_structures()[n] for n in ("o_pt100", "n2_box")]
    conservative = _model("spinconv_small_ec", forces="conservative")
    monkeypatch.setattr(spinconv_module, "MOE_CHUNK_ROWS", 1 << 30)
    whole = [_run(m, structures, torch.float64) for m in (model, conservative)]
    monkeypatch.setattr(spinconv_module, "CHUNK_BYTES", 300_000)
    monkeypatch.setattr(spinconv_module, "MOE_CHUNK_ROWS", 7)
    chunked = [_run(m, structures, torch.float64) for m in (model, conservative)]
    for ours, reference in zip(chunked, whole, strict=True):
        torch.testing.assert_close(ours["energy"], reference["energy"], rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(ours["forces"], reference["forces"], rtol=1e-12, atol=1e-13)


def test_expert_weights_looked_up_per_element_pair_equal_those_of_the_rows():
    """A mixture of experts with more rows than element pairs computes its experts' weights
    once per pair and looks them up: its outputs and parameter gradients equal those of the
    same rows evaluated a few at a time (fewer rows than pairs: one weight per row)."""
    torch.manual_seed(5)
    block = EmbeddingBlock(6, 5, 8, 4, max_num_elements=3).double()  # 9 element pairs
    x = torch.randn(40, 6, dtype=torch.float64)
    source, target = torch.randint(0, 3, (2, 40))
    parameters = [block.source_embedding.weight, block.target_embedding.weight]
    parameters += [block.embed_fc1.weight, block.fc2.weight]
    looked_up = block(x, source, target)
    chunks = zip(x.split(8), source.split(8), target.split(8), strict=True)
    rows = torch.cat([block(*chunk) for chunk in chunks])
    torch.testing.assert_close(looked_up, rows, rtol=1e-13, atol=1e-14)
    for ours, reference in zip(
        torch.autograd.grad(looked_up.pow(2).sum(), parameters),
        torch.autograd.grad(rows.pow(2).sum(), parameters),
        strict=True,
    ):
        assert ours.abs().sum() > 0
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-14)


def test_force_centric_training_gradients():
    """In train mode a force-centric model's direct forces and energy are differentiable in the
    parameters (force block and message blocks receive finite, non-zero gradients)."""
    model = copy.deepcopy(_model("spinconv_small_fc")).train()
    batch = Batch.from_atoms([ocp_structures()["n2_box"], ocp_structures()["o_pt100"]], cutoff=6.0)
    out = model(batch)
    (out["forces"].pow(2).sum() + out["energy"].pow(2).sum()).backward()
    for module in (model.force_output_block.spinconvblock.conv1, model.message_blocks[0].distfc1):
        assert torch.isfinite(module.weight.grad).all() and module.weight.grad.abs().sum() > 0


def test_odd_longitude_without_distance_scaling():
    """The energy-centric layout of OCP's ``spinconv_small_grad`` (7 x 9 grid, no distance
    scaling) has OCP's parameter shapes and evaluates; conservative forces match a finite
    difference there too."""
    torch.manual_seed(3)
    options = {
        "hidden_channels": 16,
        "mid_hidden_channels": 32,
        "num_interactions": 2,
        "num_basis_functions": 64,
        "sphere_size_lat": 7,
        "sphere_size_long": 9,
        "max_num_neighbors": 20,
        "cutoff": 6.0,
        "force_estimator": "grad",
        "scale_distances": False,
        "basis_width_scalar": 1.0,
    }
    model = SpinConv(**options, forces="conservative").double().eval()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["message_blocks.0.spinconvblock.conv1.weight"] == (32, 56, 9)
    assert shapes["embeddingblock2.source_embedding.weight"] == (90, 32)
    assert not any(k.startswith("dist_block.dist_") for k in shapes)
    assert not any(k.startswith("force_output_block") for k in shapes)
    assert len(shapes) == 84
    atoms = ocp_structures()["ch3_au211"]
    batch = Batch.from_atoms(atoms, cutoff=6.0)
    forces = model(batch)["forces"].detach()
    atom = len(atoms) - 1
    numeric = _finite_difference_force(model, batch, atom, 2, 1e-5)
    assert abs(float(forces[atom, 2]) - numeric) < 1e-6 * float(forces.abs().max())


@CUDA
@pytest.mark.parametrize(
    ("name", "forces"),
    [
        ("spinconv_small_fc", "compat"),
        ("spinconv_small_ec", "compat"),
        ("spinconv_small_ec", "conservative"),
        pytest.param("spinconv_all", "compat", marks=pytest.mark.slow),
    ],
)
def test_cuda_matches_cpu(name, forces):
    """On CUDA, float64, every fixture structure (tie_cut ones too) gives the CPU forces and
    energies to float64 noise (1e-9 relative): no device-dependent pole or tie choices."""
    model = _model(name, forces=forces)
    atoms = _all_structures()
    batch = Batch.from_atoms(atoms, cutoff=model.cutoff, dtype=torch.float64)
    cpu = model(batch)
    gpu = copy.deepcopy(model).cuda()(batch.to("cuda"))
    scale = float(cpu["forces"].detach().abs().max())
    torch.testing.assert_close(
        gpu["forces"].detach().cpu(), cpu["forces"].detach(), rtol=0, atol=1e-9 * scale
    )
    torch.testing.assert_close(
        gpu["energy"].detach().cpu(), cpu["energy"].detach(), rtol=1e-9, atol=1e-9
    )


def _envelope_model(envelope: bool, force_estimator: str = "grad") -> SpinConv:
    torch.manual_seed(3)
    model = SpinConv(
        hidden_channels=16,
        mid_hidden_channels=32,
        num_interactions=2,
        num_basis_functions=16,
        sphere_size_lat=6,
        sphere_size_long=6,
        max_num_neighbors=50,
        cutoff=4.0,
        embedding_size=8,
        force_estimator=force_estimator,
        forces="conservative" if force_estimator == "grad" else "compat",
        envelope=envelope,
    )
    for embedding in model.modules():
        if isinstance(embedding, torch.nn.Embedding):
            torch.nn.init.normal_(embedding.weight)
    return model.double().eval()


@pytest.mark.parametrize("force_estimator", ["grad", "random"])
@pytest.mark.parametrize("envelope", [True, False])
def test_envelope_makes_energy_and_forces_continuous_at_the_cutoff(envelope, force_estimator):
    """With ``envelope=True`` an edge enters the graph with zero weight and zero slope: as
    atom 2 crosses the cutoff of atom 0 (while staying bonded to atom 1), the change of energy
    and forces across the cutoff shrinks linearly with the step (continuity), for conservative
    and for direct (force-block) forces; without it (OCP's architecture) both jump by a
    step-independent amount."""
    model = _envelope_model(envelope, force_estimator)

    def evaluate(distance: float) -> tuple[float, np.ndarray]:
        atoms = Atoms("CuOH", positions=[[0, 0, 0], [1.2, 1.5, 0.3], [0, 0.4, 0.1]], pbc=False)
        atoms.positions[2, 0] = math.sqrt(distance**2 - 0.4**2 - 0.1**2)
        out = model(Batch.from_atoms(atoms, cutoff=model.cutoff + 1.0))
        return float(out["energy"].detach()), out["forces"].detach().numpy()

    def jumps(step: float) -> tuple[float, float]:
        inside, outside = evaluate(model.cutoff - step), evaluate(model.cutoff + step)
        return abs(inside[0] - outside[0]), float(np.abs(inside[1] - outside[1]).max())

    (energy_coarse, force_coarse), (energy_fine, force_fine) = jumps(1e-4), jumps(1e-6)
    if envelope:
        assert energy_fine < 0.02 * energy_coarse
        assert force_fine < 0.02 * force_coarse
    else:
        assert energy_fine > 0.5 * energy_coarse
        assert force_fine > 0.5 * force_coarse


def test_envelope_conservative_forces_match_finite_differences():
    """The envelope is part of the energy: forces of an ``envelope=True`` model are still minus
    the finite-difference gradient (slab with periodic images, step 1e-5 Å)."""
    model = _envelope_model(True)
    atoms = ocp_structures()["o_pt100"]
    batch = Batch.from_atoms(atoms, cutoff=model.cutoff)
    forces = model(batch)["forces"].detach()
    scale = float(forces.abs().max())
    for atom, axis in [(0, 0), (len(atoms) - 1, 2)]:
        numeric = _finite_difference_force(model, batch, atom, axis, 1e-5)
        assert abs(float(forces[atom, axis]) - numeric) < 1e-6 * scale, (atom, axis)


@CUDA
@pytest.mark.parametrize("name", ["spinconv_small_fc", "spinconv_small_ec"])
def test_cuda_repeated_calls_bit_identical(name):
    """On CUDA, float32, repeated calls give bitwise the same energies and forces (conservative
    forces of the energy-centric model included): no atomics in sums or gradients."""
    model = copy.deepcopy(_model(name, forces="conservative" if name.endswith("ec") else "compat"))
    model = model.float().cuda()
    batch = Batch.from_atoms(_all_structures(), cutoff=model.cutoff, dtype=torch.float32)
    batch = batch.to("cuda")
    first = model(batch)
    for _ in range(3):
        again = model(batch)
        assert torch.equal(again["energy"], first["energy"])
        assert torch.equal(again["forces"], first["forces"])


@pytest.mark.parametrize("max_neighbors", [8, 100])
def test_an_envelope_model_warns_when_the_max_neighbor_rule_cuts(max_neighbors: int) -> None:
    """With the envelope an energy-centric model is smooth only while the max-neighbor rule
    never cuts: a structure where an atom has more neighbors within the cutoff than the rule
    keeps gets a warning saying so (a rattled crystal: no ties keep them all); with room for
    every neighbor, none."""
    from ase.build import bulk

    from forcecalc import ForcecalcWarning

    model = _variant("spinconv_small_ec", {"forces": "conservative"}, envelope=True)
    model.max_neighbors = max_neighbors
    crystal = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    crystal.rattle(0.02, seed=1)
    batch = Batch.from_atoms([crystal], cutoff=model.cutoff)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(batch)
    cut = [w for w in caught if issubclass(w.category, ForcecalcWarning)]
    assert len(cut) == (1 if max_neighbors == 8 else 0)
    if cut:
        assert f"more than 8 neighbors within {model.cutoff:g} Å" in str(cut[0].message)
