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
4. **orientation**: a rattled slab and its cell rotated by 90° about the surface normal, and
   by a general rotation: energy change and the largest change of the forces rotated back;
5. **extensivity**: ``E(2x2 repeat) - 4 E(cell)`` of a periodic Cu bulk cell;
6. **centrosymmetric sites**: the largest force on B2 CuPd (2x2x2) and on CH4 as ASE builds
   it, with every atom moved by 0 / 1e-9 / 1e-7 / 1e-5 / 1e-3 Å in a random direction: where
   the mean neighbor vector almost vanishes, SpinConv's frame roll follows its direction;
7. **a neighbor on an edge's axis**: OH upright on Pt(100), Pt, O and H exactly in line, then H
   moved off the line by 1e-6 / 1e-4 / 1e-2 Å: energy change and largest force change (H sits
   on the pole of the Pt->O edge's frame, where its longitude is undefined).

    python benchmarks/model_limits.py [--out benchmarks/results/model_limits.json]

Prints a table and writes JSON (atomically).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from ase import Atoms
from ase.build import add_adsorbate, bulk, fcc100, fcc111
from ase.constraints import FixAtoms
from scipy.spatial.transform import Rotation

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


#: A general rotation (not about a surface axis, not a symmetry of the slab).
GENERAL_ROTATION = Rotation.from_euler("zyx", [37.0, 61.0, 113.0], degrees=True).as_matrix()


def orientation(model: str, rotation: np.ndarray) -> dict:
    """Energy change and largest change of the forces rotated back, for a rattled slab and its
    cell rotated by ``rotation`` ``[3, 3]``."""
    slab = o_on_cu111()
    slab.set_constraint()
    slab.rattle(0.05, seed=2)
    energy, forces = evaluate(slab, model)
    rotated = slab.copy()
    rotated.set_cell(slab.cell.array @ rotation.T)
    rotated.positions = slab.positions @ rotation.T
    e_rot, f_rot = evaluate(rotated, model)
    return {
        "energy_change": e_rot - energy,
        "max_force_change": float(np.abs(f_rot @ rotation - forces).max()),
    }


def about_z(degrees: float) -> np.ndarray:
    """The rotation by ``degrees`` about z, ``[3, 3]``."""
    return Rotation.from_euler("z", degrees, degrees=True).as_matrix()


#: How far H is moved off the Pt-O line (Å), each compared with the structure in line.
COLLINEAR_MOVES = (1e-6, 1e-4, 1e-2)


def collinear_neighbor(model: str) -> dict:
    """OH upright on a rattled Pt(100) top site with Pt, O and H exactly on one line, then H
    moved off that line by 1e-6 / 1e-4 / 1e-2 Å: energy change and largest force change.  H
    lies on the axis (pole) of the Pt->O edge's frame, where its longitude is undefined."""
    slab = fcc100("Pt", size=(2, 2, 3), vacuum=9.0)
    slab.pbc = True
    slab.positions += np.random.default_rng(9).normal(0, 0.05, slab.positions.shape)
    top = slab.positions[np.argmax(slab.positions[:, 2])]
    axis = np.array([0.3, -0.2, 1.0]) / np.linalg.norm([0.3, -0.2, 1.0])
    upright = slab + Atoms("OH", positions=[top + 2.0 * axis, top + 2.97 * axis])
    off = np.cross(axis, [1.0, 0.0, 0.0])
    off /= np.linalg.norm(off)
    energy, forces = evaluate(upright, model)
    out = {}
    for move in COLLINEAR_MOVES:
        moved = upright.copy()
        moved.positions[-1] += move * off
        e_moved, f_moved = evaluate(moved, model)
        out[f"{move:g}"] = {
            "energy_change": e_moved - energy,
            "max_force_change": float(np.abs(f_moved - forces).max()),
        }
    return out


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
            "orientation_90_about_z": orientation(model, about_z(90.0)),
            "orientation_general": orientation(model, GENERAL_ROTATION),
            "extensivity_eV": extensivity(model),
            "centrosymmetric_max_force": centrosymmetric(model),
            "collinear_neighbor": collinear_neighbor(model),
        }
        r = results[model]
        print(f"== {model}")
        for row in r["ties"]:
            print(
                f"  free atoms moved {row['move']:.0e} Å: dE {row['energy_change']:+.4f} eV, "
                f"max |dF| {row['max_force_change']:.3f} eV/Å"
            )
        p, n = r["perfect_crystal"], r["no_neighbors"]
        print(
            f"  perfect fcc Cu: max |F| {p['max_force_cell']:.1e} (cell), "
            f"{p['max_force_supercell']:.1e} (2x2x2), change under 1e-9 Å "
            f"{p['max_force_change_1e-9']:.1e} eV/Å"
        )
        print(
            f"  no neighbors: |F| {n['max_force_isolated_atom']:.3f} eV/Å per isolated atom, "
            f"net force on CO {n['net_force_co']:.3f} eV/Å"
        )
        for label, key in (
            ("90° about z", "orientation_90_about_z"),
            ("generally", "orientation_general"),
        ):
            o = r[key]
            print(
                f"  rotated {label}: dE {o['energy_change']:+.2g} eV, "
                f"max |dF| {o['max_force_change']:.2g} eV/Å"
            )
        print(f"  E(2x2 repeat) - 4 E(cell): {r['extensivity_eV']['repeat_minus_4x']:+.3f} eV")
        for name, row in r["centrosymmetric_max_force"].items():
            cells = " / ".join(f"{v:.2g}" for v in row.values())
            print(f"  {name}, every atom moved by {' / '.join(row)} Å: max |F| {cells} eV/Å")
        row = r["collinear_neighbor"]
        energies = " / ".join(f"{v['energy_change']:+.4f}" for v in row.values())
        forces = " / ".join(f"{v['max_force_change']:.3g}" for v in row.values())
        moves = " / ".join(row)
        print(
            f"  Pt-O-H in line, H moved off by {moves} Å: dE {energies} eV, max |dF| {forces} eV/Å"
        )
    write_json(args.out, {"benchmark": "model_limits", "device": "cpu", "models": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
