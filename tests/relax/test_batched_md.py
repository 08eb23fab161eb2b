"""Batched MD: velocity Verlet and Langevin against ASE's integrators, FixAtoms, statistics."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.md.langevin import Langevin
from ase.md.verlet import VelocityVerlet
from collisions import head_on_pair
from relax_helpers import (
    HarmonicModel,
    MorseVariant,
    OutOfMemoryAbove,
    as_potential,
    mixed_structures,
    morse_potential,
    rattled_slab,
    single_thread,
)

from forcecalc import ForcecalcWarning
from forcecalc.calculator import load_calculator
from forcecalc.relax import md, relax

__all__ = ["single_thread"]


def _thermalized() -> list[Atoms]:
    """Three systems with random momenta: a slab with FixAtoms, CH4 and periodic Cu."""
    systems = [rattled_slab(1), mixed_structures()[9], mixed_structures()[16]]
    for k, atoms in enumerate(systems):
        rng = np.random.default_rng(100 + k)
        atoms.set_momenta(rng.normal(0, 0.3, size=(len(atoms), 3)))
    return systems


def _ase_run(atoms: Atoms, steps: int, integrator: str, seed: int, fixcm: bool, interval: int):
    """ASE's integrator on a copy with forcecalc's calculator; returns it and its frames."""
    atoms = atoms.copy()
    atoms.calc = load_calculator(morse_potential())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # ASE deprecates fixcm=True
        if integrator == "verlet":
            dynamics = VelocityVerlet(atoms, timestep=0.5 * units.fs)
        else:
            dynamics = Langevin(
                atoms,
                timestep=0.5 * units.fs,
                temperature_K=600,
                friction=0.05 / units.fs,
                fixcm=fixcm,
                rng=np.random.default_rng(seed),
            )
    frames: list[tuple[np.ndarray, np.ndarray]] = []
    dynamics.attach(lambda: frames.append((atoms.positions.copy(), atoms.get_momenta())), interval)
    dynamics.run(steps)
    return atoms, frames


def test_velocity_verlet_equals_three_ase_runs():
    """Contract: batched NVE velocity Verlet of 3 systems (one with FixAtoms, one periodic)
    equals 3 single ASE VelocityVerlet runs with forcecalc's calculator: positions and momenta
    at every 10th step within 1e-9, final energies and forces alike; fixed atoms never move."""
    systems = _thermalized()
    results = md(systems, morse_potential(), steps=60, timestep=0.5, trajectory_interval=10)
    for original, result in zip(systems, results, strict=True):
        reference, frames = _ase_run(original, 60, "verlet", 0, False, 10)
        assert result.info["md_steps"] == 60
        ours = result.info["trajectory"]
        assert len(ours) == len(frames) == 7
        for frame, (positions, momenta) in zip(ours, frames, strict=True):
            np.testing.assert_allclose(frame.positions, positions, atol=1e-9)
            np.testing.assert_allclose(frame.get_momenta(), momenta, atol=1e-9)
        np.testing.assert_allclose(result.get_momenta(), reference.get_momenta(), atol=1e-9)
        assert result.get_potential_energy() == pytest.approx(reference.get_potential_energy())
        np.testing.assert_allclose(result.get_forces(), reference.get_forces(), atol=1e-9)
        if original.constraints:
            fixed = original.constraints[0].get_indices()
            assert np.array_equal(result.positions[fixed], original.positions[fixed])
            assert not result.get_momenta()[fixed].any()


def test_velocity_verlet_conserves_energy():
    """Contract: NVE with a float64 potential conserves the total energy (drift < 1e-3 eV
    over 200 steps of 0.5 fs) for every system of the batch."""
    systems = _thermalized()
    start = []
    for atoms in systems:
        check = atoms.copy()
        check.calc = load_calculator(morse_potential())
        start.append(check.get_potential_energy() + check.get_kinetic_energy())
    results = md(systems, morse_potential(), steps=200, timestep=0.5)
    for total, result in zip(start, results, strict=True):
        final = result.get_potential_energy() + result.get_kinetic_energy()
        assert abs(final - total) < 1e-3


@pytest.mark.parametrize("fixcm", [False, True])
def test_langevin_numpy_stream_equals_ase(fixcm):
    """Contract: Langevin with rng="numpy" draws system i's random numbers from
    default_rng(seed + i) as ASE's Langevin(rng=default_rng(seed + i)) does, so the 3 batched
    trajectories equal 3 ASE runs (ASE's friction/temperature conventions; with and without
    ASE's fixcm correction) within 1e-9; fixed atoms stay put."""
    systems = _thermalized()
    results = md(
        systems,
        morse_potential(),
        steps=40,
        timestep=0.5,
        integrator="langevin",
        temperature_K=600,
        friction=0.05,
        fixcm=fixcm,
        rng="numpy",
        seed=11,
        batch_size=2,
    )
    for k, (original, result) in enumerate(zip(systems, results, strict=True)):
        reference, _ = _ase_run(original, 40, "langevin", 11 + k, fixcm, 1)
        np.testing.assert_allclose(result.positions, reference.positions, atol=1e-9)
        np.testing.assert_allclose(result.get_momenta(), reference.get_momenta(), atol=1e-9)
        if original.constraints:
            fixed = original.constraints[0].get_indices()
            assert np.array_equal(result.positions[fixed], original.positions[fixed])


def test_langevin_torch_stream_samples_the_canonical_ensemble():
    """Contract: Langevin with on-device torch random numbers samples the canonical ensemble:
    for 32 systems of 4 harmonically tethered atoms at 300 K, the mean kinetic energy per
    degree of freedom is kT/2 and the position variance kT/k, within 5 % (averaged over
    1000 steps after equilibration); the batched systems are independent (different paths)."""
    n_systems, n_atoms, spring, temperature = 32, 4, 2.0, 300.0
    anchors = np.random.default_rng(0).uniform(0, 10, size=(n_systems * n_atoms, 3))
    potential = as_potential(HarmonicModel(anchors, spring), name="harmonic")
    systems = []
    for s in range(n_systems):
        tags = np.arange(s * n_atoms, (s + 1) * n_atoms)
        systems.append(Atoms("Cu4", positions=anchors[tags], tags=tags))
    results = md(
        systems,
        potential,
        steps=1400,
        timestep=2.0,
        integrator="langevin",
        temperature_K=temperature,
        friction=0.02,
        seed=3,
        trajectory_interval=2,
        skin=1.0,
    )
    kinetic, squared = [], []
    for result in results:
        for frame in result.info["trajectory"][200:]:
            kinetic.append(frame.get_kinetic_energy() / (3 * n_atoms))
            squared.append(((frame.positions - anchors[frame.get_tags()]) ** 2).mean())
    kT = units.kB * temperature
    assert np.mean(kinetic) == pytest.approx(kT / 2, rel=0.05)
    assert np.mean(squared) == pytest.approx(kT / spring, rel=0.05)
    first = [r.positions[0] - anchors[r.get_tags()[0]] for r in results]
    assert np.std(first) > 0.1 * np.sqrt(kT / spring)


def test_md_batches_in_sequence_and_order():
    """Contract: with batch_size=2, 5 systems run in batches one after another and come back
    in input order, equal to the run with all in one batch."""
    systems = (_thermalized() + _thermalized())[:5]
    potential = morse_potential()
    small = md(systems, potential, steps=15, timestep=0.5, batch_size=2)
    whole = md(systems, potential, steps=15, timestep=0.5, batch_size=5)
    for a, b in zip(small, whole, strict=True):
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-12)


