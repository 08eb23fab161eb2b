"""Time of one ASE step (``atoms.get_forces()`` after a small move) with each shipped model.

A rattled Cu(111) + CO slab (38 atoms by default, see ``speed.py``), the calculator's defaults
(float32, CPU), median of several steps after a warm-up.  Prints a table and writes JSON::

    python benchmarks/shipped_step.py --threads 1 --out benchmarks/results/shipped_step.json
"""

from __future__ import annotations

import argparse
import platform

import torch
from speed import SIZES, ase_step_seconds, structure

from forcecalc import load_calculator
from forcecalc.atomic import write_json
from forcecalc.hub import shipped_checkpoints


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--atoms", type=int, default=38, choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/shipped_step.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for name in sorted(shipped_checkpoints()):
        atoms = structure(args.atoms, 0)
        atoms.calc = load_calculator(name, device="cpu")
        ms = 1000 * ase_step_seconds(atoms, args.steps)
        rows.append({"model": name, "atoms": args.atoms, "ms_per_step": ms})
        print(f"{name:<14}{args.atoms:>4} atoms {ms:8.1f} ms per ASE step ({args.threads} thread)")
    hardware = {"cpu": platform.processor() or platform.machine(), "threads": args.threads}
    write_json(args.out, {"benchmark": "shipped ASE step", "hardware": hardware, "rows": rows})


if __name__ == "__main__":
    main()
