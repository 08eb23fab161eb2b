"""Known limits of the shipped models, measured (README, "Known limits of the models").

For each shipped model, float64, on the CPU:

1. **max-neighbor ties**: O on an ideal Cu(111) slab (bottom two layers fixed), then the free
   atoms moved by 1e-6 / 1e-4 / 1e-2 Å (``Atoms.rattle``): energy and largest force change.
   An ideal layer's neighbor shells are tied at the max-neighbor cut, where forcecalc keeps the
   whole shell; a move above 1e-5 Å splits it;
2. **perfect crystal**: the largest force on fcc Cu, 4-atom cubic cell and its 2x2x2 repeat
   (zero by symmetry), and after moving every atom by 1e-9 Å;
3. **no neighbors**: the force on each of two Cu atoms 50 Å apart (zero for a physical model)
   and the net force on a free CO molecule;
4. **orientation**: a rattled slab and its cell rotated by 90° about the surface normal:
   energy change and the largest change of the forces rotated back;
5. **extensivity**: ``E(2x2 repeat) - 4 E(cell)`` of a periodic Cu bulk cell;
6. **centrosymmetric sites**: the largest force on B2 CuPd (2x2x2) and on CH4 as ASE builds
   it, with every atom moved by 0 / 1e-9 / 1e-7 / 1e-5 / 1e-3 Å in a random direction: where
   the mean neighbor vector almost vanishes, SpinConv's frame roll follows its direction.

    python benchmarks/model_limits.py [--out benchmarks/results/model_limits.json]

Prints a table and writes JSON (atomically).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from ase import Atoms
from ase.build import add_adsorbate, bulk, fcc111
from ase.constraints import FixAtoms

from forcecalc import load_calculator
from forcecalc.atomic import write_json

MODELS = ("spinconv-fc", "spinconv-ec", "forcenet")


def evaluate(atoms: Atoms, model: str) -> tuple[float, np.ndarray]:
    """Energy and forces of ``atoms`` (a copy) with a fresh float64 calculator."""
    atoms = atoms.copy()
    atoms.calc = load_calculator(model, device="cpu", dtype="float64")
    return atoms.get_potential_energy(), atoms.get_forces(apply_constraint=False)


def o_on_cu111() -> Atoms:
    slab = fcc111("Cu", size=(3, 3, 4), vacuum=10.0)
    add_adsorbate(slab, "O", 1.2, "fcc")
    slab.set_constraint(FixAtoms(mask=slab.get_tags() >= 3))
    return slab


def ties(model: str) -> list[dict]:
    ideal = o_on_cu111()
    energy, forces = evaluate(ideal, model)
    rows = []
    for amplitude in (1e-6, 1e-4, 1e-2):
        moved = ideal.copy()
        moved.rattle(amplitude, seed=0)
        e, f = evaluate(moved, model)
        rows.append(
            {
                "move": amplitude,
                "energy_change": e - energy,
                "max_force_change": float(np.abs(f - forces).max()),
            }
        )
    return rows


def perfect_crystal(model: str) -> dict:
    cell = bulk("Cu", "fcc", a=3.6, cubic=True)
    supercell = cell.repeat((2, 2, 2))
    moved = supercell.copy()
    moved.rattle(1e-9, seed=1)
    _, f_cell = evaluate(cell, model)
    _, f_super = evaluate(supercell, model)
    _, f_moved = evaluate(moved, model)
    return {
        "max_force_cell": float(np.abs(f_cell).max()),
        "max_force_supercell": float(np.abs(f_super).max()),
        "max_force_change_1e-9": float(np.abs(f_moved - f_super).max()),
    }


def no_neighbors(model: str) -> dict:
    _, f_apart = evaluate(Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 50]]), model)
    _, f_co = evaluate(Atoms("CO", positions=[[0, 0, 0], [0, 0, 1.15]]), model)
    return {
        "max_force_isolated_atom": float(np.abs(f_apart).max()),
        "net_force_co": float(np.linalg.norm(f_co.sum(axis=0))),
    }


def orientation(model: str) -> dict:
    slab = o_on_cu111()
    slab.set_constraint()
    slab.rattle(0.05, seed=2)
    energy, forces = evaluate(slab, model)
    rotated = slab.copy()
    rotated.rotate(90, "z", rotate_cell=True)
    e_rot, f_rot = evaluate(rotated, model)
    angle = np.radians(90)
    back = np.array([[np.cos(angle), np.sin(angle), 0], [-np.sin(angle), np.cos(angle), 0]])
    back = np.vstack([back, [0, 0, 1]])
    return {
        "energy_change": e_rot - energy,
        "max_force_change": float(np.abs(f_rot @ back.T - forces).max()),
    }


def extensivity(model: str) -> dict:
    cell = bulk("Cu", "fcc", a=3.6) * (2, 2, 2)
    cell.rattle(0.02, seed=3)
    e_cell, _ = evaluate(cell, model)
    e_repeat, _ = evaluate(cell.repeat((2, 2, 1)), model)
    return {"repeat_minus_4x": e_repeat - 4 * e_cell}


CENTROSYMMETRIC_MOVES = (0.0, 1e-9, 1e-7, 1e-5, 1e-3)


def centrosymmetric(model: str) -> dict:
    from ase.build import molecule

    ch4 = molecule("CH4", cell=[12.0] * 3, pbc=True)
    ch4.center()
    structures = {
        "B2 CuPd": bulk("CuPd", "cesiumchloride", a=2.99).repeat(2),
        "CH4": ch4,
    }
    out = {}
    for name, atoms in structures.items():
        directions = np.random.default_rng(11).normal(size=(len(atoms), 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        forces = []
        for move in CENTROSYMMETRIC_MOVES:
            moved = atoms.copy()
            moved.positions += move * directions
            forces.append(float(np.abs(evaluate(moved, model)[1]).max()))
        out[name] = dict(zip([f"{m:g}" for m in CENTROSYMMETRIC_MOVES], forces, strict=True))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="benchmarks/results/model_limits.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for model in MODELS:
        results[model] = {
            "ties": ties(model),
            "perfect_crystal": perfect_crystal(model),
            "no_neighbors": no_neighbors(model),
            "orientation_90_about_z": orientation(model),
            "extensivity_eV": extensivity(model),
            "centrosymmetric_max_force": centrosymmetric(model),
        }
        r = results[model]
        print(f"== {model}")
        for row in r["ties"]:
            print(
                f"  free atoms moved {row['move']:.0e} Å: dE {row['energy_change']:+.4f} eV, "
                f"max |dF| {row['max_force_change']:.3f} eV/Å"
            )
        p, n, o = r["perfect_crystal"], r["no_neighbors"], r["orientation_90_about_z"]
        print(
            f"  perfect fcc Cu: max |F| {p['max_force_cell']:.1e} (cell), "
            f"{p['max_force_supercell']:.1e} (2x2x2), change under 1e-9 Å "
            f"{p['max_force_change_1e-9']:.1e} eV/Å"
        )
        print(
            f"  no neighbors: |F| {n['max_force_isolated_atom']:.3f} eV/Å per isolated atom, "
            f"net force on CO {n['net_force_co']:.3f} eV/Å"
        )
        print(
            f"  rotated 90° about z: dE {o['energy_change']:+.4f} eV, "
            f"max |dF| {o['max_force_change']:.3f} eV/Å"
        )
        print(f"  E(2x2 repeat) - 4 E(cell): {r['extensivity_eV']['repeat_minus_4x']:+.3f} eV")
        for name, row in r["centrosymmetric_max_force"].items():
            cells = " / ".join(f"{v:.2g}" for v in row.values())
            print(f"  {name}, every atom moved by {' / '.join(row)} Å: max |F| {cells} eV/Å")
    write_json(args.out, {"benchmark": "model_limits", "device": "cpu", "models": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
