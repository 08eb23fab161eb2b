"""Does ``batch_size="auto"`` stay inside the device's memory on a worst-case mixed set?

fairchem #795: a batch of OC20 structures whose small cells expand into many periodic images
took 50 GB.  Here the batched relaxation engine (``forcecalc.relax``, ``batch_size="auto"``)
gets a shuffled mix of

* OC20-style adsorbate + slab systems (``--data``, e.g. ``forcecalc data is2rs``, or built),
* tiny and skewed cells that need many images (one-atom fcc and simple cubic cells, a
  two-atom cell with 25-degree angles, a one-atom cell with one 1.6 Å vector),
* large ones (a 10 x 10 x 4 Pt(111) slab with CO, 6 x 6 x 6 cubic Cu bulk: 864 atoms),

and relaxes them for a few steps.  Every forward pass is recorded (atoms, edges, whether it
failed).  Reported: the device's memory, the engine's budget and memory model, the largest
batch it chose, the predicted and the measured peak (CUDA), out-of-memory errors, and whether
every structure came back.  With ``--squeeze F`` the process may use only the fraction ``F`` of
the device's memory (``torch.cuda.set_per_process_memory_fraction``) while the engine's
budget still counts the whole free memory: real out-of-memory errors, which the engine must
survive by splitting batches without losing a structure.

    python benchmarks/auto_batch_memory.py --device cuda --model spinconv-fc \\
        --data is2rs_large.extxyz --n 300 --out benchmarks/results/auto_batch_memory_cuda.json
    python benchmarks/auto_batch_memory.py --device cuda --squeeze 0.02 ...
    python benchmarks/auto_batch_memory.py --device cpu --n 20 --steps 2   # the CPU path
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from ase import Atoms
from ase.build import add_adsorbate, bulk, fcc111, molecule
from torch import nn

from forcecalc.atomic import write_json


def hard_cells() -> list[Atoms]:
    """Small or skewed periodic cells (each needs many images within a 6 Å cutoff) and large
    systems, named in ``info["name"]``."""
    skewed = Atoms(
        "Cu2",
        cell=[[2.6, 0.0, 0.0], [2.36, 1.1, 0.0], [2.36, 0.49, 0.98]],
        scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5]],
        pbc=True,
    )
    needle = Atoms("Pt", cell=[[1.6, 0.0, 0.0], [0.0, 6.0, 0.0], [0.0, 0.0, 6.0]], pbc=True)
    slab = fcc111("Pt", size=(10, 10, 4), vacuum=7.0)
    slab.pbc = True
    co = molecule("CO")
    co.rotate(180, "x")
    add_adsorbate(slab, co, 1.9, "ontop")
    cells = {
        "fcc_Pt_primitive": bulk("Pt", "fcc", a=3.92),
        "sc_Cu_1atom": bulk("Cu", "sc", a=2.4),
        "skewed_Cu2": skewed,
        "needle_Pt": needle,
        "Pt111_10x10x4_CO": slab,
        "Cu_bulk_864": bulk("Cu", "fcc", a=3.61, cubic=True).repeat(6),
    }
    out = []
    for name, atoms in cells.items():
        atoms.info["name"] = name
        out.append(atoms)
    return out


def slabs(n: int, seed: int) -> list[Atoms]:
    """``n`` OC20-style slabs built as in ``relax_speed.py``."""
    import relax_speed

    return relax_speed.build_structures(n, seed)


def record_calls(potential: nn.Module) -> list[dict]:
    """A list that hooks on ``potential`` fill with every forward pass: atoms, edges,
    systems, and ``failed`` (it raised: out of memory) until it returns."""
    calls: list[dict] = []

    def before(_module: nn.Module, args: tuple) -> None:
        (batch,) = args
        calls.append(
            {
                "atoms": batch.n_atoms,
                "edges": batch.n_edges,
                "systems": batch.n_systems,
                "failed": True,
            }
        )

    def after(_module: nn.Module, _args: tuple, _out: object) -> None:
        calls[-1]["failed"] = False

    potential.register_forward_pre_hook(before)
    potential.register_forward_hook(after)
    return calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="spinconv-fc", help="checkpoint name or path")
    parser.add_argument("--data", default=None, help="OC20-style structures (extxyz)")
    parser.add_argument("--n", type=int, default=200, help="OC20-style structures in the mix")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per structure")
    parser.add_argument("--device", default=None)
    parser.add_argument("--squeeze", type=float, default=None, help="CUDA memory fraction")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/auto_batch_memory.json")
    args = parser.parse_args(argv)

    from forcecalc.checkpoint import load_checkpoint
    from forcecalc.relax import relax
    from forcecalc.relax.memory import cached_memory_model, memory_budget

    potential = load_checkpoint(args.model, device=args.device)
    device = potential.device
    if args.squeeze is not None and device.type != "cuda":
        parser.error(f"--squeeze limits CUDA memory, but the device is {device}")
    if args.data:
        import ase.io

        mix = ase.io.read(args.data, index=f":{args.n}")
    else:
        mix = slabs(args.n, args.seed)
    mix = mix + hard_cells()
    order = np.random.default_rng(args.seed).permutation(len(mix))
    mix = [mix[k] for k in order]
    calls = record_calls(potential)
    cuda = device.type == "cuda"
    total = torch.cuda.get_device_properties(device).total_memory if cuda else None
    if cuda:
        # The engine measures its memory model first; squeeze only after, so that the budget
        # (a fraction of the free memory) overestimates what this process may use.
        largest = sorted(mix, key=len)[-8:]  # the structures the engine measures on
        relax(largest, potential, steps=1, batch_size="auto")
        if args.squeeze:
            torch.cuda.set_per_process_memory_fraction(args.squeeze, device)
        torch.cuda.reset_peak_memory_stats(device)
    calls.clear()
    start = time.perf_counter()
    results = relax(mix, potential, optimizer="fire", steps=args.steps, batch_size="auto")
    seconds = time.perf_counter() - start
    model = cached_memory_model(potential, device)
    largest = max((c for c in calls if not c["failed"]), key=lambda c: c["atoms"])
    report = {
        "benchmark": "auto_batch_memory",
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "structures": len(mix),
        "returned": len(results),
        "lost": len(mix) - len(results),
        "atoms_range": [min(map(len, mix)), max(map(len, mix))],
        "seconds": seconds,
        "forward_calls": len(calls),
        "out_of_memory_errors": sum(c["failed"] for c in calls),
        "largest_batch": largest,
        "device_memory_bytes": total,
        "budget_bytes_now": memory_budget(device),
        "memory_model": None if model is None else vars(model),
        "predicted_peak_bytes": (
            None if model is None else model.cost(largest["atoms"], largest["edges"])
        ),
        "measured_peak_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
        "squeeze": args.squeeze,
        "calls": calls,
    }
    gib = 2.0**30
    print(
        f"{len(mix)} structures ({report['atoms_range'][0]}-{report['atoms_range'][1]} atoms), "
        f"{potential.name} on {report['device_name']}, {args.steps} FIRE steps, "
        f"batch_size='auto'{f', memory fraction {args.squeeze}' if args.squeeze else ''}"
    )
    print(
        f"returned {len(results)} of {len(mix)}; forward passes {report['forward_calls']}, "
        f"out-of-memory errors {report['out_of_memory_errors']}; largest batch "
        f"{largest['systems']} systems, {largest['atoms']} atoms, {largest['edges']} edges"
    )
    if cuda:
        predicted = report["predicted_peak_bytes"]
        print(
            f"device {total / gib:.1f} GiB; measured peak {report['measured_peak_bytes'] / gib:.2f}"
            f" GiB; predicted for the largest batch "
            f"{'-' if predicted is None else f'{predicted / gib:.2f}'} GiB"
        )
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0 if report["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
