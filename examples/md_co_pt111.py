"""Molecular dynamics of CO on Pt(111) with the energy-centric SpinConv (ASE integrators).

The energy-centric model predicts an energy whose exact gradient gives the forces (and the
stress), so it can drive MD: the script thermalises the slab with ASE's Langevin thermostat,
then continues without thermostat (NVE, velocity Verlet) and reports how well the total energy
is conserved, the quantity a force field used for MD must get right. EMT, the model's ground
truth, runs the same protocol (same start, same random numbers) for comparison.

Run:  python examples/md_co_pt111.py [--model spinconv-ec] [--langevin-steps 100]
      [--nve-steps 200] [--timestep 1.0] [--temperature 300]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from ase import Atoms, units
from ase.build import add_adsorbate, fcc111, molecule
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.md.langevin import Langevin
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS

from forcecalc import load_calculator
from forcecalc.data.oc20emt import emt_lattice_constants


def co_on_pt111() -> Atoms:
    """CO on top of a 3x3x3 Pt(111) slab, OC20 style (pbc on all axes, bottom layer fixed),
    relaxed with EMT (the start of both runs)."""
    slab = fcc111("Pt", size=(3, 3, 3), a=emt_lattice_constants()["Pt"], vacuum=7.5)
    slab.pbc = True
    layer = slab.get_tags()  # ASE: 1 = top layer ... 3 = bottom
    co = molecule("CO")
    co.rotate(180, "x")  # carbon down
    add_adsorbate(slab, co, height=1.9, position="ontop", mol_index=1)
    tags = np.concatenate([np.where(layer >= 3, 0, 1), [2, 2]])
    slab.set_tags(tags)
    slab.set_constraint(FixAtoms(mask=tags == 0))
    slab.calc = EMT()
    BFGS(slab, logfile=None).run(fmax=0.02, steps=300)
    slab.calc = None
    return slab


def thermalise(atoms: Atoms, steps: int, timestep: float, temperature: float, seed: int) -> float:
    """Maxwell-Boltzmann velocities, then ``steps`` of Langevin (friction 0.02/fs, fixed atoms
    at rest); returns the wall time per step (ms)."""
    rng = np.random.default_rng(seed)
    masses = atoms.get_masses()[:, None]
    momenta = rng.normal(size=(len(atoms), 3)) * np.sqrt(masses * units.kB * temperature)
    atoms.set_momenta(momenta)  # FixAtoms zeroes the fixed atoms' momenta
    thermostat = Langevin(
        atoms,
        timestep=timestep * units.fs,
        temperature_K=temperature,
        friction=0.02 / units.fs,
        fixcm=False,
        rng=np.random.default_rng(seed + 1),
    )
    start = time.perf_counter()
    thermostat.run(steps)
    return 1000 * (time.perf_counter() - start) / max(steps, 1)


def total_energy(atoms: Atoms) -> float:
    return float(atoms.get_potential_energy() + atoms.get_kinetic_energy())


def nve(atoms: Atoms, steps: int, timestep: float) -> tuple[np.ndarray, float]:
    """Velocity Verlet from the current state; returns the total energy every step (eV) and
    the wall time (s)."""
    energies = [total_energy(atoms)]
    dynamics = VelocityVerlet(atoms, timestep=timestep * units.fs)
    dynamics.attach(lambda: energies.append(total_energy(atoms)), interval=1)
    start = time.perf_counter()
    dynamics.run(steps)
    return np.array(energies[1:]), time.perf_counter() - start


def drift_per_atom_ps(energies: np.ndarray, timestep: float, n_free: int) -> float:
    """Slope of a straight-line fit of the total energy, in eV per free atom per ps."""
    times_ps = np.arange(len(energies)) * timestep / 1000.0
    return float(np.polyfit(times_ps, energies, 1)[0]) / n_free


def main() -> None:
    parser = argparse.ArgumentParser(
        description=" ".join(__doc__.split("\n\n")[0].split()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="spinconv-ec", help="checkpoint name or path")
    parser.add_argument("--langevin-steps", type=int, default=100)
    parser.add_argument("--nve-steps", type=int, default=200)
    parser.add_argument("--timestep", type=float, default=1.0, help="fs")
    parser.add_argument("--temperature", type=float, default=300.0, help="K")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(f"model: {args.model}; dt {args.timestep} fs")
    results = {}
    for label, calc in (("forcecalc", load_calculator(args.model, device="cpu")), ("EMT", EMT())):
        atoms = co_on_pt111()
        atoms.calc = calc
        n_free = len(atoms) - int(atoms.constraints[0].get_indices().size)
        per_step = thermalise(
            atoms, args.langevin_steps, args.timestep, args.temperature, args.seed
        )
        print(
            f"{label}: {len(atoms)} atoms ({n_free} free), Langevin {args.langevin_steps} "
            f"steps at {args.temperature:.0f} K: T = {atoms.get_temperature():.0f} K, "
            f"{per_step:.0f} ms/step"
        )
        if label == "forcecalc" and "stress" in calc.implemented_properties:
            stress = atoms.get_stress()  # eV/Å^3, Voigt order: energy-centric models only
            print(
                f"  stress (GPa, xx yy zz): {' '.join(f'{x / units.GPa:.3f}' for x in stress[:3])}"
            )
        energies, seconds = nve(atoms, args.nve_steps, args.timestep)
        results[label] = energies
        spread = energies.max() - energies.min()
        drift = drift_per_atom_ps(energies, args.timestep, n_free)
        print(
            f"  NVE {args.nve_steps} steps: total energy spread {1000 * spread:.2f} meV, "
            f"drift {1000 * drift:+.3f} meV/atom/ps, "
            f"{1000 * seconds / max(args.nve_steps, 1):.0f} ms/step, "
            f"C-O {atoms.get_distance(-1, -2):.3f} Å"
        )


if __name__ == "__main__":
    main()