def test_md_invalid_arguments():
    """Contract: a Langevin run without temperature, unknown integrators (names in any case
    are known) or rng modes, steps, seeds or trajectory intervals that are not integers >= 0,
    time steps, temperatures and frictions outside md's ranges (NaN, inf and absurd values
    such as 1e300 among them: no dynamics, and overflowing coefficients), fixcm with a 1-atom
    system, raise ValueError naming them."""
    systems = _thermalized()
    potential = morse_potential()
    with pytest.raises(ValueError, match="temperature_K"):
        md(systems, potential, steps=1, integrator="langevin")
    with pytest.raises(ValueError, match="integrator"):
        md(systems, potential, steps=1, integrator="nose-hoover")
    with pytest.raises(ValueError, match="rng"):
        md(systems, potential, steps=1, rng="python")
    for name, bad in (("steps", -1), ("steps", 2.0), ("seed", 1.5), ("seed", -1)):
        with pytest.raises(ValueError, match=f"{name} must be an integer >= 0"):
            md(systems, potential, **{"steps": 1, name: bad})
    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match="trajectory_interval must be an integer >= 0"):
            md(systems, potential, steps=1, trajectory_interval=bad)
    assert len(md(systems[:1], potential, steps=1, integrator="VERLET")) == 1  # any case
    with pytest.raises(ValueError, match="temperature_K applies to Langevin dynamics only"):
        md(systems, potential, steps=1, temperature_K=300)
    inf = float("inf")
    for bad in (
        *({"timestep": value} for value in (0.0, -1.0, inf, 1e300)),
        *({"temperature_K": value} for value in (-5.0, inf, 1e300)),
        *({"friction": value} for value in (-1, inf, 1e300)),
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            md(systems, potential, steps=1, integrator="langevin", **{"temperature_K": 300, **bad})
    # fixcm with a 1-atom system: named before any forward pass, not when its batch starts
    counting = OutOfMemoryAbove(potential, max_atoms=10**9)
    lone = Atoms("Cu", positions=[[0, 0, 0]], cell=[5, 5, 5], pbc=True)
    with pytest.raises(ValueError, match=r"^structure 3 \(Cu\): fixcm=True needs at least two"):
        md([*systems, lone], counting, steps=5, integrator="langevin", temperature_K=300,
           fixcm=True, batch_size=1)  # fmt: skip
    assert counting.calls == 0


def test_continued_runs_do_not_nest_trajectories():
    """Contract: a run started from an earlier run's outputs (which carry their trajectory in
    ``info``) records frames without that old trajectory inside them."""
    potential = morse_potential()
    first = md(_thermalized(), potential, steps=4, timestep=0.5, trajectory_interval=1)
    second = md(first, potential, steps=4, timestep=0.5, trajectory_interval=1)
    assert all("trajectory" not in frame.info for frame in second[0].info["trajectory"])
    relaxed = relax(second, potential, steps=3, trajectory=True)
    assert all("trajectory" not in frame.info for frame in relaxed[0].info["trajectory"])


def test_md_float32_checkpoint_runs():
    """Contract: MD with a real checkpoint (ForceNet, float32) runs and keeps FixAtoms."""
    from ocp_fixtures import ocp_checkpoint_path

    path = ocp_checkpoint_path("forcenet_small")
    systems = [rattled_slab(1)]
    [result] = md(systems, str(path), steps=3, device="cpu", timestep=0.5)
    fixed = systems[0].constraints[0].get_indices()
    assert np.array_equal(result.positions[fixed], systems[0].positions[fixed])
    assert torch.isfinite(torch.as_tensor(result.get_forces())).all()


def test_md_takes_model_options_for_the_checkpoint_it_loads():
    """Contract: ``md(..., forces="conservative")`` with an OCP energy-centric checkpoint's
    path runs the dynamics of the energy's gradient (the model loaded with that option: the
    same trajectory), not the checkpoint's own ``compat`` forces (another one)."""
    from ocp_fixtures import ocp_checkpoint_path

    from forcecalc.checkpoint import load_checkpoint

    path = ocp_checkpoint_path("spinconv_small_ec")
    systems = [rattled_slab(2)]
    loaded = load_checkpoint(path, device="cpu", forces="conservative")
    [reference] = md(systems, loaded, steps=2, timestep=0.5)
    [by_path] = md(systems, str(path), steps=2, timestep=0.5, device="cpu", forces="conservative")
    [compat] = md(systems, str(path), steps=2, timestep=0.5, device="cpu")
    assert np.array_equal(by_path.positions, reference.positions)
    assert np.array_equal(by_path.get_forces(), reference.get_forces())
    assert np.abs(compat.get_forces() - by_path.get_forces()).max() > 1e-4


@pytest.mark.parametrize(
    ("skin", "bad", "output", "integrator"),
    [
        (0.0, torch.inf, "forces", "verlet"),
        (0.5, torch.nan, "forces", "verlet"),
        (0.0, torch.nan, "energy", "verlet"),
        (0.0, torch.nan, "forces", "langevin"),
    ],
)
def test_a_system_the_model_fails_on_stops_alone_and_is_named(skin, bad, output, integrator):
    """Contract: when the model's energy or forces of a system stop being finite (here from
    its third evaluation, step 2), that system alone leaves the batch, returned as it was at
    the step before (finite) with ``info["md_error"]`` naming the step, and a warning names
    it by its input place and formula; the other systems run all their steps exactly as
    without it (Langevin: with ASE's per-system streams).  Before, a NaN energy went
    unnoticed, bad forces were called a diverging time step a step later, and at the last
    step the structure came back with NaN forces and no word."""
    potential = morse_potential()

    class Failing(MorseVariant):
        """The Morse potential; from its third call, non-finite outputs for 5-atom systems."""

        def outputs(self, batch):
            out = self.inner(batch)
            if self.calls < 3:
                return out
            five = batch.natoms == 5
            if output == "energy":
                return {**out, "energy": torch.where(five, bad, out["energy"])}
            forces = torch.where(five[batch.system_idx][:, None], bad, out["forces"])
            return {**out, "forces": forces}

    systems = _thermalized()
    assert [len(atoms) == 5 for atoms in systems] == [False, True, False]  # CH4 fails
    options = {"steps": 4, "timestep": 0.5, "skin": skin, "trajectory_interval": 1}
    if integrator == "langevin":
        options.update(integrator="langevin", temperature_K=600, friction=0.05, rng="numpy")
    with pytest.warns(ForcecalcWarning, match=r"^structure 1 \(CH4\): MD stopped at step 2: the"):
        results = md(systems, Failing(), batch_size=3, **options)
    alone = md(systems, potential, batch_size=1, **options)
    stopped = results[1]
    assert stopped.info["md_steps"] == 1
    assert stopped.info["md_error"].startswith("MD stopped at step 2: the model's energy or forces")
    np.testing.assert_array_equal(stopped.positions, alone[1].info["trajectory"][1].positions)
    assert np.isfinite(stopped.get_forces()).all() and np.isfinite(stopped.get_potential_energy())
    assert len(stopped.info["trajectory"]) == 2
    for k in (0, 2):
        assert results[k].info["md_steps"] == 4 and "md_error" not in results[k].info
        assert len(results[k].info["trajectory"]) == 5
        np.testing.assert_allclose(results[k].positions, alone[k].positions, atol=1e-12)
        np.testing.assert_allclose(results[k].get_momenta(), alone[k].get_momenta(), atol=1e-12)


@pytest.mark.parametrize("skin", [0.0, 1.0])
def test_a_system_whose_atoms_collide_stops_alone(skin):
    """Contract: a system whose atoms come within 0.01 Å of each other (two free atoms flying
    head-on, no forces) leaves the batch at that step with ``info["md_error"]`` quoting the
    graph builder (which atoms overlap), returned as it was at the step before; the others
    run all their steps.  Also with a skin wider than their way (each moves 0.5 Å, less than
    half the skin: no rebuild by motion), where they once passed through each other."""

    class ForceFree(MorseVariant):
        """The Morse potential's energies, with zero forces."""

        def outputs(self, batch):
            out = self.inner(batch)
            return {**out, "forces": torch.zeros_like(out["forces"])}

    pair = head_on_pair("H2", gap=1.0, step=0.5)
    others = _thermalized()
    with pytest.warns(ForcecalcWarning, match=r"^structure 1 \(H2\): MD stopped at step 1"):
        results = md([others[0], pair, others[2]], ForceFree(), steps=3, timestep=0.5, skin=skin)
    assert results[1].info["md_steps"] == 0
    assert "atoms 0 and 1" in results[1].info["md_error"]
    np.testing.assert_array_equal(results[1].positions, pair.positions)
    alone = md([others[0], others[2]], ForceFree(), steps=3, timestep=0.5)
    for result, reference in zip([results[0], results[2]], alone, strict=True):
        assert result.info["md_steps"] == 3
        np.testing.assert_allclose(result.positions, reference.positions, atol=1e-12)


@pytest.mark.parametrize("skin", [0.0, 0.5])
def test_systems_stopping_together_are_each_named_with_their_reason(skin):
    """Contract: two systems stopping in one step for different reasons (two atoms meeting;
    momenta that are not finite, so that the positions diverge) get one warning each, with
    their own reason, as their ``md_error``s say (one warning gave the first one's reason for
    both).  Also with a skin, where NaN positions never looked "moved" (a run once went on
    and returned NaN positions)."""
    potential = morse_potential()
    pair = head_on_pair("H2", gap=1.0, step=0.5)
    water = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    water.center(vacuum=4.0)
    water.set_momenta([[np.inf, 0, 0], [0, 0, 0], [0, 0, 0]])
    others = _thermalized()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ForcecalcWarning)
        results = md(
            [others[0], pair, others[2], water], potential, steps=2, timestep=0.5, skin=skin
        )
    messages = sorted(str(w.message) for w in caught if "MD " in str(w.message))
    assert len(messages) == 2
    assert messages[0].startswith("structure 1 (H2): MD stopped at step 1: atoms 0 and 1")
    assert messages[1].startswith("structure 3 (H2O): MD diverged at step 1")
    assert results[1].info["md_error"].startswith("MD stopped at step 1")
    assert results[3].info["md_error"].startswith("MD diverged at step 1")
    assert results[0].info["md_steps"] == results[2].info["md_steps"] == 2


