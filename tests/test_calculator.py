"""The ASE calculators: ASE's contract, the reference numbers, errors, skin reuse, predict."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import add_adsorbate, bulk, fcc100, molecule
from ase.calculators.calculator import CalculationFailed, PropertyNotImplementedError
from ase.constraints import FixAtoms
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS, FIRE, LBFGS
from collisions import head_on_pair
from devices import DEVICES
from ocp_fixtures import OCP_DATA, ocp_reference, ocp_structures

from forcecalc import (
    ForceCalculator,
    ForceNetCalculator,
    SpinConvCalculator,
    load_calculator,
    load_checkpoint,
)

FORCENET = OCP_DATA / "forcenet_small.pt"
SPINCONV_FC = OCP_DATA / "spinconv_small_fc.pt"
SPINCONV_EC = OCP_DATA / "spinconv_small_ec.pt"


def _slab() -> Atoms:
    """A small O on Cu(100) slab, bottom layer fixed, periodic in x and y."""
    slab = fcc100("Cu", size=(2, 2, 2), vacuum=6.0)
    add_adsorbate(slab, "O", 1.6, "hollow")
    slab.set_constraint(FixAtoms(indices=[a.index for a in slab if a.tag == 2]))
    return slab


def test_calculator_gives_the_reference_numbers() -> None:
    """Through ASE, a ForceNet OCP checkpoint gives the original's float64 energies/forces."""
    model = ocp_reference()["models"]["forcenet_small"]["results"]
    calc = ForceNetCalculator(FORCENET, dtype="float64", device="cpu")
    for name, atoms in ocp_structures().items():
        if model[name]["tie_cut"]:
            continue
        atoms = atoms.copy()
        atoms.calc = calc
        forces = atoms.get_forces(apply_constraint=False)
        reference = np.array(model[name]["forces"])
        assert atoms.get_potential_energy() == pytest.approx(model[name]["energy"], abs=1e-6)
        assert np.abs(forces - reference).max() <= 1e-6 * np.abs(reference).max()
        assert atoms.get_potential_energy(force_consistent=True) == atoms.get_potential_energy()


def test_fixed_atoms_get_zero_forces_through_ase() -> None:
    """ASE applies FixAtoms: fixed atoms report zero force, free atoms the model's."""
    atoms = _slab()
    atoms.calc = ForceNetCalculator(FORCENET, device="cpu")
    fixed = atoms.constraints[0].get_indices()
    assert np.all(atoms.get_forces()[fixed] == 0)
    assert np.any(atoms.get_forces(apply_constraint=False)[fixed] != 0)


def test_typed_calculators_refuse_the_other_model() -> None:
    """SpinConvCalculator refuses a ForceNet checkpoint (and vice versa), naming both."""
    with pytest.raises(ValueError, match=r"needs a spinconv checkpoint.*holds a forcenet"):
        SpinConvCalculator(FORCENET, device="cpu")
    with pytest.raises(ValueError, match=r"needs a forcenet checkpoint.*holds a spinconv"):
        ForceNetCalculator(SPINCONV_FC, device="cpu")
    assert load_calculator(SPINCONV_FC, device="cpu").potential.name == "spinconv"


def test_a_calculator_says_what_it_runs() -> None:
    """``repr`` names the checkpoint, model, device and dtype; ASE's ``calc.name`` (a database
    row's ``calculator``) the model, not the class ("forcecalculator" for every model)."""
    calc = SpinConvCalculator(SPINCONV_FC, device="cpu")
    assert repr(calc) == (
        f"SpinConvCalculator({str(SPINCONV_FC)!r}, model='spinconv', device='cpu', dtype='float32')"
    )
    assert calc.name == "forcecalc-spinconv"
    assert load_calculator(FORCENET, device="cpu").name == "forcecalc-forcenet"


