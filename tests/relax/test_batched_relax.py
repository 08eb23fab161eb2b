"""Batched relaxation: equality with ASE's optimizers, FixAtoms, in-flight batching, OOM."""

from __future__ import annotations

import functools
import warnings
from functools import cache

import numpy as np
import pytest
import torch
from ase.constraints import FixAtoms, FixBondLength
from ase.optimize import BFGS, FIRE, LBFGS
from relax_helpers import (
    MorseModel,
    MorseVariant,
    OutOfMemoryAbove,
    as_potential,
    mixed_structures,
    morse_potential,
    rattled_slab,
    single_thread,
)
from stress_checks import assert_calculator_stress
from toy_models import ToyModel

from forcecalc import ForcecalcWarning
from forcecalc.calculator import load_calculator
from forcecalc.relax import MemoryModel, md, relax
from forcecalc.relax.engine import SystemSet
from forcecalc.relax.optimizers import make_optimizer

__all__ = ["single_thread"]

ASE_OPTIMIZERS = {"fire": FIRE, "lbfgs": LBFGS, "bfgs": BFGS}


@cache
def ase_reference(optimizer: str) -> tuple[list[np.ndarray], list[list[np.ndarray]], list, list]:
    """One-by-one ASE runs with forcecalc's calculator on the Morse potential: final positions,
    positions after every step, step counts and convergence flags."""
    potential = morse_potential()
    finals, paths, steps, converged = [], [], [], []
    for atoms in mixed_structures():
        atoms = atoms.copy()
        atoms.calc = load_calculator(potential)
        dynamics = ASE_OPTIMIZERS[optimizer](atoms, logfile=None)
        path: list[np.ndarray] = []
        dynamics.attach(lambda a=atoms, p=path: p.append(a.positions.copy()))
        converged.append(bool(dynamics.run(fmax=0.05, steps=300)))
        finals.append(atoms.positions.copy())
        paths.append(path)
        steps.append(dynamics.nsteps)
    return finals, paths, steps, converged


@cache
def batched(optimizer: str) -> list:
    """The same 20 structures relaxed by the batched engine, at most 8 in flight."""
    return relax(
        mixed_structures(),
        morse_potential(),
        optimizer=optimizer,
        fmax=0.05,
        steps=300,
        batch_size=8,
        trajectory=True,
    )


@pytest.mark.parametrize("optimizer", ["fire", "lbfgs", "bfgs"])
def test_equals_ase_one_by_one(optimizer):
    """Contract: for FIRE, LBFGS and BFGS, relaxing 20 mixed structures (slabs with FixAtoms
    and adsorbates, molecules, bulk, a cluster; 2-21 atoms) in batches equals ASE's optimizer
    run one by one with forcecalc's calculator on the same potential: final positions within
    1e-3 Å, the same convergence flags and the same step counts; here the trajectories are
    identical, so every intermediate step also agrees (1e-6 Å)."""
    finals, paths, steps, converged = ase_reference(optimizer)
    results = batched(optimizer)
    assert [a.info["relax_steps"] for a in results] == steps
    assert [a.info["relax_converged"] for a in results] == converged
    assert all(converged)
    for k, atoms in enumerate(results):
        assert np.abs(atoms.positions - finals[k]).max() < 1e-3, k
        frames = atoms.info["trajectory"]
        assert len(frames) == len(paths[k]) == steps[k] + 1
        deviation = max(
            np.abs(f.positions - p).max() for f, p in zip(frames, paths[k], strict=True)
        )
        assert deviation < 1e-6, (k, deviation)


@pytest.mark.parametrize("optimizer", ["fire", "lbfgs", "bfgs"])
def test_results_carry_energy_forces_and_flags(optimizer):
    """Contract: each result is a copy of its input (same atoms, cell, constraints) with a
    SinglePointCalculator holding the final energy and forces of the potential at the final
    positions, and the constrained forces are below fmax when converged."""
    potential = morse_potential()
    for original, atoms in zip(mixed_structures(), batched(optimizer), strict=True):
        assert atoms.get_chemical_formula() == original.get_chemical_formula()
        assert np.array_equal(atoms.cell.array, original.cell.array)
        assert len(atoms.constraints) == len(original.constraints)
        check = atoms.copy()
        check.calc = load_calculator(potential)
        assert atoms.get_potential_energy() == pytest.approx(check.get_potential_energy(), 1e-9)
        np.testing.assert_allclose(atoms.get_forces(), check.get_forces(), atol=1e-9)
        fmax = np.linalg.norm(atoms.get_forces(), axis=1).max()
        assert fmax < 0.05


