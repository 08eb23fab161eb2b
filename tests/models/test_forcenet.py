"""ForceNet: OCP checkpoint compatibility, reference outputs, harmonics, batching, invariances."""

from __future__ import annotations

import copy
import math
from functools import cache

import numpy as np
import pytest
import torch
from devices import CUDA, DEVICES, CaptureSafety
from ocp_fixtures import load_ocp_raw, ocp_reference, ocp_structures

from forcecalc.checkpoint import Potential
from forcecalc.graph.batch import Batch
from forcecalc.models.forcenet import (
    ABLATIONS,
    ACTIVATIONS,
    PLAIN_BASES,
    ForceNet,
    real_spherical_harmonics,
    spherical_harmonic_orders,
)

MODELS = ["forcenet_small", "forcenet_small_gauss", "forcenet_all"]
DTYPES = [torch.float64, torch.float32]


def _state_dict(raw: dict) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in raw["state_dict"].items()}


@cache
def _loaded(name: str) -> tuple[ForceNet, dict]:
    """The float32 model of fixture ``name`` (eval mode) and its raw checkpoint."""
    raw = load_ocp_raw(name)
    model = ForceNet(**raw["config"]["model_attributes"])
    model.load_state_dict(_state_dict(raw), strict=True)
    return model.eval(), raw


def _model(name: str, dtype: torch.dtype) -> ForceNet:
    model, _ = _loaded(name)
    return copy.deepcopy(model).to(dtype)


def _run(
    model: ForceNet, atoms, dtype: torch.dtype, cutoff: float | None = None, device: str = "cpu"
) -> dict:
    batch = Batch.from_atoms(atoms, cutoff=cutoff or model.cutoff, dtype=dtype)
    with torch.no_grad():
        out = (model if device == "cpu" else copy.deepcopy(model).to(device))(batch.to(device))
    return {k: v.cpu() for k, v in out.items()}


def _small_model(**kwargs) -> ForceNet:
    torch.manual_seed(0)
    options = {"hidden_channels": 16, "decoder_hidden_channels": 16, "num_interactions": 2}
    options.update(kwargs)
    return ForceNet(**options).eval()


@pytest.mark.parametrize("name", MODELS)
def test_strict_load(name):
    """Every ForceNet fixture checkpoint loads with ``strict=True`` (names, shapes, no extras)."""
    raw = load_ocp_raw(name)
    model = ForceNet(**raw["config"]["model_attributes"])
    sd = _state_dict(raw)
    assert model.load_state_dict(sd, strict=True)
    ours = model.state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {
        k: tuple(v.shape) for k, v in sd.items()
    }


@pytest.mark.parametrize("name", MODELS)
def test_fresh_tables_equal_checkpoint(name):
    """A fresh model's fixed tables (atom_map, atom_radii, frequencies / Gaussian centres) are
    bitwise OCP's, i.e. :mod:`forcecalc.models.elements` reproduces OCP's element data."""
    raw = load_ocp_raw(name)
    fresh = ForceNet(**raw["config"]["model_attributes"]).state_dict()
    saved = _state_dict(raw)
    keys = [
        k
        for k in saved
        if k in ("atom_map", "atom_radii") or k.endswith(("freq_filter", "smearing.offset"))
    ]
    assert len(keys) >= 4
    for key in keys:
        assert fresh[key].dtype == saved[key].dtype == torch.float32, key
        assert torch.equal(fresh[key].nan_to_num(-9.0), saved[key].nan_to_num(-9.0)), key