@pytest.mark.parametrize("option", [{"rotations": "random"}, {"forces": "compat"}])
def test_spinconv_options_are_refused_for_forcenet(option: dict) -> None:
    """Options that only SpinConv has are a clear error for ForceNet that blames the option,
    not the checkpoint file (a ``CheckpointError`` would send the user to re-download it)."""
    from forcecalc.checkpoint import CheckpointError

    with pytest.raises(ValueError, match=f"{next(iter(option))} do not apply") as error:
        ForceCalculator(FORCENET, device="cpu", **option)
    assert not isinstance(error.value, CheckpointError)


def test_a_bad_value_of_an_option_is_named_as_such() -> None:
    """An option the model has, with a value it does not take, is a ValueError that names the
    option and says what values it takes (not that the option does not apply)."""
    with pytest.raises(ValueError, match=r"forces, as given, cannot be used.*'compat' or"):
        ForceCalculator(SPINCONV_EC, device="cpu", forces="bogus")


def test_a_calculator_without_atoms_says_so() -> None:
    """Asking a calculator with no atoms attached for a property is a clear error (it was an
    AttributeError on ``None.pbc``)."""
    calc = load_calculator(FORCENET, device="cpu")
    with pytest.raises(ValueError, match="no atoms to compute"):
        calc.get_potential_energy()


def test_force_centric_models_define_no_stress() -> None:
    """Asking a direct-force model for stress raises PropertyNotImplementedError saying why."""
    atoms = _slab()
    atoms.pbc = True
    for checkpoint in (FORCENET, SPINCONV_FC):
        atoms.calc = load_calculator(checkpoint, device="cpu")
        with pytest.raises(PropertyNotImplementedError, match="stress is not defined"):
            atoms.get_stress()
        assert "stress" not in atoms.calc.implemented_properties


@pytest.mark.parametrize(
    ("atoms", "message"),
    [
        (Atoms(), "has no atoms"),
        (
            Atoms("CO", positions=[[0, 0, 0], [0, 0, np.nan]]),
            r"^the structure \(CO\): positions of atoms \[1\] are NaN or inf",
        ),
        (
            Atoms("Cu", positions=[[0, 0, 0]], cell=[[3, 0, 0], [0, 3, 0], [0, 0, 0]], pbc=True),
            r"zero length along periodic axes",
        ),
        (
            Atoms(
                "Cu2",
                positions=[[0, 0, 0], [1, 1, 1]],
                cell=[[3, 0, 0], [6, 0, 0], [0, 0, 3]],
                pbc=True,
            ),
            "linearly dependent",
        ),
        (Atoms("CuAt", positions=[[0, 0, 0], [0, 0, 2]]), r"element\(s\) At \(atoms \[1\]\)"),
        (Atoms("CuO", positions=[[0, 0, 0], [0, 0, 0.001]]), r"atoms 0 and 1 are 0.001 Å apart"),
        (
            Atoms("Cu2", positions=[[0, 0, 0], [2.995, 0, 0]], cell=[3, 3, 3], pbc=True),
            r"atom 0 and a periodic image of atom 1 are 0.005 Å apart, closer than 0.01 Å",
        ),
        (
            Atoms("Cu", positions=[[0, 0, 0]], cell=[0.005, 3, 3], pbc=True),
            r"lattice vector of 0.005 Å \(a\): every atom overlaps its own periodic images",
        ),
        (
            Atoms(
                "Cu", positions=[[0, 0, 0]], cell=[[3, 0, 0], [0, 3, 0], [1.5, 1.5, 1e-4]], pbc=True
            ),
            r"^the structure \(Cu\): the cell has a lattice vector of 0.0002 Å \(a \+ b - 2c\)",
        ),
        (
            Atoms("Cu", positions=[[0, 0, 0]], cell=[[3, 0, 0], [0, 3, 0], [3, 3, 0]], pbc=True),
            r"periodic cell vectors \[0, 1, 2\] are linearly dependent",
        ),
    ],
)
def test_bad_input_is_named(atoms: Atoms, message: str) -> None:
    """Bad structures raise ValueError naming the problem and the atoms, never a number."""
    atoms.calc = ForceNetCalculator(FORCENET, device="cpu")
    with pytest.raises(ValueError, match=message):
        atoms.get_potential_energy()