@pytest.mark.parametrize("optimizer", ["fire", "lbfgs", "bfgs"])
def test_fixed_atoms_never_move(optimizer):
    """Contract: atoms held by FixAtoms keep their exact input positions at every step."""
    for original, atoms in zip(mixed_structures(), batched(optimizer), strict=True):
        if not original.constraints:
            continue
        fixed = original.constraints[0].get_indices()
        assert len(fixed)
        for frame in atoms.info["trajectory"]:
            assert np.array_equal(frame.positions[fixed], original.positions[fixed])
        free = np.setdiff1d(np.arange(len(atoms)), fixed)
        assert np.abs(atoms.positions[free] - original.positions[free]).max() > 1e-3


def test_in_flight_order_batch_of_four():
    """Contract: with batch_size=4 and 10 structures, all 10 come back in input order and
    equal the run with every structure in one batch (systems leave and enter mid-run)."""
    structures = mixed_structures()[:10]
    potential = morse_potential()
    small = relax(structures, potential, optimizer="fire", batch_size=4)
    whole = relax(structures, potential, optimizer="fire", batch_size=10)
    assert len(small) == 10
    for original, a, b in zip(structures, small, whole, strict=True):
        assert a.get_chemical_formula() == original.get_chemical_formula()
        assert a.info["relax_steps"] == b.info["relax_steps"]
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-10)
    assert len({a.info["relax_steps"] for a in small}) > 1  # they did finish at different steps


def test_simulated_out_of_memory_loses_nothing():
    """Contract: a potential that raises CUDA's out-of-memory error above 40 atoms per forward
    pass: the engine splits the batch and goes on; all 20 structures come back, equal to the
    run without the error."""
    structures = mixed_structures()
    reference = relax(structures, morse_potential(), optimizer="lbfgs", batch_size=20)
    flaky = OutOfMemoryAbove(morse_potential(), max_atoms=40)
    results = relax(structures, flaky, optimizer="lbfgs", batch_size=20)
    assert flaky.failures > 0
    assert flaky.largest_success <= 40
    assert len(results) == 20
    for a, b in zip(results, reference, strict=True):
        assert a.info["relax_steps"] == b.info["relax_steps"]
        assert a.info["relax_converged"] == b.info["relax_converged"]
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-8)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_a_structure_too_large_even_alone_ends_alone(batch_size):
    """Contract: a structure that does not fit in memory even alone ends unrelaxed with
    ``info["relax_error"]`` naming it and the memory, NaN energy; the others relax as without
    it (the whole run raised, losing every result)."""
    small = [a for a in mixed_structures() if len(a) <= 8][:2]
    large = rattled_slab(1)
    assert len(large) > 8
    flaky = OutOfMemoryAbove(morse_potential(), max_atoms=8)
    results = relax([small[0], large, small[1]], flaky, batch_size=batch_size, steps=20)
    ended = results[1]
    assert ended.info["relax_error"].startswith(
        f"out of memory for structure 1 ({large.get_chemical_formula()}) alone"
    )
    assert ended.info["relax_steps"] == 0 and not ended.info["relax_converged"]
    assert np.isnan(ended.get_potential_energy())
    np.testing.assert_array_equal(ended.positions, large.positions)
    alone = relax(small, morse_potential(), batch_size=batch_size, steps=20)
    for result, reference in zip([results[0], results[2]], alone, strict=True):
        assert "relax_error" not in result.info
        np.testing.assert_allclose(result.positions, reference.positions, atol=1e-10)


def test_auto_batch_size_respects_the_memory_budget():
    """Contract: batch_size="auto" admits structures while the memory model's predicted cost
    fits the budget (here a budget of about 3 slabs), and still relaxes everything to the same
    result."""
    structures = [rattled_slab(seed) for seed in range(6)]
    potential = morse_potential()
    counter = OutOfMemoryAbove(potential, max_atoms=10**9)
    per_slab = len(structures[0])
    budget = MemoryModel(bytes_per_atom=1.0, bytes_per_edge=0.0, budget=3.5 * per_slab)
    results = relax(structures, counter, batch_size="auto", memory=budget)
    assert counter.largest_success == 3 * per_slab
    reference = relax(structures, potential, batch_size=6)
    for a, b in zip(results, reference, strict=True):
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-10)


