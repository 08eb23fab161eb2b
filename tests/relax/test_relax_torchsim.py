"""The optional torch-sim adapter (skipped without torch-sim-atomistic)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from relax_helpers import mixed_structures, morse_potential, single_thread

from forcecalc.calculator import load_calculator

__all__ = ["single_thread"]

torch_sim = pytest.importorskip("torch_sim")


def test_model_interface_outputs_equal_the_calculator():
    """Contract: ForcecalcModel takes a torch-sim SimState of several systems (column-vector
    cells; torch-sim 0.3 has one pbc flag for all, so the slab is made periodic along z with
    its vacuum) and returns the calculator's energies and forces per system."""
    from forcecalc.relax.torchsim import ForcecalcModel

    potential = morse_potential()
    model = ForcecalcModel(potential)
    assert model.device == potential.device and model.dtype == torch.float64
    structures = [mixed_structures()[k] for k in (0, 16, 17)]
    structures[0].pbc = True
    state = torch_sim.io.atoms_to_state(structures, device=model.device, dtype=model.dtype)
    out = model(state)
    forces = np.split(out["forces"].numpy(), np.cumsum([len(a) for a in structures])[:-1])
    for k, atoms in enumerate(structures):
        atoms = atoms.copy()
        atoms.calc = load_calculator(potential)
        assert float(out["energy"][k]) == pytest.approx(atoms.get_potential_energy(), 1e-10)
        np.testing.assert_allclose(forces[k], atoms.get_forces(apply_constraint=False), atol=1e-10)


def test_torch_sim_static_runner():
    """Contract: torch-sim's own runner (ts.static) accepts the adapter."""
    from forcecalc.relax.torchsim import ForcecalcModel

    model = ForcecalcModel(morse_potential())
    structures = [mixed_structures()[k] for k in (16, 17)]
    results = torch_sim.static(structures, model)
    assert len(results) == 2
    assert torch.isfinite(results[0]["potential_energy"]).all()


def test_an_element_without_parameters_is_refused():
    """Contract: a state with an element the model has no parameters for (W for the shipped
    ``spinconv-fc``, Cu/O/... only) is an error naming it and its atoms, as the calculator's
    (the adapter returned ordinary-looking energies and forces from untrained tables)."""
    from ase.build import bulk

    from forcecalc.relax.torchsim import ForcecalcModel

    model = ForcecalcModel("spinconv-fc", device="cpu")
    copper = bulk("Cu", "fcc", a=3.6, cubic=True)
    tungsten = bulk("W", "bcc", a=3.16, cubic=True)
    state = torch_sim.io.atoms_to_state([copper, tungsten], device=model.device, dtype=model.dtype)
    with pytest.raises(ValueError, match=r"no parameters for element\(s\) W \(atoms \[4, 5\]\)"):
        model(state)
    alone = torch_sim.io.atoms_to_state([copper], device=model.device, dtype=model.dtype)
    assert torch.isfinite(model(alone)["energy"]).all()


def test_stress_needs_an_energy_centric_model():
    """Contract: asking for stress from a model without it raises ValueError."""
    from forcecalc.relax.torchsim import ForcecalcModel

    with pytest.raises(ValueError, match="stress"):
        ForcecalcModel(morse_potential(), compute_stress=True)