def test_max_neighbors_applies_to_its_calculator_only() -> None:
    """``max_neighbors`` changes the graph of the calculator it is given to, not the loaded
    Potential it came with (which other calculators, e.g. NEB images, may share)."""
    atoms = _slab()
    potential = load_checkpoint(SPINCONV_FC, device="cpu", dtype="float64")
    shared = load_calculator(potential)
    before = shared.get_potential_energy(atoms.copy())
    narrow = load_calculator(potential, max_neighbors=2)
    assert potential.max_neighbors == potential.model.max_num_neighbors
    assert narrow.potential.max_neighbors == 2
    assert narrow.get_potential_energy(atoms.copy()) != pytest.approx(before, abs=1e-6)
    assert load_calculator(potential).get_potential_energy(atoms.copy()) == before


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"skn": 0.5}, TypeError, "skn"),
        ({"dtype": "float64"}, ValueError, r"dtype='float64', but the loaded Potential"),
        ({"device": "meta"}, ValueError, r"device='meta', but the loaded Potential is on cpu"),
        ({"skin": float("nan")}, ValueError, "skin must be a finite number"),
        ({"skin": "1"}, ValueError, r"skin must be a finite number >= 0 \(Å\), got '1'"),
        ({"max_neighbors": 2.7}, ValueError, "max_neighbors must be an integer"),
        ({"cuda_graph": "no"}, TypeError, r"cuda_graph must be True or False, got 'no'"),
    ],
)
def test_wrong_options_are_named(options: dict, error: type, message: str) -> None:
    """A misspelled option, a dtype or device other than the loaded Potential's, a NaN skin,
    a fractional max_neighbors or a cuda_graph that is no bool (``"no"`` read as True) raise
    errors naming them (they were accepted silently)."""
    potential = load_checkpoint(FORCENET, device="cpu")
    with pytest.raises(error, match=message):
        load_calculator(potential, **options)


def test_forces_option_is_refused_for_force_centric_models() -> None:
    """``forces=`` (compat or conservative) only applies to energy-centric SpinConv."""
    for forces in ("compat", "conservative"):
        with pytest.raises(ValueError, match=r"forces=.* energy-centric|conservative"):
            load_calculator(SPINCONV_FC, device="cpu", forces=forces)


def test_non_finite_model_output_is_an_error() -> None:
    """A model that returns NaN (here: NaN weights) raises CalculationFailed naming the
    results, never a NaN energy."""
    potential = load_checkpoint(FORCENET, device="cpu")
    with torch.no_grad():
        list(potential.model.parameters())[-1].fill_(float("nan"))  # the output layer
    atoms = _slab()
    atoms.calc = load_calculator(potential)
    with pytest.raises(CalculationFailed, match="non-finite energy"):
        atoms.get_potential_energy()


def test_skin_reuses_the_graph_with_identical_results() -> None:
    """With a skin, an MD run rebuilds the neighbor list rarely and gives the same forces."""
    atoms = _slab()
    rng = np.random.default_rng(1)
    atoms.set_momenta(rng.normal(scale=0.3, size=(len(atoms), 3)))
    rebuild = load_calculator(FORCENET, device="cpu", dtype="float64")
    reuse = load_calculator(rebuild.potential, skin=1.0)
    atoms.calc = reuse
    dyn = VelocityVerlet(atoms, timestep=2.0 * 0.09822694788464063)
    steps = 0
    for _ in range(25):
        dyn.run(1)
        steps += 1
        reference = rebuild.get_forces(atoms.copy())
        np.testing.assert_array_equal(atoms.get_forces(apply_constraint=False), reference)
    assert 1 <= reuse.graph_builds < steps


@pytest.mark.parametrize("skin", [0.0, 1.0])
def test_atoms_that_meet_are_refused_with_or_without_a_skin(skin: float) -> None:
    """Two Cu atoms flying head-on come within 0.006 Å of each other in the first MD step,
    each having moved 0.45 Å, less than half the skin: the calculator refuses that step
    naming the atoms, as without a skin (with one it reused its neighbor list and returned
    the numbers of a model that drops such a pair)."""
    pair = head_on_pair("Cu2", gap=0.9, step=0.45, offset=0.005)
    pair.calc = load_calculator(FORCENET, device="cpu", dtype="float64", skin=skin)
    with pytest.raises(ValueError, match=r"atoms 0 and 1 are 0.00\d+ Å apart, closer than 0.01"):
        VelocityVerlet(pair, timestep=0.5 * units.fs).run(3)