def test_auto_batch_size_on_cpu_runs():
    """Contract: the default batch_size="auto" works on the CPU (fixed budget)."""
    results = relax(mixed_structures()[:4], morse_potential(), optimizer="bfgs")
    assert all(a.info["relax_converged"] for a in results)


def test_bfgs_keeps_each_hessian_at_its_own_size():
    """Contract: batched BFGS stores one ``3n x 3n`` Hessian per system (not padded to the
    largest in flight), also after systems leave and others join."""
    structures = mixed_structures()
    systems = SystemSet(4.0, 0.0, torch.device("cpu"))
    systems.extend(structures[:3], [0, 1, 2])
    optimizer = make_optimizer("bfgs")
    optimizer.add(systems.natoms)
    keep = torch.tensor([True, False, True])
    optimizer.keep(keep, systems.keep(keep))
    systems.extend(structures[3:5], [3, 4])
    optimizer.add(systems.natoms[-2:])
    sizes = [tuple(h.shape) for h in optimizer.hessians]
    assert sizes == [(3 * n, 3 * n) for n in systems.natoms_list]
    assert len(set(sizes)) > 1


@pytest.mark.parametrize("skin", [0.0, 0.3, 2.0])
def test_skin_does_not_change_results(skin):
    """Contract: the neighbor-list skin (0: rebuild every step) does not change the results."""
    structures = mixed_structures()[:8]
    potential = morse_potential()
    reference = relax(structures, potential, optimizer="fire", skin=1.0)
    results = relax(structures, potential, optimizer="fire", skin=skin)
    for a, b in zip(results, reference, strict=True):
        assert a.info["relax_steps"] == b.info["relax_steps"]
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-10)


def test_steps_limit_and_zero_steps():
    """Contract: ``steps`` caps the steps as ASE's ``run(steps=...)`` does (unconverged flag,
    same positions as ASE after that many steps; fmax=0 runs them all); steps=0 only
    evaluates (and one Atoms instead of a list gives a list of one)."""
    atoms = rattled_slab(3)
    potential = morse_potential()
    [limited] = relax([atoms], potential, optimizer="bfgs", steps=4)
    reference = atoms.copy()
    reference.calc = load_calculator(potential)
    initial = reference.get_potential_energy()
    optimizer = BFGS(reference, logfile=None)
    assert not optimizer.run(fmax=0.05, steps=4)
    assert limited.info == {
        **atoms.info,
        "relax_steps": 4,
        "relax_converged": False,
        "relax_initial_energy": pytest.approx(initial, abs=1e-12),
    }
    np.testing.assert_allclose(limited.positions, reference.positions, atol=1e-9)
    [every_step] = relax([atoms], potential, optimizer="bfgs", fmax=0, steps=4)  # as ASE's
    assert every_step.info["relax_steps"] == 4 and not every_step.info["relax_converged"]
    np.testing.assert_allclose(every_step.positions, reference.positions, atol=1e-9)
    [untouched] = relax(atoms, potential, steps=0)  # one Atoms: a list of one
    assert untouched.info["relax_steps"] == 0
    assert np.array_equal(untouched.positions, atoms.positions)
    assert untouched.get_potential_energy() == pytest.approx(
        reference.calc.get_potential_energy(atoms)
    )


