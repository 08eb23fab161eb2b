"""Batched relaxation vs one-by-one ASE relaxation with forcecalc's calculator.

Builds N OC20-style slab + adsorbate structures (fcc111/fcc100 slabs, 2x2x3 or 3x3x4, of
Cu/Pt/Pd/Ag/Ni/Au with O, OH or CO, rattled, lower half fixed), or reads them (``--data``, e.g.
OC20-EMT's IS2RS test inputs from ``forcecalc data is2rs``), relaxes them

* one by one: ASE's optimizer with ``forcecalc.load_calculator`` (default settings), and
* batched: ``forcecalc.relax`` (same optimizer, same potential object),

and prints a table (wall and CPU time, structures/s, speedup in wall and in CPU time,
per structure when ``--one-by-one-max`` relaxes only an evenly spread sample one by one,
converged fraction, mean steps, largest difference of the final energies and positions between
the two; on a shared machine the CPU-time speedup is the steadier figure) and writes everything
as JSON, atomically (temporary file + rename).

Examples::

    python benchmarks/relax_speed.py --n 8 --steps 60 --threads 1       # quick CPU run
    python benchmarks/relax_speed.py --n 256 --device cuda --model spinconv-ec
    forcecalc data is2rs --size large --out is2rs_large.extxyz    # 1,000 IS2RS test inputs
    python benchmarks/relax_speed.py --data is2rs_large.extxyz --model spinconv-fc \
        --optimizer lbfgs --steps 300 --one-by-one-max 50 --device cuda

With a random-weight test checkpoint the potential has no physical minimum, so few
structures converge; the comparison of speed and of the two engines' results still holds.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from forcecalc.atomic import write_json
from forcecalc.checkpoint import Potential

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "tests" / "data" / "ocp" / "forcenet_small.pt"
METALS = ("Cu", "Pt", "Pd", "Ag", "Ni", "Au")
ADSORBATES = ("O", "OH", "CO")


def build_structures(n: int, seed: int = 0) -> list:
    """``n`` rattled slab + adsorbate structures with FixAtoms on the lower half."""
    from ase.build import add_adsorbate, fcc100, fcc111, molecule
    from ase.constraints import FixAtoms

    rng = np.random.default_rng(seed)
    structures = []
    for k in range(n):
        facet = (fcc111, fcc100)[k % 2]
        size = ((2, 2, 3), (3, 3, 4))[(k // 2) % 2]
        metal = METALS[k % len(METALS)]
        name = ADSORBATES[k % len(ADSORBATES)]
        slab = facet(metal, size=size, vacuum=7.0)
        adsorbate = name if len(name) == 1 else molecule(name)
        if name == "CO":
            adsorbate.rotate(180, "x")  # carbon down
        add_adsorbate(slab, adsorbate, 1.8, "ontop")
        layers = size[2]
        slab.set_constraint(FixAtoms(indices=[a.index for a in slab if a.tag > layers // 2]))
        slab.rattle(0.05, seed=int(rng.integers(2**31)))
        structures.append(slab)
    return structures


def one_by_one(
    structures: list, potential: Potential, optimizer: str, fmax: float, steps: int
) -> dict:
    """ASE's optimizer with forcecalc's calculator, one structure after the other (on the
    CPU with numpy's BLAS on one thread, as ``forcecalc relax`` runs it: ASE's BFGS is 3x
    slower otherwise, see the README)."""
    from ase.optimize import BFGS, FIRE, LBFGS
    from threadpoolctl import threadpool_limits

    from forcecalc.calculator import load_calculator

    cls = {"fire": FIRE, "lbfgs": LBFGS, "bfgs": BFGS}[optimizer]
    calc = load_calculator(potential)
    out = {"energies": [], "positions": [], "steps": [], "converged": []}
    start, cpu_start = time.perf_counter(), time.process_time()
    blas_threads = 1 if potential.device.type == "cpu" else None
    with threadpool_limits(blas_threads, user_api="blas"):
        for atoms in structures:
            atoms = atoms.copy()
            atoms.calc = calc
            dynamics = cls(atoms, logfile=None)
            out["converged"].append(bool(dynamics.run(fmax=fmax, steps=steps)))
            out["steps"].append(int(dynamics.nsteps))
            out["energies"].append(float(atoms.get_potential_energy()))
            out["positions"].append(atoms.positions.copy())
    _synchronize(potential)
    out["seconds"] = time.perf_counter() - start
    out["cpu_seconds"] = time.process_time() - cpu_start
    return out


def batched(
    structures: list,
    potential: Potential,
    optimizer: str,
    fmax: float,
    steps: int,
    batch_size: int | str,
    skin: float | None = None,
) -> dict:
    """``forcecalc.relax`` on all structures (``skin`` None: its default)."""
    from forcecalc.relax import relax

    options = {} if skin is None else {"skin": skin}
    start, cpu_start = time.perf_counter(), time.process_time()
    results = relax(
        structures,
        potential,
        optimizer=optimizer,
        fmax=fmax,
        steps=steps,
        batch_size=batch_size,
        **options,
    )
    _synchronize(potential)
    return {
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
        "energies": [float(a.get_potential_energy()) for a in results],
        "positions": [a.positions.copy() for a in results],
        "steps": [int(a.info["relax_steps"]) for a in results],
        "converged": [bool(a.info["relax_converged"]) for a in results],
    }


def _synchronize(potential: Potential) -> None:
    if potential.device.type == "cuda":
        torch.cuda.synchronize(potential.device)


def load_structures(path: str, n: int | None) -> list:
    """The first ``n`` (all if None) structures of an ASE-readable file, e.g. the IS2RS inputs
    written by ``forcecalc data is2rs`` (FixAtoms and tags kept)."""
    import ase.io

    structures = ase.io.read(path, index=":")
    return structures if n is None else structures[:n]


def one_by_one_subset(n: int, most: int | None) -> list[int]:
    """Indices of the structures relaxed one by one: all, or ``most`` of them evenly spread
    (a throughput sample when relaxing every one of them one by one would take too long)."""
    if most is None or most >= n:
        return list(range(n))
    return sorted({int(k) for k in np.linspace(0, n - 1, most).round()})


def compare(mode: str, run: dict, reference: dict | None, subset: list[int]) -> dict:
    """One row of the table: ``run``'s throughput and convergence, and, beside the one-by-one
    ``reference`` (which relaxed the structures ``subset``), the speed-up in structures per
    second (wall and CPU time) and the largest differences of the results on ``subset``."""
    n = len(run["steps"])
    row = {
        "mode": mode,
        "structures": n,
        "seconds": run["seconds"],
        "cpu_seconds": run["cpu_seconds"],
        "structures_per_s": n / run["seconds"],
        "converged_fraction": float(np.mean(run["converged"])),
        "mean_steps": float(np.mean(run["steps"])),
    }
    if reference is None:
        return row
    m = len(reference["steps"])
    mine = subset if mode == "batched" else list(range(m))
    pick = {k: [run[k][i] for i in mine] for k in ("energies", "positions", "steps", "converged")}
    row["speedup"] = (n / run["seconds"]) / (m / reference["seconds"])
    row["cpu_time_speedup"] = (n / run["cpu_seconds"]) / (m / reference["cpu_seconds"])
    row["compared_structures"] = m
    row["converged_fraction_compared"] = float(np.mean(pick["converged"]))
    energy_diff = np.abs(np.subtract(pick["energies"], reference["energies"]))
    row["max_energy_diff_eV"] = float(np.max(energy_diff))
    row["median_energy_diff_eV"] = float(np.median(energy_diff))
    row["energy_within_10meV_fraction"] = float(np.mean(energy_diff < 0.01))
    row["max_position_diff_A"] = float(
        max(
            np.abs(a - b).max()
            for a, b in zip(pick["positions"], reference["positions"], strict=True)
        )
    )
    row["same_steps_fraction"] = float(np.mean(np.equal(pick["steps"], reference["steps"])))
    row["same_convergence_fraction"] = float(
        np.mean(np.equal(pick["converged"], reference["converged"]))
    )
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--n", type=int, default=None, help="number of structures (default: 16, or all of --data)"
    )
    parser.add_argument(
        "--data",
        default=None,
        help="structures to relax (extxyz, e.g. from 'forcecalc data is2rs')",
    )
    parser.add_argument(
        "--one-by-one-max",
        type=int,
        default=None,
        help="relax only this many (evenly spread) one by one; the speed-up is then per structure",
    )
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint path or name")
    parser.add_argument("--forces", default=None, help="SpinConv energy-centric: conservative")
    parser.add_argument("--optimizer", default="fire", choices=["fire", "lbfgs", "bfgs"])
    parser.add_argument("--fmax", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", default="auto", help="'auto' or an int")
    parser.add_argument("--skin", type=float, default=None, help="neighbor-list skin (Å)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-one-by-one", action="store_true", help="batched run only")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of each mode (alternating); best time kept"
    )
    parser.add_argument("--out", default="benchmarks/results/relax_speed.json")
    args = parser.parse_args(argv)
    if args.data is None and args.n is None:
        args.n = 16

    from forcecalc.checkpoint import load_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    options = {"forces": args.forces} if args.forces else {}
    potential = load_checkpoint(args.model, device=args.device, dtype=args.dtype, **options)
    batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    structures = (
        load_structures(args.data, args.n) if args.data else build_structures(args.n, args.seed)
    )
    n_atoms = [len(a) for a in structures]
    subset = one_by_one_subset(len(structures), args.one_by_one_max)
    print(
        f"{len(structures)} structures ({min(n_atoms)}-{max(n_atoms)} atoms), {potential.name} "
        f"on {potential.device} ({args.dtype}), {args.optimizer.upper()}, fmax {args.fmax}, "
        f"at most {args.steps} steps, torch threads {torch.get_num_threads()}; one by one: "
        f"{len(subset)} of them"
    )
    batched(structures[:2], potential, args.optimizer, args.fmax, 2, batch_size)  # warm-up
    runs: dict[str, dict] = {}
    for _ in range(max(args.repeat, 1)):
        candidates = {
            "batched": lambda: batched(
                structures, potential, args.optimizer, args.fmax, args.steps, batch_size, args.skin
            )
        }
        if not args.skip_one_by_one:
            candidates["one_by_one"] = lambda: one_by_one(
                [structures[k] for k in subset], potential, args.optimizer, args.fmax, args.steps
            )
        for mode, run in candidates.items():
            result = run()
            if mode not in runs or result["seconds"] < runs[mode]["seconds"]:
                runs[mode] = result
    rows = [compare(mode, run, runs.get("one_by_one"), subset) for mode, run in runs.items()]

    header = (
        f"{'mode':<11} {'wall/s':>8} {'cpu/s':>8} {'struct/s':>9} {'speedup':>8} "
        f"{'cpu-speedup':>11} {'converged':>9} {'steps':>6} {'max|dE|/eV':>11} {'med|dE|/eV':>11} "
        f"{'max|dx|/Å':>10} {'same-conv':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        compared = "speedup" in row
        print(
            f"{row['mode']:<11} {row['seconds']:>8.2f} {row['cpu_seconds']:>8.2f} "
            f"{row['structures_per_s']:>9.3f} "
            f"{format(row['speedup'], '.2f') if compared else '-':>8} "
            f"{format(row['cpu_time_speedup'], '.2f') if compared else '-':>11} "
            f"{row['converged_fraction']:>9.2f} {row['mean_steps']:>6.1f} "
            f"{format(row['max_energy_diff_eV'], '.2e') if compared else '-':>11} "
            f"{format(row['median_energy_diff_eV'], '.2e') if compared else '-':>11} "
            f"{format(row['max_position_diff_A'], '.2e') if compared else '-':>10} "
            f"{format(row['same_convergence_fraction'], '.2f') if compared else '-':>9}"
        )
    report = {
        "benchmark": "relax_speed",
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "model": potential.name,
        "device": str(potential.device),
        "device_name": (
            torch.cuda.get_device_name(potential.device)
            if potential.device.type == "cuda"
            else platform.processor() or platform.machine()
        ),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "torch_threads": torch.get_num_threads(),
        "n_atoms": n_atoms,
        "rows": rows,
        "per_structure": {
            mode: {k: run[k] for k in ("energies", "steps", "converged")}
            for mode, run in runs.items()
        },
    }
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