def test_a_pair_exactly_at_the_cutoff_is_no_edge_with_or_without_a_skin() -> None:
    """A periodic image exactly one cutoff away (6 Å = 2 x a 3 Å cell axis) is not an edge:
    the neighbor list keeps ``d < cutoff``, and so does the model's own selection from a
    neighbor list built beyond the cutoff, so a skin changes nothing (it changed the energy by
    0.025 eV when the model kept ``d <= cutoff``)."""
    atoms = Atoms("Cu", cell=[3.0, 4.1, 4.3], pbc=True)
    plain = load_calculator(SPINCONV_FC, device="cpu", dtype="float64")
    assert plain.potential.cutoff == 6.0
    skin = load_calculator(plain.potential, skin=0.5)
    np.testing.assert_array_equal(skin.get_forces(atoms), plain.get_forces(atoms))
    assert skin.get_potential_energy(atoms) == plain.get_potential_energy(atoms)


def test_float32_models_see_float64_positions() -> None:
    """The calculator passes float64 positions to a float32 model, so SpinConv's frames are
    built from the exact geometry: on a perfect B2 crystal (edges along its frames' helper
    direction) float32 conservative forces are the float64 ones to float32 rounding, where
    positions rounded to float32 put the crystal just off its symmetric point, where the frames
    are steepest, and gave forces 5e3 eV/A away from them."""
    atoms = Atoms(
        "CuPd", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5]], cell=[2.99] * 3, pbc=True
    ).repeat((2, 1, 1))
    atoms.positions += [0.37, -0.81, 0.55]
    forces = {
        dtype: load_calculator(
            SPINCONV_EC, device="cpu", dtype=dtype, forces="conservative"
        ).get_forces(atoms)
        for dtype in ("float32", "float64")
    }
    assert np.abs(forces["float64"]).max() < 100.0
    np.testing.assert_allclose(forces["float32"], forces["float64"], atol=1e-4)


def test_energy_centric_stress_is_the_strain_derivative() -> None:
    """Energy-centric SpinConv: stress = (1/V) dE/d(strain), by central finite differences."""
    atoms = molecule("CO")
    atoms.cell = [[4.0, 0.3, 0.1], [0.2, 4.2, 0.0], [0.1, 0.0, 4.4]]
    atoms.pbc = True
    atoms.positions += 1.0
    atoms.calc = SpinConvCalculator(
        SPINCONV_EC, device="cpu", dtype="float64", forces="conservative"
    )
    stress = atoms.get_stress(voigt=False)
    numeric = _strain_derivative(atoms)
    np.testing.assert_allclose(stress, numeric, atol=1e-7 * max(1.0, np.abs(numeric).max()))


def _strain_derivative(atoms: Atoms, step: float = 1e-5) -> np.ndarray:
    """``(1/V) dE/d(strain)`` ``[3, 3]`` (symmetrized) by central finite differences."""
    numeric = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            energies = []
            for sign in (1, -1):
                strained = atoms.copy()
                strain = np.eye(3)
                strain[a, b] += sign * step
                strained.set_cell(atoms.cell.array @ strain, scale_atoms=True)
                strained.calc = atoms.calc
                energies.append(strained.get_potential_energy())
            numeric[a, b] = (energies[0] - energies[1]) / (2 * step) / atoms.get_volume()
    return 0.5 * (numeric + numeric.T)


