"""Plot a relaxation: energy and largest force against the optimizer step, saved as a PNG.

Run:  python examples/plot_relaxation.py [--model spinconv-fc] [--out relaxation.png]
(needs matplotlib: pip install "forcecalc[plot]")
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from ase.optimize import BFGS
from relax_co_cu111 import co_on_cu111
from threadpoolctl import threadpool_limits

from forcecalc import load_calculator
from forcecalc.atomic import atomic_output


def main() -> None:
    parser = argparse.ArgumentParser(
        description=" ".join(__doc__.split("\n\n")[0].split()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="spinconv-fc", help="checkpoint name or path")
    parser.add_argument("--fmax", type=float, default=0.05, help="eV/Å")
    parser.add_argument("--out", default="relaxation.png")
    args = parser.parse_args()

    _, atoms = co_on_cu111()
    atoms.calc = load_calculator(args.model, device="cpu")
    energies, fmaxes = [], []

    def record() -> None:
        energies.append(atoms.get_potential_energy())
        fmaxes.append(np.linalg.norm(atoms.get_forces(), axis=1).max())

    optimizer = BFGS(atoms, logfile=None)
    optimizer.attach(record, interval=1)
    with threadpool_limits(1, user_api="blas"):  # see README, "Calculators"
        optimizer.run(fmax=args.fmax, steps=300)

    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(5, 5))
    top.plot(energies, marker="o", markersize=3)
    top.set_ylabel("energy (eV)")
    top.set_title(f"CO on Cu(111), BFGS, {args.model}")
    bottom.semilogy(fmaxes, marker="o", markersize=3)
    bottom.axhline(args.fmax, color="gray", linestyle="--", label=f"fmax = {args.fmax}")
    bottom.set_xlabel("optimizer step")
    bottom.set_ylabel("max force (eV/Å)")
    bottom.legend()
    figure.tight_layout()
    with atomic_output(args.out, suffix=".png") as tmp:
        figure.savefig(tmp, dpi=120)
    print(
        f"{optimizer.nsteps} optimizer steps ({len(energies)} points with the start); "
        f"final energy {energies[-1]:.3f} eV; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
