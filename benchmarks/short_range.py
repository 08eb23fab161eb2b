"""Short-range repulsion of the shipped models beside EMT: CO on top of Cu(100).

    python benchmarks/short_range.py [--models forcenet spinconv-fc spinconv-ec]

Two measurements on a 2x2x3 Cu(100) slab (6 Å vacuum) with C on top of a Cu atom, float64:
- **Squeezed bonds**: the force pushing two atoms apart, ``(F_b - F_a) . u / 2`` along the unit
  vector ``u`` from a to b (positive: repulsive), with the C-O bond squeezed to
  :data:`C_O` (equilibrium ~1.12 Å) and C pushed down to :data:`C_CU` above its Cu atom
  (equilibrium ~1.9 Å; O 1.15 Å above C). O sits 0.02 Å off the Cu-C line.
- **Relaxations**: BFGS to fmax 0.005 eV/Å (at most 300 steps) from C 1.9 Å above the Cu
  atom, C-O 1.15 Å, O 0.02 Å off the line; once with every Cu atom fixed, once with the top
  layer free. Reported: steps, whether it converged, the final C-O distance and C height, and
  EMT's verdict on the end point: its largest force on a free atom and its energy relative to
  EMT's own BFGS from the same start. Upright CO is a saddle point of EMT (relaxed to fmax
  0.001 eV/Å from this start, EMT itself ends with C and O in separate hollow sites, 0.6 eV
  lower); at fmax 0.005 EMT stops on the saddle. An end point with small EMT forces is a
  stationary point of EMT; large ones mean the model relaxed into a structure EMT rejects.
Writes ``benchmarks/results/short_range.json``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import add_adsorbate, fcc100
from ase.calculators.calculator import Calculator
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.optimize import BFGS

from forcecalc import load_calculator
from forcecalc.atomic import write_json

RESULTS = Path(__file__).resolve().parent / "results" / "short_range.json"
N_CU = 12
#: C-O distances (Å) of the squeezed-bond scan.
C_O = (0.4, 0.6, 0.8, 1.0)
#: Heights (Å) of C above its Cu atom in the scan.
C_CU = (0.6, 0.8, 1.0, 1.3)


def co_on_cu100(c_height: float = 1.9, c_o: float = 1.15, free_top: bool = False) -> Atoms:
    """CO upright on top of a Cu atom of a 2x2x3 Cu(100) slab, O 0.02 Å off the line."""
    atoms = fcc100("Cu", size=(2, 2, 3), vacuum=6.0)
    add_adsorbate(atoms, "C", c_height, "ontop")
    atoms.append("O")
    atoms.positions[-1] = atoms.positions[-2] + [0.02, 0.0, c_o]
    top = atoms.positions[:N_CU, 2].max()
    fixed = [i for i in range(N_CU) if not free_top or atoms.positions[i, 2] < top - 0.5]
    atoms.set_constraint(FixAtoms(indices=fixed))
    return atoms


def repulsion(atoms: Atoms, calc: Calculator, a: int, b: int) -> float:
    """The force pushing atoms a and b apart (eV/Å; negative: they attract)."""
    atoms.calc = calc
    forces = atoms.get_forces(apply_constraint=False)
    u = atoms.positions[b] - atoms.positions[a]
    u /= np.linalg.norm(u)
    return float((forces[b] - forces[a]) @ u / 2)


def below_c(atoms: Atoms) -> int:
    """Index of the Cu atom under C."""
    lateral = atoms.positions[:N_CU, :2] - atoms.positions[-2, :2]
    return int(np.argmin(np.linalg.norm(lateral, axis=1)))


def relax_pair(model: Calculator, free_top: bool) -> tuple[Atoms, bool, int]:
    """BFGS of upright CO with ``model``; returns the end point, whether it converged and the
    steps."""
    atoms = co_on_cu100(free_top=free_top)
    atoms.calc = model
    opt = BFGS(atoms, logfile=None)
    converged = bool(opt.run(fmax=0.005, steps=300))
    return atoms, converged, opt.nsteps


def measure(
    calc: Calculator, emt_ends: dict[bool, float]
) -> dict[str, dict[str, float | int | bool]]:
    """Both measurements for one calculator; ``emt_ends``: EMT's energy at the end of its own
    BFGS, by ``free_top``."""
    squeezed = {f"C-O {d} Å": repulsion(co_on_cu100(c_o=d), calc, -2, -1) for d in C_O}
    for h in C_CU:
        atoms = co_on_cu100(c_height=h)
        squeezed[f"C-Cu {h} Å"] = repulsion(atoms, calc, below_c(atoms), -2)
    relaxed: dict[str, float | int | bool] = {}
    for free_top, label in ((False, "Cu fixed"), (True, "top layer free")):
        atoms, converged, steps = relax_pair(calc, free_top)
        relaxed[f"{label}: converged"] = converged
        relaxed[f"{label}: steps"] = steps
        relaxed[f"{label}: C-O (Å)"] = float(atoms.get_distance(-2, -1))
        top = atoms.positions[:N_CU, 2].max()
        relaxed[f"{label}: C height (Å)"] = float(atoms.positions[-2, 2] - top)
        atoms.calc = EMT()
        emt_forces = np.linalg.norm(atoms.get_forces(), axis=1)
        relaxed[f"{label}: EMT fmax (eV/Å)"] = float(emt_forces.max())
        emt_energy = atoms.get_potential_energy() - emt_ends[free_top]
        relaxed[f"{label}: EMT energy above EMT end (eV)"] = float(emt_energy)
    return {"repulsion (eV/Å)": squeezed, "BFGS": relaxed}


def table_row(name: str, row: dict[str, dict[str, float | int | bool]]) -> str:
    """One printed line of :func:`measure`'s results."""
    squeezed = " ".join(f"{v:+7.2f}" for v in row["repulsion (eV/Å)"].values())
    relaxed = row["BFGS"]
    runs = [
        f"{relaxed[f'{k}: C-O (Å)']:.2f} {relaxed[f'{k}: C height (Å)']:.2f} "
        f"{relaxed[f'{k}: steps']:3d}{' ' if relaxed[f'{k}: converged'] else '!'} "
        f"{relaxed[f'{k}: EMT fmax (eV/Å)']:6.2f} "
        f"{relaxed[f'{k}: EMT energy above EMT end (eV)']:+6.2f}"
        for k in ("Cu fixed", "top layer free")
    ]
    return f"{name:12s} {squeezed}   {runs[0]}   {runs[1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["forcenet", "spinconv-fc", "spinconv-ec"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # close-contact warnings are the point here
    start = time.perf_counter()
    distances = ", ".join(map(str, C_O)) + " Å and C-Cu " + ", ".join(map(str, C_CU))
    print(f"repulsion (eV/Å) at C-O {distances} Å; BFGS with Cu fixed / top layer free:")
    print("C-O, C height (Å), steps (!: not converged in 300), EMT's fmax (eV/Å) there and")
    print("EMT's energy there minus at EMT's own end point (eV)")
    emt_ends = {}
    for free_top in (False, True):
        end = relax_pair(EMT(), free_top)[0]
        emt_ends[free_top] = end.get_potential_energy()
    rows = {}
    for name in ["emt", *args.models]:
        calc = EMT() if name == "emt" else load_calculator(name, dtype="float64")
        rows[name] = measure(calc, emt_ends)
        print(table_row(name, rows[name]), flush=True)
    write_json(args.out, {"rows": rows, "seconds": round(time.perf_counter() - start, 1)})
    print(f"{time.perf_counter() - start:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