def test_a_slab_has_a_stress_per_volume_of_its_whole_cell() -> None:
    """As ASE's EMT: a slab periodic in x and y only, whose cell has a vacuum vector, has the
    strain derivative of its energy per volume of the whole cell (what masked cell filters
    need for in-plane relaxations); a structure without a cell of three independent vectors
    has none, and asking says so."""
    atoms = fcc100("Cu", size=(2, 2, 2), vacuum=5.0)
    atoms.cell[1, 0] = 0.4  # skewed in the plane
    add_adsorbate(atoms, "O", 1.6, "hollow")
    atoms.rattle(0.05, seed=3)  # no equidistant neighbors at the max-neighbor cut
    assert atoms.pbc.tolist() == [True, True, False]
    atoms.calc = SpinConvCalculator(
        SPINCONV_EC, device="cpu", dtype="float64", forces="conservative"
    )
    atoms.get_forces()
    assert "stress" not in atoms.calc.results  # a slab's only when asked for
    stress = atoms.get_stress(voigt=False)
    numeric = _strain_derivative(atoms)
    np.testing.assert_allclose(stress, numeric, atol=1e-7 * max(1.0, np.abs(numeric).max()))
    assert np.abs(stress).max() > 1e-4
    molecule_ = molecule("CO")
    molecule_.calc = atoms.calc
    with pytest.raises(PropertyNotImplementedError, match="three independent vectors"):
        molecule_.get_stress()
    assert np.isfinite(molecule_.get_forces()).all()


def test_stress_comes_with_the_forces() -> None:
    """An energy-centric model on a periodic cell computes stress with the forces (as ASE's
    EMT): stress asked for after the forces (MD loggers, NPT) costs no second evaluation, and
    equals the stress asked for first."""
    atoms = molecule("CO", cell=[[4.0, 0.3, 0.1], [0.2, 4.2, 0.0], [0.1, 0.0, 4.4]], pbc=True)
    atoms.positions += 1.0
    options = {"device": "cpu", "dtype": "float64", "forces": "conservative"}
    calc = SpinConvCalculator(SPINCONV_EC, **options)
    evaluations = []
    forward = calc.potential.forward
    calc.potential.forward = lambda *args, **kwargs: (
        evaluations.append(1) or forward(*args, **kwargs)
    )
    atoms.calc = calc
    forces = atoms.get_forces()
    stress = atoms.get_stress()
    assert len(evaluations) == 1
    fresh = atoms.copy()
    fresh.calc = SpinConvCalculator(SPINCONV_EC, **options)
    np.testing.assert_array_equal(fresh.get_stress(), stress)
    np.testing.assert_array_equal(fresh.get_forces(), forces)


def test_compat_forces_give_no_stress() -> None:
    """OCP's compat forces of an energy-centric model differentiate the energy through the
    distance features only; a stress made the same way is not the energy's strain derivative
    (off by up to half of a component), so the calculator does not offer one and says how to
    get it."""
    atoms = molecule("CO", cell=[4.0, 4.2, 4.4], pbc=True)
    atoms.positions += 1.0
    atoms.calc = SpinConvCalculator(SPINCONV_EC, device="cpu", dtype="float64")
    assert "stress" not in atoms.calc.implemented_properties
    atoms.get_forces()
    with pytest.raises(PropertyNotImplementedError, match="needs forces='conservative'"):
        atoms.get_stress()


def test_todict_names_the_model() -> None:
    """``todict()`` (what ASE writes into trajectories and databases) names the checkpoint
    and its precision, as JSON-serializable values, and ``calc.name`` the model; numpy dtypes
    are accepted."""
    import json

    calc = load_calculator(SPINCONV_FC, device="cpu", dtype=np.float64, skin=0.5)
    record = calc.todict()
    assert record["checkpoint"] == str(SPINCONV_FC) and calc.name == "forcecalc-spinconv"
    assert record["dtype"] == "float64" and record["device"] == "cpu"
    assert record["skin"] == 0.5 and record["max_neighbors"] == calc.potential.max_neighbors
    assert record["forces"] is None and record["rotations"] is None
    assert not record["cuda_graph"] and record["compile_mode"] is None
    json.dumps(record)
    conservative = load_calculator(SPINCONV_EC, device="cpu", forces="conservative").todict()
    assert conservative["forces"] == "conservative"
    rotations = np.stack([np.eye(3), np.diag([1.0, -1.0, -1.0])])
    given = load_calculator(SPINCONV_FC, device="cpu", rotations=rotations).todict()
    assert given["rotations"] == rotations.tolist()  # the matrices, not just "array"
    json.dumps(given)