@pytest.mark.parametrize(
    ("optimizer", "options"),
    [
        ("LBFGS", {"memory": 3, "alpha": 40.0, "maxstep": 0.1, "damping": 0.8}),
        ("BFGS", {"alpha": 40.0, "maxstep": 0.1}),
        ("FIRE", {"dt": 0.05, "maxstep": 0.1, "dtmax": 0.5, "Nmin": 3, "finc": 1.2}),
        ("FIRE", {"fdec": 0.6, "astart": 0.2, "fa": 0.95, "a": 0.15}),
    ],
)
def test_optimizer_options_follow_ase(optimizer, options):
    """Contract: ASE-named options (maxstep, alpha, memory, damping, dt, dtmax, Nmin, finc,
    fdec, astart, fa, a) change the run exactly as in ASE: same steps, same positions."""
    atoms = mixed_structures()[1]
    potential = morse_potential()
    [result] = relax([atoms], potential, optimizer=optimizer, optimizer_options=options)
    reference = atoms.copy()
    reference.calc = load_calculator(potential)
    dynamics = ASE_OPTIMIZERS[optimizer.lower()](reference, logfile=None, **options)
    dynamics.run(fmax=0.05, steps=300)
    assert result.info["relax_steps"] == dynamics.nsteps
    np.testing.assert_allclose(result.positions, reference.positions, atol=1e-6)


def test_input_structures_are_not_modified():
    """Contract: relax returns copies; the inputs keep their positions and calculators."""
    structures = mixed_structures()[:3]
    before = [a.positions.copy() for a in structures]
    relax(structures, morse_potential())
    for atoms, positions in zip(structures, before, strict=True):
        assert np.array_equal(atoms.positions, positions)
        assert atoms.calc is None


def test_invalid_inputs_are_refused():
    """Contract: unknown optimizers or options (a maxstep that is no number > 0), constraints
    other than FixAtoms, bad fmax, steps, skin or batch sizes, and inputs that are not Atoms
    raise ValueError naming them before anything runs; an empty input gives an empty list."""
    potential = morse_potential()
    atoms = mixed_structures()[8]
    with pytest.raises(ValueError, match="unknown optimizer"):
        relax([atoms], potential, optimizer="cg")
    with pytest.raises(ValueError, match="invalid options"):
        make_optimizer("fire", {"maxmove": 0.1})
    with pytest.raises(ValueError, match="too large"):
        make_optimizer("lbfgs", {"maxstep": 1.5})
    for name in ("fire", "lbfgs", "bfgs"):  # a negative step would turn every step uphill
        for bad in (-0.1, 0, "0.1", float("nan")):
            with pytest.raises(ValueError, match=r"maxstep must be a finite number > 0"):
                relax([atoms], potential, optimizer=name, optimizer_options={"maxstep": bad})
    bonded = atoms.copy()
    bonded.set_constraint(FixBondLength(0, 1))
    with pytest.raises(ValueError, match="FixBondLength"):
        relax([atoms, bonded], potential)
    for bad in (-0.1, "0.05", None):
        with pytest.raises(ValueError, match=r"fmax must be a number >= 0 \(eV/Å\)"):
            relax([atoms], potential, fmax=bad)
    with pytest.raises(ValueError, match="batch_size"):
        relax([atoms], potential, batch_size=0)
    for bad in (None, -1, True):
        with pytest.raises(ValueError, match="steps must be a number >= 0"):
            relax([atoms], potential, steps=bad)
    with pytest.raises(ValueError, match="skin must be a finite number"):
        relax([atoms], potential, skin=float("nan"))
    with pytest.raises(ValueError, match=r"structure 0 is a str, not an ase\.Atoms"):
        relax({"a": atoms}, potential)
    assert relax([], potential) == []


def test_a_model_without_the_potential_interface_is_named():
    """A module given as the model must have a Potential's interface: one without a cutoff
    is a TypeError naming its class and what it lacks (not an AttributeError from inside the
    engine); a value that is neither a module nor a checkpoint says what is accepted."""
    atoms = mixed_structures()[8]
    with pytest.raises(
        TypeError,
        match=r"the model, a Linear, is no forcecalc Potential and "
        r"has no cutoff",
    ):
        relax([atoms], torch.nn.Linear(3, 3))
    with pytest.raises(
        TypeError,
        match=r"a checkpoint \(a file path or a known name\) or a "
        r"loaded forcecalc Potential .*got dict",
    ):
        relax([atoms], {"cutoff": 6.0})


