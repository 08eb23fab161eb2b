"""Nudged elastic band: O hopping between neighbouring hollow sites on Cu(100).

Relaxes both end states, builds a band of images between them and relaxes the band with the
model (climbing image), then does the same with EMT, the model's ground truth, and prints both
barriers. The default model is `spinconv-ec`, whose forces are the gradient of the energy the
band reports; with the direct forces of `spinconv-fc` the barrier depends on the band's
variant (README, "Known limits of the models").

Run:  python examples/neb_o_cu100.py [--model spinconv-ec] [--images 5]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
from ase import Atoms
from ase.build import add_adsorbate, fcc100
from ase.calculators.calculator import Calculator
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.mep import NEB
from ase.optimize import BFGS, FIRE
from threadpoolctl import threadpool_limits

from forcecalc import load_calculator
from forcecalc.data.oc20emt import emt_lattice_constants


def end_states() -> tuple[Atoms, Atoms]:
    """O in two neighbouring hollow sites of a 3x3 Cu(100) slab (3 layers, bottom 2 fixed)."""
    a = emt_lattice_constants()["Cu"]
    slab = fcc100("Cu", size=(3, 3, 3), a=a, vacuum=7.5)
    slab.pbc = True
    layer = slab.get_tags()
    slab.set_tags(np.where(layer >= 2, 0, 1))
    initial = slab.copy()
    add_adsorbate(initial, "O", 0.9, "hollow")
    final = slab.copy()
    add_adsorbate(final, "O", 0.9, "hollow", offset=(1, 0))
    for atoms in (initial, final):
        atoms.set_tags(np.concatenate([slab.get_tags(), [2]]))
        atoms.set_constraint(FixAtoms(mask=np.concatenate([layer >= 2, [False]])))
    return initial, final


def barrier(
    initial: Atoms, final: Atoms, make_calc: Callable[[], Calculator], n_images: int, fmax: float
) -> float:
    """Climbing-image NEB barrier (eV) from relaxed end states, with calculators from
    ``make_calc()``."""
    ends = []
    for atoms in (initial, final):
        atoms = atoms.copy()
        atoms.calc = make_calc()
        with threadpool_limits(1, user_api="blas"):  # see README, "Calculators"
            BFGS(atoms, logfile=None).run(fmax=fmax, steps=200)
        ends.append(atoms)
    images = [ends[0]] + [ends[0].copy() for _ in range(n_images)] + [ends[1]]
    for image in images[1:-1]:
        image.calc = make_calc()
    band = NEB(images, climb=True, method="improvedtangent")
    band.interpolate()
    FIRE(band, logfile=None).run(fmax=fmax, steps=300)
    energies = [image.get_potential_energy() for image in images]
    return max(energies) - energies[0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=" ".join(__doc__.split("\n\n")[0].split()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="spinconv-ec", help="checkpoint name or path")
    parser.add_argument("--images", type=int, default=5, help="intermediate images")
    parser.add_argument("--fmax", type=float, default=0.05, help="eV/Å")
    args = parser.parse_args()

    initial, final = end_states()
    potential = load_calculator(args.model, device="cpu").potential
    model = barrier(initial, final, lambda: load_calculator(potential), args.images, args.fmax)
    reference = barrier(initial, final, EMT, args.images, args.fmax)
    print(f"O hopping hollow -> hollow on Cu(100), {args.images} intermediate images")
    print(f"barrier, forcecalc ({args.model}): {model:.3f} eV")
    print(f"barrier, EMT:                    {reference:.3f} eV")
    print(f"difference: {model - reference:+.3f} eV")


if __name__ == "__main__":
    main()