def test_todict_makes_the_calculator_again() -> None:
    """ASE's convention: the parameters ``todict()`` records make the calculator again
    (``load_calculator(**calc.todict())``, and the class's own ``Calc(**calc.todict())``),
    with the options that decide its numbers (dtype, rotations, max_neighbors, forces), so
    that a structure read back from a trajectory or database can be recomputed: the same
    energy and forces to the bit; also for a calculator of a loaded Potential (its file)."""
    atoms = _slab()
    rotations = np.stack([np.eye(3), np.diag([1.0, -1.0, -1.0])])
    loaded = load_checkpoint(SPINCONV_EC, device="cpu", dtype="float64", forces="conservative")
    for calc in (
        SpinConvCalculator(
            SPINCONV_FC, device="cpu", dtype="float64", rotations=rotations, max_neighbors=6
        ),
        load_calculator(loaded, skin=0.5),
    ):
        for again in (load_calculator(**calc.todict()), type(calc)(**calc.todict())):
            assert again.todict() == calc.todict()
            assert again.get_potential_energy(atoms) == calc.get_potential_energy(atoms)
            np.testing.assert_array_equal(again.get_forces(atoms), calc.get_forces(atoms))


def test_class_properties_list_only_what_its_models_give() -> None:
    """``ForceNetCalculator.implemented_properties``, read on the class (as workflow tools do
    before making a calculator), lists no stress: ForceNet predicts forces directly and no
    instance gives one; SpinConv's lists it (an energy-centric SpinConv with conservative
    forces gives it), and instances narrow the list to their model's."""
    assert "stress" not in ForceNetCalculator.implemented_properties
    assert "stress" in SpinConvCalculator.implemented_properties
    forcenet = ForceNetCalculator(FORCENET, device="cpu")
    assert forcenet.implemented_properties == ForceNetCalculator.implemented_properties
    assert "stress" not in load_calculator(SPINCONV_FC, device="cpu").implemented_properties


def test_a_nan_cell_is_named_before_any_numpy_warning() -> None:
    """A cell of NaN is refused with the ValueError naming it, and no numpy RuntimeWarning
    ("invalid value encountered in det") comes first: the input check runs before the cell's
    volume is computed."""
    cell = [[np.nan, 0, 0], [0, 5, 0], [0, 0, 5]]
    atoms = Atoms("Cu2", positions=[[0, 0, 0], [2, 0, 0]], cell=cell, pbc=True)
    atoms.calc = load_calculator(SPINCONV_EC, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"\(Cu2\): the cell contains NaN or inf"):
            atoms.get_potential_energy()


def test_a_failed_set_up_leaves_the_atoms_calculator_alone() -> None:
    """A calculator whose options are refused is never attached to the ``atoms`` it was
    given: the structure keeps its previous calculator (here none), not a half-made one."""
    atoms = _slab()
    with pytest.raises(ValueError, match="skin"):
        load_calculator(SPINCONV_FC, device="cpu", skin=-1.0, atoms=atoms)
    assert atoms.calc is None
    calc = load_calculator(SPINCONV_FC, device="cpu", atoms=atoms)
    assert atoms.calc is calc


def test_options_cannot_be_changed_by_set() -> None:
    """``calc.set()`` refuses to change an option (the parameters only describe the options
    the calculator was made with: ``todict()`` must not record settings never used), naming
    it; setting the value it already has changes nothing and keeps the results."""
    atoms = _slab()
    atoms.calc = load_calculator(SPINCONV_FC, device="cpu")
    energy = atoms.get_potential_energy()
    with pytest.raises(ValueError, match=r"\(dtype, skin would change\)"):
        atoms.calc.set(skin=2.0, dtype="float64")
    assert atoms.calc.set(skin=0.0) == {}
    assert atoms.calc.todict()["skin"] == 0.0 and atoms.calc.results["energy"] == energy