@pytest.mark.parametrize(("batch_size", "steps"), [(1, 3), (3, 3), (3, 0)])
def test_a_system_too_large_even_alone_stops_alone(batch_size, steps):
    """Contract: a system that does not fit in memory even alone leaves its batch at once with
    a warning and ``info["md_error"]`` naming it and the memory, unmoved; the others run all
    their steps as without it (the whole run raised, losing every result)."""
    systems = _thermalized()  # a 13-atom slab, CH4, Cu
    flaky = OutOfMemoryAbove(morse_potential(), max_atoms=8)
    with pytest.warns(ForcecalcWarning, match=r"^structure 0 \(.*\): MD stopped at step 0: out"):
        results = md(systems, flaky, steps=steps, timestep=0.5, batch_size=batch_size)
    assert results[0].info["md_steps"] == 0
    assert "out of memory for structure 0" in results[0].info["md_error"]
    np.testing.assert_array_equal(results[0].positions, systems[0].positions)
    alone = md(systems[1:], morse_potential(), steps=steps, timestep=0.5, batch_size=batch_size)
    for result, reference in zip(results[1:], alone, strict=True):
        assert result.info["md_steps"] == steps and "md_error" not in result.info
        np.testing.assert_allclose(result.positions, reference.positions, atol=1e-12)