def test_adapter_refuses_what_it_would_ignore():
    """Contract: model options with an already loaded model, and stress of a state without a
    cell of three independent vectors, are errors (they were ignored, or gave NaN stress); a
    slab's stress (pbc [T, T, F], vacuum in the cell) is the ASE calculator's."""
    from ocp_fixtures import ocp_checkpoint_path

    from forcecalc.checkpoint import load_checkpoint
    from forcecalc.relax.torchsim import ForcecalcModel

    potential = load_checkpoint(ocp_checkpoint_path("spinconv_small_ec"), device="cpu")
    with pytest.raises(ValueError, match=r"model option\(s\) forces given with a loaded model"):
        ForcecalcModel(potential, forces="compat")
    with pytest.raises(ValueError, match=r"defines no stress.*forces='conservative'"):
        ForcecalcModel(potential, compute_stress=True)  # OCP's compat forces: no stress
    potential = load_checkpoint(
        ocp_checkpoint_path("spinconv_small_ec"), device="cpu", forces="conservative"
    )
    model = ForcecalcModel(potential, compute_stress=True)
    slab, cluster = mixed_structures()[0].copy(), mixed_structures()[19]
    assert slab.pbc.tolist() == [True, True, False]
    slab_state = {  # torch-sim's atoms_to_state turns mixed pbc into False: given directly
        "positions": torch.as_tensor(slab.positions),
        # columns, as torch-sim's; a cell filter's cell requires grad
        "cell": torch.as_tensor(slab.cell.array.T)[None].requires_grad_(True),
        "pbc": torch.as_tensor(slab.pbc),
        "atomic_numbers": torch.as_tensor(slab.numbers),
        "system_idx": torch.zeros(len(slab), dtype=torch.int64),
    }
    stress = model(slab_state)["stress"][0].numpy()
    slab.calc = load_calculator(potential)
    np.testing.assert_allclose(stress.ravel()[[0, 4, 8, 5, 2, 1]], slab.get_stress(), atol=1e-6)
    state = torch_sim.io.atoms_to_state([cluster], device=model.device, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"three independent vectors.*systems \[0\]"):
        model(state)


def test_float32_model_sees_float64_positions():
    """Contract: as the calculator, the adapter gives a float32 model float64 positions (the
    frame geometry is float64): its forces equal the calculator's to float32 rounding."""
    from ocp_fixtures import ocp_checkpoint_path

    from forcecalc.checkpoint import load_checkpoint
    from forcecalc.relax.torchsim import ForcecalcModel

    potential = load_checkpoint(ocp_checkpoint_path("spinconv_small_ec"), device="cpu")
    model = ForcecalcModel(potential)
    atoms = mixed_structures()[0].copy()
    atoms.pbc = True
    state = torch_sim.io.atoms_to_state([atoms], device=model.device, dtype=torch.float64)
    out = model(state)
    atoms.calc = load_calculator(potential)
    assert out["forces"].dtype == torch.float32  # returned in the model's dtype
    np.testing.assert_allclose(  # to the output's rounding (float32 positions: 4.6e-3 eV/Å)
        out["forces"].double().numpy(), atoms.get_forces(apply_constraint=False), atol=1e-6
    )


# a 3-step optimization says it stopped at its step limit, as asked
@pytest.mark.filterwarnings("ignore:Optimize has reached max steps")
def test_float32_energy_centric_model_runs_torch_sims_optimizers_and_integrators():
    """Contract: the adapter returns every output in the model's dtype (an energy-centric
    model's forces and stress are gradients with respect to float64 positions), so torch-sim's
    float32 states run its optimizers (a cell relaxation too) and integrators; they crashed on
    float64 forces."""
    from ase.build import bulk
    from ocp_fixtures import ocp_checkpoint_path

    from forcecalc.checkpoint import load_checkpoint
    from forcecalc.relax.torchsim import ForcecalcModel

    potential = load_checkpoint(
        ocp_checkpoint_path("spinconv_small_ec"), device="cpu", forces="conservative"
    )
    model = ForcecalcModel(potential, compute_stress=True)
    assert model.dtype == torch.float32
    cells = [bulk("Cu", "fcc", a=3.7, cubic=True), bulk("Pt", "fcc", a=4.0, cubic=True)]
    state = torch_sim.io.atoms_to_state(cells, device=model.device, dtype=model.dtype)
    assert {value.dtype for value in model(state).values()} == {torch.float32}
    optimizers = torch_sim.optimizers
    relaxed = torch_sim.optimize(cells, model, optimizer=optimizers.frechet_cell_fire, max_steps=3)
    assert relaxed.positions.dtype == torch.float32
    moved = torch_sim.integrate(
        cells,
        model,
        integrator=torch_sim.integrators.nve,
        n_steps=3,
        temperature=300,
        timestep=0.001,
    )
    assert torch.isfinite(moved.positions).all() and moved.positions.dtype == torch.float32