@pytest.mark.parametrize("optimizer", [BFGS, LBFGS, FIRE])
def test_ase_optimizers_reach_fmax_with_fixed_atoms(optimizer) -> None:
    """BFGS, LBFGS and FIRE reach fmax with a conservative model; FixAtoms atoms never move."""
    atoms = _slab()
    start = atoms.positions.copy()
    fixed = atoms.constraints[0].get_indices()
    atoms.calc = SpinConvCalculator(
        SPINCONV_EC, device="cpu", dtype="float64", forces="conservative"
    )
    assert optimizer(atoms, logfile=None).run(fmax=0.1, steps=500)
    assert np.linalg.norm(atoms.get_forces(), axis=1).max() < 0.1
    np.testing.assert_array_equal(atoms.positions[fixed], start[fixed])


def test_velocity_verlet_conserves_energy() -> None:
    """NVE with conservative energy-centric forces (float64) keeps the total energy constant.

    A molecule, so that no neighbor crosses the cutoff or the max-neighbor cut: SpinConv's
    energy has no smooth envelope, so such crossings (frequent in slabs) make it jump.
    """
    atoms = molecule("CH3OH")
    atoms.center(vacuum=5.0)
    atoms.calc = SpinConvCalculator(
        SPINCONV_EC, device="cpu", dtype="float64", forces="conservative"
    )
    rng = np.random.default_rng(0)
    atoms.set_momenta(
        rng.normal(scale=0.05, size=(len(atoms), 3)) * np.sqrt(atoms.get_masses())[:, None]
    )
    dyn = VelocityVerlet(atoms, timestep=0.25 * units.fs)
    energies = []
    dyn.attach(lambda: energies.append(atoms.get_total_energy()), interval=10)
    dyn.run(120)  # 30 fs
    energies = np.array(energies)
    assert np.abs(energies - energies[0]).max() < 5e-4
    assert atoms.get_kinetic_energy() > 0.05


def _relaxation_path(calc: ForceCalculator, steps: int) -> tuple[np.ndarray, list[float]]:
    """BFGS positions and energies from the slab moved off its symmetric positions, where an
    energy-centric model's forces jump (bin edges of the splat: rounding decides the side)."""
    atoms = _slab()
    atoms.positions += np.random.default_rng(0).normal(scale=0.01, size=atoms.positions.shape)
    atoms.calc = calc
    energies: list[float] = []
    optimizer = BFGS(atoms, logfile=None)
    optimizer.attach(lambda: energies.append(atoms.get_potential_energy()))
    optimizer.run(fmax=1e-4, steps=steps)
    return atoms.positions.copy(), energies


CUDA_GRAPH_MODELS = [
    (SPINCONV_FC, {}),
    (FORCENET, {}),
    (SPINCONV_EC, {"forces": "conservative"}),
]


@pytest.mark.parametrize(
    "device",
    DEVICES,
)
@pytest.mark.parametrize(("checkpoint", "options"), CUDA_GRAPH_MODELS)
def test_cuda_graph_relaxation_follows_the_same_path(device: str, checkpoint, options) -> None:
    """With ``cuda_graph`` (the fixed-shape forward, replayed from one captured graph on
    CUDA; energy-centric: with its backward pass), a BFGS relaxation takes the steps it takes
    without: the same energies and positions to rounding (float64), with a neighbor list
    rebuilt every step and with a skin (inputs of one build reused with new positions), with
    a single capture for the whole run; the stress of an energy-centric model is the plain
    calculator's."""
    potential = load_checkpoint(checkpoint, device=device, dtype="float64", **options)
    plain = _relaxation_path(load_calculator(potential), 8)
    for skin in (0.0, 1.0):
        graphed = load_calculator(potential, cuda_graph=True, skin=skin)
        replayed = _relaxation_path(graphed, 8)
        np.testing.assert_allclose(replayed[0], plain[0], rtol=0, atol=1e-10)
        np.testing.assert_allclose(replayed[1], plain[1], rtol=1e-12, atol=1e-12)
        assert graphed.replay is not None
        assert len(graphed.replay.signatures) == 1  # ties and rebuilds kept the sizes
        assert graphed.replay.captures == (1 if device == "cuda" else 0)
    assert graphed.graph_builds < 8  # the skin's list served several steps
    if potential.defines_stress:
        atoms = _slab()
        atoms.positions += np.random.default_rng(1).normal(scale=0.01, size=(len(atoms), 3))
        atoms.pbc = True
        stress = load_calculator(potential).get_stress(atoms)
        np.testing.assert_allclose(graphed.get_stress(atoms), stress, rtol=1e-10, atol=1e-12)
        atoms.pbc = [True, True, False]  # a slab: per volume of its whole cell
        stress = load_calculator(potential).get_stress(atoms)
        np.testing.assert_allclose(graphed.get_stress(atoms), stress, rtol=1e-10, atol=1e-12)
        free = molecule("CO")
        graphed.get_forces(free)
        assert "stress" not in graphed.results  # no cell, no stress
        with pytest.raises(PropertyNotImplementedError, match="three independent vectors"):
            graphed.get_stress(free)