def test_a_collision_and_a_system_too_large_in_one_step():
    """Contract: in one step, one system's atoms meet (it stops, the step is evaluated again
    without it) and the evaluation then finds another too large for the memory alone: each
    is returned as it was at the step before, with its own ``md_error``; the third runs on."""

    class Limited(MorseVariant):
        """Morse, zero forces on 2-atom systems, out of memory for a 13-atom system from the
        first step on (its second call)."""

        def outputs(self, batch):
            if self.calls > 1 and batch.n_atoms > 12 and batch.n_systems == 1:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
            if self.calls > 1 and batch.n_atoms > 12:
                raise RuntimeError("CUDA out of memory. Tried to allocate 4.00 GiB (simulated)")
            out = self.inner(batch)
            pair = (batch.natoms == 2)[batch.system_idx]
            return {**out, "forces": torch.where(pair[:, None], 0.0, out["forces"])}

    pair = head_on_pair("H2", gap=1.0, step=0.5)
    slab, methane = _thermalized()[:2]
    assert len(slab) == 13 and len(methane) == 5
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always", ForcecalcWarning)
        results = md([slab, pair, methane], Limited(), steps=2, timestep=0.5, batch_size=3)
    assert results[1].info["md_error"].startswith("MD stopped at step 1: atoms 0 and 1")
    assert "out of memory for structure 0" in results[0].info["md_error"]
    for k, original in ((0, slab), (1, pair)):
        assert results[k].info["md_steps"] == 0
        np.testing.assert_array_equal(results[k].positions, original.positions)
    assert results[2].info["md_steps"] == 2 and "md_error" not in results[2].info