def test_forcenet_checkpoint_integration():
    """Contract: with a real forcecalc checkpoint (ForceNet fixture, float32, loaded by path),
    10 FIRE steps of three slabs in one batch equal ASE's FIRE with forcecalc's calculator to
    float32 rounding (1e-4 Å), FixAtoms included; an element the model lacks is named with
    its structure and atom."""
    from ocp_fixtures import ocp_checkpoint_path

    path = ocp_checkpoint_path("forcenet_small")
    structures = [rattled_slab(seed) for seed in range(3)]
    for atoms in structures:
        atoms.set_constraint(FixAtoms(indices=[a.index for a in atoms if a.tag == 3]))
    results = relax(structures, str(path), steps=10, device="cpu", batch_size=3)
    calc = load_calculator(str(path), device="cpu")
    for original, result in zip(structures, results, strict=True):
        reference = original.copy()
        reference.calc = calc
        FIRE(reference, logfile=None).run(fmax=0.05, steps=10)
        assert result.info["relax_steps"] == 10
        np.testing.assert_allclose(result.positions, reference.positions, atol=1e-4)
        fixed = original.constraints[0].get_indices()
        assert np.array_equal(result.positions[fixed], original.positions[fixed])
    unknown = structures[1].copy()
    unknown[0].symbol = "At"
    with pytest.raises(
        ValueError, match=r"structure 1 \(.*At.*\): .*element\(s\) At \(atoms \[0\]\)"
    ):
        relax([structures[0], unknown], str(path), steps=1, device="cpu")


def test_energy_centric_spinconv_integration():
    """Contract: an energy-centric SpinConv with conservative forces (autograd inside the
    engine's forward) relaxes a batch like the calculator does one by one (3 BFGS steps);
    the model option given to ``relax`` with the checkpoint's path (as ``predict`` takes
    it) is the option loaded: the same positions, where the OCP checkpoint's own ``compat``
    forces lead elsewhere."""
    from ocp_fixtures import ocp_checkpoint_path

    from forcecalc.checkpoint import load_checkpoint

    path = ocp_checkpoint_path("spinconv_small_ec")
    potential = load_checkpoint(path, device="cpu", forces="conservative")
    structures = [rattled_slab(seed) for seed in (4, 5)]
    results = relax(structures, potential, optimizer="bfgs", steps=3, batch_size=2)
    for original, result in zip(structures, results, strict=True):
        reference = original.copy()
        reference.calc = load_calculator(potential)
        BFGS(reference, logfile=None).run(fmax=0.05, steps=3)
        np.testing.assert_allclose(result.positions, reference.positions, atol=1e-4)
    options = dict(optimizer="bfgs", steps=3, batch_size=2, device="cpu")
    by_path = relax(structures, str(path), forces="conservative", **options)
    compat = relax(structures, str(path), **options)
    for result, loaded, own in zip(by_path, results, compat, strict=True):
        assert np.array_equal(loaded.positions, result.positions)
        assert np.abs(own.positions - result.positions).max() > 1e-4


def test_bulk_structures_carry_the_stress_the_calculator_gives():
    """Contract: with a model that defines stress (energy-centric SpinConv, conservative
    forces), a structure periodic along all three axes ends with its stress (eV/Å^3, Voigt
    order: (1/V) dE/dstrain) in its results and in every trajectory frame, equal to the
    calculator's at the same positions, which computes it with the forces (so one by one
    and batched runs write the same results); a slab (pbc [T, T, F]) and a molecule in the
    same batch get none, as from the calculator's forces; a model without stress gives none."""
    from ase.build import bulk, molecule
    from ocp_fixtures import ocp_checkpoint_path

    from forcecalc.checkpoint import load_checkpoint

    path = ocp_checkpoint_path("spinconv_small_ec")
    potential = load_checkpoint(path, device="cpu", dtype="float64", forces="conservative")
    crystal = bulk("Cu", "fcc", a=3.7, cubic=True)  # expanded: a stress of some size
    crystal.rattle(0.05, seed=1)
    structures = [crystal, rattled_slab(2), molecule("CO")]
    results = relax(structures, potential, steps=2, batch_size=3, trajectory=True)
    calc = load_calculator(potential)
    frames = [results[0], *results[0].info["trajectory"]]
    assert len(frames) == 4
    assert_calculator_stress(frames, calc)
    for result in results[1:]:
        for frame in [result, *result.info["trajectory"]]:
            assert set(frame.calc.results) == {"energy", "free_energy", "forces"}
    [direct] = relax([crystal], morse_potential(), steps=1)
    assert "stress" not in direct.calc.results