@pytest.mark.parametrize(
    "device",
    DEVICES,
)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("name", MODELS)
def test_reference_outputs(name, dtype, device):
    """Energies and forces (denormalised with the checkpoint's normalizers) equal OCP's float64
    references on every structure without a tie at the max-neighbor cut, on the CPU and on
    CUDA: float64 within 1e-6 eV
    and 1e-6 x max|F|; float32 within 2e-3 eV (x |E|/20 for |E| > 20 eV) and 2e-3 x max|F|;
    the same for the forces minus their mean."""
    model = _model(name, dtype)
    _, raw = _loaded(name)
    norm = raw["normalizers"]
    e_mean, e_std = float(norm["target"]["mean"]), float(norm["target"]["std"])
    f_std = float(norm["grad_target"]["std"])
    results = ocp_reference()["models"][name]["results"]
    structures = ocp_structures()
    checked = 0
    for structure, ref in results.items():
        if ref["tie_cut"]:
            continue
        out = _run(model, structures[structure], dtype, device=device)
        energy = out["energy"].double().item() * e_std + e_mean
        forces = out["forces"].double().numpy() * f_std
        ref_forces = np.asarray(ref["forces"])
        scale = np.abs(ref_forces).max()
        if dtype == torch.float64:
            e_tol, f_tol = 1e-6, 1e-6 * scale
        else:
            e_tol, f_tol = 2e-3 * max(1.0, abs(ref["energy"]) / 20.0), 2e-3 * scale
        assert abs(energy - ref["energy"]) <= e_tol, (structure, energy, ref["energy"])
        np.testing.assert_allclose(forces, ref_forces, rtol=0, atol=f_tol, err_msg=structure)
        np.testing.assert_allclose(
            forces - forces.mean(0),
            ref_forces - ref_forces.mean(0),
            rtol=0,
            atol=f_tol,
            err_msg=structure,
        )
        checked += 1
    assert checked >= 4


@pytest.mark.parametrize("option", ["all", "sine", "cosine"])
def test_spherical_harmonics_match_scipy(option):
    """Our torch real spherical harmonics equal scipy's complex ``Y_n^m`` (``sph_harm_y``, with
    OCP's angles and column layout: Re m=0 | Re m>0 | Im m>0), poles and axes included."""
    from scipy.special import sph_harm_y

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(200, 3)) * rng.uniform(0.5, 3.0, size=(200, 1))
    axes = np.concatenate([np.eye(3), -np.eye(3), [[1e-4, 0, 1], [0, -1e-4, -1], [1, 1, 0]]])
    vectors = np.concatenate([vectors, axes])
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    polar = np.arccos(np.clip(unit[:, 2], -1, 1))
    azimuth = np.arctan2(-unit[:, 1], -unit[:, 0]) + np.pi  # OCP's convention
    degrees, orders = spherical_harmonic_orders(7, option)
    n, m = np.array(degrees), np.array(orders)
    harm = sph_harm_y(n[None, :], m[None, :], polar[:, None], azimuth[:, None])
    expected = np.concatenate(
        [harm[:, m == 0].real, harm[:, m != 0].real, harm[:, m != 0].imag], axis=1
    )
    ours = real_spherical_harmonics(torch.as_tensor(vectors), degrees, orders)
    assert ours.dtype == torch.float64
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-12)
    ours32 = real_spherical_harmonics(
        torch.as_tensor(vectors, dtype=torch.float32), degrees, orders
    )
    np.testing.assert_allclose(ours32.numpy(), expected, rtol=0, atol=2e-5)


def test_batch_equals_single_structures():
    """A batch of all fixture structures gives each structure's results (float64, 1e-10)."""
    model = _model("forcenet_small", torch.float64)
    atoms = list(ocp_structures().values())
    batched = _run(model, atoms, torch.float64)
    start = 0
    for index, structure in enumerate(atoms):
        single = _run(model, structure, torch.float64)
        stop = start + len(structure)
        torch.testing.assert_close(
            batched["energy"][index], single["energy"][0], rtol=1e-10, atol=0
        )
        torch.testing.assert_close(
            batched["forces"][start:stop], single["forces"], rtol=0, atol=1e-10
        )
        start = stop
    assert batched["energy"].shape == (len(atoms),)
    assert batched["forces"].shape == (start, 3)


def test_superset_edges():
    """Extra edges in the batch (built at cutoff + 2 Å, no max-neighbor filtering) change
    nothing: the model applies its own cutoff and 50-neighbor rule."""
    model = _model("forcenet_small", torch.float64)
    structure = ocp_structures()["co_cu111"]
    exact = _run(model, structure, torch.float64)
    wide = _run(model, structure, torch.float64, cutoff=model.cutoff + 2.0)
    torch.testing.assert_close(wide["energy"], exact["energy"], rtol=1e-12, atol=0)
    torch.testing.assert_close(wide["forces"], exact["forces"], rtol=0, atol=1e-12)