def test_cuda_graph_rebuilds_inputs_when_kept_edges_overflow(monkeypatch) -> None:
    """When moved atoms keep more edges than the inputs have room for (new ties at the cut), the
    forward reports it and the calculator builds the inputs again at these positions: the
    results are the plain calculator's, never those of a graph missing edges."""
    from forcecalc.checkpoint import Potential

    potential = load_checkpoint(SPINCONV_FC, device="cpu", dtype="float64")
    build = Potential.fixed_shape_inputs
    calls = []

    def narrow_first(self, batch, previous=None):
        inputs = build(self, batch, previous)
        calls.append(1)
        if len(calls) == 1:  # as if the first build had seen fewer edges per atom
            inputs["columns"] = torch.arange(4)
        return inputs

    monkeypatch.setattr(Potential, "fixed_shape_inputs", narrow_first)
    atoms = _slab()
    graphed = load_calculator(potential, cuda_graph=True, skin=1.0)
    forces = graphed.get_forces(atoms)
    assert len(calls) == 2
    np.testing.assert_allclose(forces, load_calculator(potential).get_forces(atoms), atol=1e-12)


def test_cuda_graph_needs_a_fixed_shape_forward() -> None:
    """A model without a fixed-shape forward (here a SpinConv without forces) refuses
    cuda_graph with an error naming the model."""
    from forcecalc.checkpoint import CheckpointInfo, Normalizers, Potential
    from forcecalc.models.spinconv import SpinConv

    model = SpinConv(regress_forces=False)
    potential = Potential(model, CheckpointInfo("spinconv", {}, Normalizers(), "forcecalc"))
    with pytest.raises(ValueError, match="cuda_graph needs a fixed-shape forward"):
        load_calculator(potential, cuda_graph=True)


@pytest.mark.parametrize("options", [{"skin": 1.0}, {"skin": 1.0, "cuda_graph": True}, {}])
def test_the_envelope_warning_comes_on_every_path(options: dict) -> None:
    """spinconv-ec (the envelope) with room for 18 neighbors on compressed Cu (12 + 6 within
    4 Å): no warning; one atom moved 0.25 Å toward the third shell (23 neighbors), the rule
    cuts and the calculator warns once, also while a skin's list is reused with
    ``cuda_graph`` (the fixed-shape forward's ``cut`` output; it was silent there)."""
    from forcecalc import ForcecalcWarning

    atoms = bulk("Cu", "fcc", a=3.357, cubic=True).repeat(2)
    atoms.calc = load_calculator("spinconv-ec", max_neighbors=18, device="cpu", **options)
    counts = []
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            atoms.get_potential_energy()
        counts.append(sum(issubclass(w.category, ForcecalcWarning) for w in caught))
        direction = np.array([1.0, 1.0, 0.5])
        atoms.positions[0] += 0.25 * direction / np.linalg.norm(direction)
    assert counts == [0, 1]
