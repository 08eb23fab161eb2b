"""Energy conservation in NVE MD: a model's drift beside EMT's on OC20-EMT systems.

For each of the first ``--systems`` systems of an OC20-EMT file, the EMT-relaxed structure gets
Maxwell-Boltzmann velocities (seeded), is thermalised by Langevin dynamics, then runs NVE
(velocity Verlet); the model runs all systems in one batch with forcecalc's batched MD
(float64), EMT runs the same protocol one system at a time with ASE's integrators. Reported per
system: the spread (max - min) of the total energy and its drift (slope of a straight-line fit)
in meV per free atom per ps.  Prints a table and writes JSON.

    python benchmarks/nve_drift.py --model spinconv-ec --data scratch/small/test_id.h5 \
        --out benchmarks/results/nve_drift_spinconv-ec.json
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch
from ase import Atoms, units
from ase.calculators.emt import EMT
from ase.md.langevin import Langevin
from ase.md.verlet import VelocityVerlet

from forcecalc import load_checkpoint
from forcecalc.atomic import write_json
from forcecalc.data.store import open_dataset
from forcecalc.graph.batch import fixed_mask
from forcecalc.relax import md


def with_velocities(atoms: Atoms, temperature: float, seed: int) -> Atoms:
    """A copy with Maxwell-Boltzmann momenta at ``temperature`` (fixed atoms at rest)."""
    atoms = atoms.copy()
    rng = np.random.default_rng(seed)
    sigma = np.sqrt(atoms.get_masses()[:, None] * units.kB * temperature)
    momenta = rng.normal(size=(len(atoms), 3)) * sigma
    momenta[fixed_mask(atoms)] = 0.0
    atoms.set_momenta(momenta, apply_constraint=False)
    return atoms


def total_energies(frames: list[Atoms]) -> np.ndarray:
    return np.array([a.get_potential_energy() + a.get_kinetic_energy() for a in frames])


def emt_run(atoms: Atoms, args: argparse.Namespace, seed: int) -> np.ndarray:
    """ASE Langevin then velocity Verlet with EMT; total energy at every NVE step."""
    atoms = atoms.copy()
    atoms.calc = EMT()
    Langevin(
        atoms,
        timestep=args.timestep * units.fs,
        temperature_K=args.temperature,
        friction=args.friction / units.fs,
        fixcm=False,
        rng=np.random.default_rng(seed),
    ).run(args.langevin_steps)
    energies = []
    nve = VelocityVerlet(atoms, timestep=args.timestep * units.fs)
    nve.attach(lambda: energies.append(atoms.get_potential_energy() + atoms.get_kinetic_energy()))
    nve.run(args.nve_steps)
    return np.array(energies)


def summary(energies: np.ndarray, timestep: float, n_free: int) -> dict[str, float]:
    times_ps = np.arange(len(energies)) * timestep / 1000.0
    slope = float(np.polyfit(times_ps, energies, 1)[0])
    return {
        "spread_meV": 1000.0 * float(energies.max() - energies.min()),
        "drift_meV_per_atom_ps": 1000.0 * slope / n_free,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="spinconv-ec")
    parser.add_argument("--data", default="scratch/small/test_id.h5")
    parser.add_argument("--systems", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=300.0)
    parser.add_argument("--friction", type=float, default=0.02, help="1/fs")
    parser.add_argument("--timestep", type=float, default=1.0, help="fs")
    parser.add_argument("--langevin-steps", type=int, default=100)
    parser.add_argument("--nve-steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/nve_drift.json", help="JSON file")
    args = parser.parse_args()

    if not Path(args.data).is_file():
        parser.error(
            f"no data file {args.data}: make one with 'forcecalc data oc20emt --size small "
            "--out scratch/small' or pass --data"
        )
    dataset = open_dataset(args.data)
    n = min(args.systems, len(dataset.systems["relaxed_frame"]))
    starts = [
        with_velocities(dataset.relaxed(i), args.temperature, args.seed + i) for i in range(n)
    ]
    potential = load_checkpoint(args.model, device="cpu", dtype="float64")

    start = time.perf_counter()
    thermalised = md(
        starts,
        potential,
        args.langevin_steps,
        args.timestep,
        "langevin",
        temperature_K=args.temperature,
        friction=args.friction,
        seed=args.seed,
    )
    finals = md(thermalised, potential, args.nve_steps, args.timestep, trajectory_interval=1)
    seconds = time.perf_counter() - start

    rows = []
    print(
        f"NVE after {args.langevin_steps} Langevin steps at {args.temperature:.0f} K: "
        f"{args.nve_steps} steps of {args.timestep} fs ({args.model}, float64, batched)"
    )
    print(
        "| system | atoms (free) | model spread meV | model drift meV/atom/ps "
        "| EMT spread | EMT drift |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for i, final in enumerate(finals):
        n_free = int((~fixed_mask(final)).sum())
        model = summary(total_energies(final.info["trajectory"]), args.timestep, n_free)
        emt = summary(emt_run(starts[i], args, args.seed + i), args.timestep, n_free)
        formula = starts[i].get_chemical_formula()
        rows.append(
            {
                "system": i,
                "formula": formula,
                "atoms": len(final),
                "free": n_free,
                "model": model,
                "emt": emt,
            }
        )
        print(
            f"| {i} {formula} | {len(final)} ({n_free}) | {model['spread_meV']:.2f} | "
            f"{model['drift_meV_per_atom_ps']:+.3f} | {emt['spread_meV']:.2f} | "
            f"{emt['drift_meV_per_atom_ps']:+.3f} |"
        )
    drifts = np.abs([r["model"]["drift_meV_per_atom_ps"] for r in rows])
    print(
        f"median |drift|: model {np.median(drifts):.3f} meV/atom/ps; model MD time {seconds:.0f} s"
    )
    if args.out:
        write_json(
            args.out,
            {
                "args": vars(args),
                "rows": rows,
                "median_abs_drift_meV_per_atom_ps": float(np.median(drifts)),
                "model_seconds": seconds,
                "hardware": {
                    "cpu": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(),
                },
            },
        )


if __name__ == "__main__":
    main()