@pytest.mark.parametrize("run", ["relax", "md", "predict"])
def test_model_options_with_a_loaded_model_are_named(run):
    """Contract: model options apply when a checkpoint is loaded; given beside a loaded
    model they are an error naming them, not ignored, in every entry point that takes them
    (``allow_unsafe=False``, the default, is none); a keyword argument that is no loading
    option at all (misspelt) is named as such, with a loaded model or a checkpoint's path."""
    from ocp_fixtures import ocp_checkpoint_path

    from forcecalc import predict

    call = {"relax": relax, "md": functools.partial(md, steps=1), "predict": predict}[run]
    structures, potential = mixed_structures()[:1], morse_potential()
    with pytest.raises(ValueError, match=r"option\(s\) allow_unsafe, forces given with a"):
        call(structures, potential, forces="conservative", allow_unsafe=True)
    assert len(call(structures, potential, allow_unsafe=False)) == 1
    for model in (potential, str(ocp_checkpoint_path("spinconv_small_ec"))):
        with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) fmx: neither"):
            call(structures, model, fmx=0.1)


def test_float32_potential_runs_in_float32():
    """Contract: a float32 potential relaxes to the float64 one's positions within float32
    rounding; the batches carry float64 positions (as the calculators pass them) and the
    results' positions stay float64 (as ASE's)."""
    potential = as_potential(morse_potential().model).to(torch.float32)
    structures = mixed_structures()[:3]
    results = relax(structures, potential, optimizer="fire")
    reference = relax(structures, morse_potential(), optimizer="fire")
    for a, b in zip(results, reference, strict=True):
        assert a.positions.dtype == np.float64
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-3)


def test_a_broken_optimizer_step_ends_that_structure_only():
    """Contract: where the optimizer's step is not finite (LBFGS on a structure whose forces
    vanish, as ASE's LBFGS also breaks down there), that structure ends unconverged with its
    last finite positions and ``info["relax_error"]``; the others relax on as without it."""
    from ase import Atoms

    lone = Atoms("Cu", positions=[[5.0, 5.0, 5.0]], cell=[10, 10, 10])
    structures = mixed_structures()[:3]
    potential = morse_potential()
    reference = relax(structures, potential, optimizer="lbfgs", fmax=0.0, steps=6)
    results = relax([*structures, lone], potential, optimizer="lbfgs", fmax=0.0, steps=6)
    broken = results[-1]
    assert "not finite" in broken.info["relax_error"] and not broken.info["relax_converged"]
    np.testing.assert_array_equal(broken.positions, lone.positions)
    for a, b in zip(results[:3], reference, strict=True):
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-12)
        assert "relax_error" not in a.info


