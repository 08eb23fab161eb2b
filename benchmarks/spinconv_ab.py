"""A/B of two versions of ``forcecalc/models/spinconv.py`` in one process: the same weights,
the same batches, forwards alternating between the two (so that a busy or warming machine
favours neither), and their largest force difference.

For a change whose effect depends on the device (e.g. fewer bytes moved, more FLOPs), to be
measured where it matters before it goes to main:

    git show <commit>:forcecalc/models/spinconv.py > scratch/b.py
    python benchmarks/spinconv_ab.py forcecalc/models/spinconv.py scratch/b.py \\
        --device cuda --batch 1 64 256 --repeats 10 --out DIR/spinconv_ab.json

With ``--triton PRECISION`` both run SpinConv's fused Triton kernels (every block that has
them, as ``with_triton_kernels`` sets them; the kernels are the package's, shared by A and B).

Prints a table (median ms per forward and atoms/s of each, B's speed-up) and writes JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from kernel_profile import synchronize
from speed import CONFIGS, available_devices, hardware, structure

from forcecalc.atomic import write_json
from forcecalc.graph import Batch


def load_module(path: str, name: str) -> ModuleType:
    """The module at ``path`` under ``name`` (a second copy of spinconv.py beside the package's)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compare(models: dict[str, torch.nn.Module], batch: Batch, repeats: int, device: str) -> dict:
    """Median seconds per forward of each model, alternating, and their force difference."""
    with torch.no_grad():
        forces = {label: model(batch)["forces"] for label, model in models.items()}
        times: dict[str, list[float]] = {label: [] for label in models}
        labels = list(models)
        for repeat in range(repeats):
            for label in labels if repeat % 2 == 0 else labels[::-1]:
                synchronize(device)
                start = time.perf_counter()
                models[label](batch)
                synchronize(device)
                times[label].append(time.perf_counter() - start)
    difference = float((forces["A"] - forces["B"]).abs().max())
    scale = float(forces["A"].abs().max())
    return {
        "seconds": {label: float(np.median(values)) for label, values in times.items()},
        "max_force_difference": difference,
        "max_force": scale,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("a", help="version A of spinconv.py")
    parser.add_argument("b", help="version B of spinconv.py")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--atoms", type=int, default=66, help="atoms per structure (38, 66, 146)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--triton", default=None, help="tl.dot precision of the fused Triton kernels (CUDA)"
    )
    parser.add_argument("--out", default="benchmarks/results/spinconv_ab.json")
    args = parser.parse_args()
    available_devices(parser, [args.device])
    if args.threads:
        torch.set_num_threads(args.threads)
    kind, kwargs = CONFIGS["spinconv_all"]
    if kind != "spinconv":
        raise ValueError("the A/B compares SpinConv versions")
    torch.manual_seed(0)
    modules = {"A": load_module(args.a, "spinconv_a"), "B": load_module(args.b, "spinconv_b")}
    models = {label: module.SpinConv(**kwargs).eval() for label, module in modules.items()}
    models["B"].load_state_dict(models["A"].state_dict())
    models = {label: model.to(args.device) for label, model in models.items()}
    if args.triton:
        for block in (m for model in models.values() for m in model.modules()):
            if hasattr(block, "triton_precision"):
                block.triton_precision = args.triton
    rows = []
    print(f"{'batch':>6}{'atoms':>8}{'A ms':>10}{'B ms':>10}{'B/A speed':>11}{'max |dF|':>11}")
    for batch_size in args.batch:
        atoms = [structure(args.atoms, seed) for seed in range(batch_size)]
        batch = Batch.from_atoms(atoms, cutoff=models["A"].cutoff).to(args.device, torch.float32)
        result = compare(models, batch, args.repeats, args.device)
        seconds = result["seconds"]
        row = {
            "batch": batch_size,
            "atoms": batch.n_atoms,
            "ms": {label: 1000 * value for label, value in seconds.items()},
            "atoms_per_second": {label: batch.n_atoms / value for label, value in seconds.items()},
            "speedup_b_over_a": seconds["A"] / seconds["B"],
            "max_force_difference": result["max_force_difference"],
            "max_force": result["max_force"],
        }
        rows.append(row)
        print(
            f"{batch_size:>6}{batch.n_atoms:>8}{row['ms']['A']:>10.2f}{row['ms']['B']:>10.2f}"
            f"{row['speedup_b_over_a']:>10.3f}x{row['max_force_difference']:>11.2e}"
        )
    write_json(
        args.out,
        {
            "benchmark": "spinconv_ab",
            "a": str(Path(args.a)),
            "b": str(Path(args.b)),
            "device": args.device,
            "triton": args.triton,
            "hardware": hardware(False),
            "rows": rows,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
