"""Time of one ASE step (``atoms.get_forces()`` after a small move) with each shipped model.

A rattled Cu(111) + CO slab (38 atoms by default, see ``speed.py``), the calculator's defaults
(float32), median of several steps after a warm-up; on CUDA also with ``cuda_graph=True`` and
a 1 Å skin, without and with ``compile_mode="default"`` (the first step, with the capture and
the compilation, apart).  Prints a table and writes JSON::

    python benchmarks/shipped_step.py --threads 1 --out benchmarks/results/shipped_step.json
    python benchmarks/shipped_step.py --device cuda --atoms 66 --steps 30
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from speed import SIZES, ase_step_seconds, structure

from forcecalc import load_calculator
from forcecalc.atomic import write_json
from forcecalc.hub import shipped_checkpoints

#: Calculator options timed on CUDA beside the defaults.
CUDA_VARIANTS = [
    {"cuda_graph": True, "skin": 1.0},
    {"cuda_graph": True, "skin": 1.0, "compile_mode": "default"},
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--atoms", type=int, default=38, choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/shipped_step.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = [{}] + (CUDA_VARIANTS if torch.device(args.device).type == "cuda" else [])

    rows = []
    for name in sorted(shipped_checkpoints()):
        for options in variants:
            atoms = structure(args.atoms, 0)
            atoms.calc = load_calculator(name, device=args.device, **options)
            label = ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"
            start = time.perf_counter()
            try:
                atoms.get_forces()
            except RuntimeError as error:  # reported, and the other variants still run
                print(f"{name:<14} ({label}) failed: {str(error).splitlines()[0]}")
                rows.append({"model": name, "options": options, "error": str(error)})
                continue
            first = time.perf_counter() - start
            ms = 1000 * ase_step_seconds(atoms, args.steps)
            rows.append(
                {
                    "model": name,
                    "atoms": args.atoms,
                    "device": args.device,
                    "options": options,
                    "ms_per_step": ms,
                    "first_step_seconds": first,
                }
            )
            print(f"{name:<14}{args.atoms:>4} atoms {ms:8.1f} ms per ASE step  ({label})")
    hardware = {
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    write_json(args.out, {"benchmark": "shipped ASE step", "hardware": hardware, "rows": rows})


if __name__ == "__main__":
    main()