def test_translation_and_determinism():
    """Translating a structure leaves forces and energy unchanged (float64, 1e-8 relative),
    and two calls give bitwise identical results.  (ForceNet is not rotation-equivariant by
    design, so rotations are not tested.)"""
    model = _model("forcenet_small", torch.float64)
    structure = ocp_structures()["oh_ni111_skew"]
    first = _run(model, structure, torch.float64)
    again = _run(model, structure, torch.float64)
    assert torch.equal(first["energy"], again["energy"])
    assert torch.equal(first["forces"], again["forces"])
    moved = structure.copy()
    moved.translate([0.37, -1.21, 2.55])
    shifted = _run(model, moved, torch.float64)
    scale = first["forces"].abs().max()
    torch.testing.assert_close(shifted["forces"], first["forces"], rtol=0, atol=1e-8 * scale)
    torch.testing.assert_close(shifted["energy"], first["energy"], rtol=1e-8, atol=0)


SPHERICAL = ["sphallmul", "sphallcat", "sphallm40", "sphallnosine", "sphsinemul", "sphcosinecat"]


@pytest.mark.parametrize("basis", list(PLAIN_BASES) + SPHERICAL)
@pytest.mark.parametrize("feat", ["full", "simple"])
def test_every_basis_runs(basis, feat):
    """Every basis OCP accepted, with both atom features, builds, round-trips its state_dict
    strictly, gives finite outputs of the right shapes and differentiates."""
    model = _small_model(basis=basis, feat=feat, num_freqs=8, max_n=4)
    copy_ = _small_model(basis=basis, feat=feat, num_freqs=8, max_n=4, cutoff=5.0)
    copy_.load_state_dict(model.state_dict(), strict=True)
    structure = ocp_structures()["ch3_au211"]
    batch = Batch.from_atoms(structure, cutoff=model.cutoff, dtype=torch.float32)
    out = model(batch)
    assert out["energy"].shape == (1,) and out["forces"].shape == (len(structure), 3)
    assert torch.isfinite(out["energy"]).all() and torch.isfinite(out["forces"]).all()
    (out["energy"].sum() + out["forces"].square().sum()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ablation", ["none", "nofilter"])
def test_fixed_shape_forward_equals_forward(dtype, ablation):
    """The fixed-shape forward (the batch's edges as candidates, padded; the cutoff and the
    50-neighbor rule as a mask inside: what a CUDA graph replays) gives the forward's
    energies and forces, single structures and a batch, and for candidates of a graph with a
    skin after the atoms moved; with ``nofilter`` the messages are the masked filters
    themselves."""
    if ablation == "none":
        model = _model("forcenet_small", dtype)
    else:
        model = _small_model(ablation=ablation).to(dtype)
    structures = ocp_structures()
    cases = [[structures[name]] for name in ("co_cu111", "n2_box")]
    cases.append([structures[name] for name in ("o_pt100", "n2_box", "cu_fcc_prim")])
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    for atoms in cases:
        batch = Batch.from_atoms(atoms, cutoff=model.cutoff, dtype=dtype)
        inputs = model.fixed_shape_inputs(batch)
        assert inputs["candidate_index"].shape[1] > batch.n_edges  # padding present
        fixed = model.fixed_shape_forward(inputs)
        with torch.no_grad():
            plain = model(batch)
        assert not fixed["overflow"]
        torch.testing.assert_close(fixed["energy"], plain["energy"], rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(fixed["forces"], plain["forces"], rtol=tolerance, atol=tolerance)
    # candidates from a graph with a skin, atoms moved: the mask selects what forward keeps
    atoms = ocp_structures()["co_cu111"].copy()
    first = Batch.from_atoms(atoms, cutoff=model.cutoff + 1.0, dtype=dtype)
    inputs = model.fixed_shape_inputs(first)
    atoms.positions += (
        np.random.default_rng(0).normal(scale=0.15, size=(len(atoms), 3)).clip(-0.45, 0.45)
    )
    fixed = model.fixed_shape_forward(
        Potential.moved(inputs, first.with_positions(torch.as_tensor(atoms.positions)))
    )
    with torch.no_grad():
        plain = model(Batch.from_atoms(atoms, cutoff=model.cutoff, dtype=dtype))
    torch.testing.assert_close(fixed["energy"], plain["energy"], rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(fixed["forces"], plain["forces"], rtol=tolerance, atol=tolerance)


def test_fixed_shape_forward_never_reads_values_on_the_host():
    """As for SpinConv: the meta device has shapes and no values, so an operation that CUDA
    graph capture forbids (a result shape or branch that depends on values) fails there; the
    fixed-shape forward runs on it (storing no Python number by indexing), the plain forward
    does not."""
    model = _model("forcenet_small", torch.float32)
    batch = Batch.from_atoms(ocp_structures()["co_cu111"], cutoff=model.cutoff)
    inputs = model.fixed_shape_inputs(batch.to(dtype=torch.float32))
    meta = model.to("meta")
    with CaptureSafety():
        out = meta.fixed_shape_forward({k: v.to("meta") for k, v in inputs.items()})
    assert out["energy"].shape == (1,) and out["forces"].shape == (batch.n_atoms, 3)
    with pytest.raises((RuntimeError, NotImplementedError)):
        meta(batch.to("meta"))


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_ablations(ablation):
    """Each of the paper's ablations builds and runs (non-spherical basis where 'onlydist')."""
    basis = "powersine" if ablation == "onlydist" else "sphallmul"
    model = _small_model(ablation=ablation, basis=basis, num_freqs=8)
    structure = ocp_structures()["n2_box"]
    out = _run(model, structure, torch.float32)
    assert torch.isfinite(out["forces"]).all() and torch.isfinite(out["energy"]).all()
    keys = model.state_dict().keys()
    assert ("interactions.0.lin.weight" in keys) == (ablation != "nofilter")
    assert ("interactions.0.center_W" in keys) == (ablation != "noself")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("decoder_type", ["mlp", "linear"])
def test_activations_and_decoders(activation, decoder_type):
    """Every activation of OCP's ``Act`` and both force decoders run in float64."""
    model = _small_model(
        activation_str=activation,
        decoder_activation_str=activation,
        decoder_type=decoder_type,
        num_freqs=8,
    ).double()
    out = _run(model, ocp_structures()["n2_box"], torch.float64)
    assert torch.isfinite(out["forces"]).all()
    expected = ["decoder.decoder.0.weight"]
    if decoder_type == "mlp":
        expected += ["decoder.decoder.1.running_mean", "decoder.decoder.3.weight"]
    assert set(expected) <= set(model.state_dict())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"basis": "sphmul"},
        {"basis": "sphallmulcat"},
        {"basis": "sphall"},
        {"basis": "cosine"},
        {"basis": "sphallmul", "ablation": "onlydist"},
        {"ablation": "nothing"},
        {"feat": "onehot"},
        {"decoder_type": "deep"},
        {"activation_str": "gelu"},
    ],
)
def test_invalid_options(kwargs):
    """Options the original rejected (or crashed on) raise a clear ValueError."""
    with pytest.raises(ValueError):
        ForceNet(hidden_channels=8, decoder_hidden_channels=8, num_interactions=1, **kwargs)