class _NaNForGold(ToyModel):
    """The Morse test model, with NaN energy and forces for every system holding gold."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = MorseModel()
        self.cutoff = self.inner.cutoff

    def forward(self, batch):
        out = self.inner(batch)
        gold = torch.zeros(batch.n_systems, dtype=torch.bool, device=batch.numbers.device)
        gold = gold.index_put((batch.system_idx[batch.numbers == 79],), torch.tensor(True))
        nan = torch.tensor(float("nan"), dtype=out["energy"].dtype)
        return {
            "energy": torch.where(gold, nan, out["energy"]),
            "forces": torch.where(gold[batch.system_idx, None], nan, out["forces"]),
        }


@pytest.mark.parametrize("trajectory", [False, True])
def test_a_model_output_that_is_not_finite_ends_that_structure_only(trajectory):
    """Contract: a structure whose energy or forces come out NaN from the model ends at once,
    unconverged, with ``info["relax_error"]`` naming the model's output; the others relax on
    exactly as without it (also when trajectories are kept)."""
    from ase import Atoms

    gold = Atoms("Au2", positions=[[5.0, 5.0, 5.0], [7.4, 5.0, 5.0]], cell=[12, 12, 12])
    structures = mixed_structures()[:3]
    potential = as_potential(_NaNForGold())
    options = {"optimizer": "fire", "fmax": 0.05, "steps": 8, "trajectory": trajectory}
    reference = relax(structures, potential, **options)
    results = relax([structures[0], gold, *structures[1:]], potential, **options)
    failed = results[1]
    assert "model's energy or forces are not finite" in failed.info["relax_error"]
    assert failed.info["relax_steps"] == 0 and not failed.info["relax_converged"]
    np.testing.assert_array_equal(failed.positions, gold.positions)
    for a, b in zip([results[0], *results[2:]], reference, strict=True):
        np.testing.assert_array_equal(a.positions, b.positions)
        assert "relax_error" not in a.info
        if trajectory:
            assert len(a.info["trajectory"]) == len(b.info["trajectory"]) > 1
    if trajectory:  # its first evaluation failed: no frame was recorded
        assert failed.info["trajectory"] == []


def test_bfgs_on_a_force_that_does_not_change_ends_that_structure_only():
    """Contract: a direct-force model gives a lone atom a force that does not change as it
    moves; BFGS's Hessian update then divides by zero (ASE's BFGS fails there too).  That
    structure ends unconverged with ``info["relax_error"]``, and the others, of the same size
    group or not, relax on as without it (one batched ``eigh`` failed the whole call)."""
    from ase import Atoms
    from ocp_fixtures import OCP_DATA

    from forcecalc.checkpoint import load_checkpoint

    potential = load_checkpoint(OCP_DATA / "forcenet_small.pt", device="cpu", dtype="float64")
    lone = Atoms("O", positions=[[6.0, 6.0, 6.0]], cell=[12, 12, 12], pbc=True)
    structures = [rattled_slab(seed) for seed in (1, 2)]
    reference = relax(structures, potential, optimizer="bfgs", steps=4, batch_size=3)
    results = relax([structures[0], lone, structures[1]], potential, optimizer="bfgs", steps=4)
    assert "bfgs step was not finite" in results[1].info["relax_error"]
    assert not results[1].info["relax_converged"]
    for a, b in zip([results[0], results[2]], reference, strict=True):
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-5)
        assert "relax_error" not in a.info


@pytest.mark.parametrize("batch_size", [3, 1, "auto"])
@pytest.mark.parametrize("run", ["relax", "md"])
def test_overlapping_atoms_are_named_before_any_work(run, batch_size):
    """Contract: a structure whose atoms overlap is a ValueError naming it by its input index,
    with its own atom indices (the graph builder's are batch-wide), before the first forward
    pass, whatever the batch size: it was found when it entered the batch, after the
    structures before it had been relaxed, and their results were lost."""
    structures = mixed_structures()[:3]
    bad = structures[2].copy()
    bad.positions[1] = bad.positions[0]
    formula = bad.get_chemical_formula()
    potential = OutOfMemoryAbove(morse_potential(), max_atoms=10**9)  # counts its calls
    run_it = relax if run == "relax" else functools.partial(md, timestep=0.5)
    with pytest.raises(ValueError, match=rf"^structure 2 \({formula}\): atoms 0 and 1 are 0 Å"):
        run_it([*structures[:2], bad], potential, batch_size=batch_size, steps=2)
    assert potential.calls == 0


class _Pulling(MorseVariant):
    """The Morse potential; on 2-atom systems, 100 eV/Å pulling each atom to their centre."""

    def outputs(self, batch):
        out = self.inner(batch)
        pair = (batch.natoms == 2)[batch.system_idx]
        idx = batch.system_idx
        centre = torch.zeros_like(out["forces"][: len(batch.natoms)])
        centre = centre.index_add(0, idx, batch.positions) / batch.natoms[:, None]
        towards = centre[idx] - batch.positions
        pull = 100.0 * towards / towards.norm(dim=1, keepdim=True)
        return {**out, "forces": torch.where(pair[:, None], pull, out["forces"])}


@pytest.mark.parametrize(("optimizer", "skin"), [("bfgs", 0.0), ("bfgs", 0.5), ("fire", 0.5)])
def test_a_structure_whose_atoms_a_step_brings_together_ends_alone(optimizer, skin):
    """Contract: where an optimizer step brings two atoms within 0.01 Å of each other (here
    forces pull two free H atoms 0.4 Å apart together and BFGS's 0.2 Å step meets them), that
    structure ends there, unconverged, with NaN energy and ``info["relax_error"]`` naming the
    step and the atoms; the others relax as without it (the whole run raised).  Also with a
    skin (CUDA's default 0.5 Å: the atoms meet before either moved a quarter of it; FIRE gets
    there in a few steps), where the overlap went unseen.  The memory model's samples (copies
    compressed to 0.8: the pair at 0.32 Å) warn of nothing."""
    from ase import Atoms

    pair = Atoms("H2", positions=[[0, 0, 0], [0.4, 0, 0]], cell=[8, 8, 8], pbc=False)
    others = mixed_structures()[:2]
    assert all(len(atoms) != 2 for atoms in others)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ForcecalcWarning)
        results = relax(
            [others[0], pair, others[1]], _Pulling(), optimizer=optimizer, steps=8, skin=skin
        )
    # no close-contact warning about the memory model's compressed sample (0.32 Å); FIRE's
    # path passes closer contacts of its own, which do warn
    assert not [w for w in caught if "0.32 Å" in str(w.message)]
    ended = results[1]
    steps = ended.info["relax_steps"]
    assert steps >= 1 and not ended.info["relax_converged"]
    assert ended.info["relax_error"].startswith(f"step {steps} brought atoms within 0.01 Å")
    assert "atoms 0 and 1 are" in ended.info["relax_error"]
    assert np.isnan(ended.get_potential_energy())
    alone = relax(others, _Pulling(), optimizer=optimizer, steps=8, skin=skin)
    for result, reference in zip([results[0], results[2]], alone, strict=True):
        assert "relax_error" not in result.info
        np.testing.assert_allclose(result.positions, reference.positions, atol=1e-9)


def test_one_by_one_relax_ends_atoms_a_step_brings_together_as_the_engine():
    """Contract: `forcecalc relax` one by one (ASE's BFGS with the calculator) ends a
    structure whose step brings two atoms within 0.01 Å as the batched engine ends it: at
    that step's positions, with NaN energy and forces (not without results), the same step
    count, and a relax_error naming the step and the atoms (their distance as each computed
    it)."""
    from argparse import Namespace

    from ase import Atoms

    from forcecalc.checkpoint import CheckpointInfo, Normalizers, Potential
    from forcecalc.cli import _relax_one

    pair = Atoms("H2", positions=[[0, 0, 0], [0.4, 0, 0]], cell=[8, 8, 8], pbc=False)
    [engine] = relax([pair], _Pulling(), optimizer="bfgs", steps=8, batch_size=1)
    one = pair.copy()
    potential = Potential(_Pulling(), CheckpointInfo("pulling", {}, Normalizers(), "test"))
    args = Namespace(optimizer="BFGS", fmax=0.05, steps=8, trajectory=None)
    _relax_one(one, load_calculator(potential), args)
    assert one.info["relax_steps"] == engine.info["relax_steps"] == 1
    assert not one.info["relax_converged"] and not engine.info["relax_converged"]
    for error in (one.info["relax_error"], engine.info["relax_error"]):
        assert error.startswith("step 1 brought atoms within 0.01 Å") and "atoms 0 and 1" in error
    np.testing.assert_allclose(one.positions, engine.positions, rtol=0, atol=1e-12)
    assert np.isnan(one.get_potential_energy()) and np.isnan(one.get_forces()).all()


@pytest.mark.parametrize("skin", [0.0, 0.5])
def test_close_contact_warnings_name_the_input_structure(skin):
    """Contract: atoms closer than any bond (0.3 Å) in input 3 of four, relaxed two at a time,
    warn naming that input by its index and formula, whenever the warning comes (counting
    edges before the run, building its graph as it enters the batch): once named by nothing
    and then as "structure 1 in the batch"."""
    from ase import Atoms

    water = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [0.3, 0, 0]])
    water.center(vacuum=4.0)
    structures = [*mixed_structures()[:3], water]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ForcecalcWarning)
        relax(structures, morse_potential(), steps=2, batch_size=2, skin=skin)
    contacts = [str(w.message) for w in caught if "closer than any bond" in str(w.message)]
    assert contacts, "no close-contact warning"
    assert all(m.startswith("structure 3 (H2O): atoms 0 and 2 are 0.3") for m in contacts)
    # under Python's default filter, the one at the start shows once (batch_size="auto"
    # measures its memory model on compressed copies, which warn of nothing)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default", ForcecalcWarning)
        relax(structures, morse_potential(), steps=0, skin=skin)
    assert sum("are 0.3 Å apart" in str(w.message) for w in caught) == 1