def test_contract_attributes():
    """The attributes the package relies on: cutoff, max_neighbors 50, no stress, supported
    elements (finite table rows only: no Kr, Xe, At, Rn, Fr)."""
    model = ForceNet(hidden_channels=8, decoder_hidden_channels=8, num_interactions=1, cutoff=6)
    assert model.cutoff == 6.0 and isinstance(model.cutoff, float)
    assert model.max_neighbors == 50
    assert model.defines_stress is False
    supported = model.supported_numbers()
    assert {1, 6, 8, 29, 78, 79} <= set(supported)
    assert not {0, 36, 54, 85, 86, 87, 97} & set(supported)
    assert max(supported) <= 100
    assert math.isnan(float(model.atom_radii[36]))


@CUDA
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_cuda_matches_cpu(dtype):
    """On CUDA the model gives the CPU results (float64 1e-9, float32 1e-4 relative to max|F|)."""
    model = _model("forcenet_small", dtype)
    atoms = list(ocp_structures().values())
    batch = Batch.from_atoms(atoms, cutoff=model.cutoff, dtype=dtype)
    with torch.no_grad():
        cpu = model(batch)
        gpu = copy.deepcopy(model).cuda()(batch.to("cuda"))
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    scale = cpu["forces"].abs().max()
    torch.testing.assert_close(gpu["forces"].cpu(), cpu["forces"], rtol=0, atol=tol * scale)
    torch.testing.assert_close(gpu["energy"].cpu(), cpu["energy"], rtol=tol, atol=tol)
