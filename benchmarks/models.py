"""Forward time of the SpinConv-All and ForceNet (hidden 512, 5 layers) configurations.

Prints a table and writes JSON: milliseconds per structure at batch 1 and batch N for OC20-size
structures (a Cu(111)-style slab with an adsorbate, ~80 atoms by default), float32, forces
without autograd (both configurations predict forces directly), on the CPU and on CUDA when
available. The original's figures (OCP code, same architectures) are in
shared/fixtures/ocp/README.md: SpinConv-All 535 ms (38 atoms) / 828 ms (66 atoms) per forward on
a 2-core CPU; 45 ms at batch 1 and 8.4k atoms/s batched on an H100; ForceNet 13 ms / 15k atoms/s.

    python benchmarks/models.py --out benchmarks/results/models.json [--batch 32 --repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from ase import Atoms
from ase.build import add_adsorbate, fcc111, molecule

from forcecalc.atomic import write_json
from forcecalc.graph import Batch
from forcecalc.models.registry import build_model

CONFIGS = {
    "spinconv_all": (
        "spinconv",
        {
            "hidden_channels": 32,
            "mid_hidden_channels": 256,
            "num_interactions": 3,
            "num_basis_functions": 512,
            "sphere_size_lat": 16,
            "sphere_size_long": 12,
            "max_num_neighbors": 40,
            "cutoff": 6.0,
            "force_estimator": "random",
            "num_rand_rotations": 5,
            "scale_distances": True,
            "basis_width_scalar": 3.0,
        },
    ),
    "forcenet_all": (
        "forcenet",
        {
            "hidden_channels": 512,
            "decoder_hidden_channels": 512,
            "num_interactions": 5,
            "cutoff": 6.0,
            "basis": "sphallmul",
            "feat": "full",
            "max_n": 3,
        },
    ),
}


def structure(n_layers: int, seed: int) -> Atoms:
    """A rattled 4x4 Cu(111) slab with CO: 16 * n_layers + 2 atoms, OC20 conventions."""
    slab = fcc111("Cu", size=(4, 4, n_layers), vacuum=7.5)
    slab.pbc = True
    co = molecule("CO")
    co.rotate(180, "x")
    add_adsorbate(slab, co, 1.8, "fcc", mol_index=1)
    slab.rattle(0.05, seed=seed)
    return slab


def time_forward(model: torch.nn.Module, batch: Batch, repeats: int) -> float:
    """Median seconds of one forward pass (after one warm-up)."""
    times = []
    for _ in range(repeats + 1):
        if batch.positions.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model(batch)
        if batch.positions.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=5, help="slab layers (16 atoms each)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", default="benchmarks/results/models.json")
    args = parser.parse_args()

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    print(f"{'model':<14}{'device':<8}{'atoms':>7}{'batch':>7}{'ms/structure':>14}{'atoms/s':>10}")
    for name in args.models:
        kind, kwargs = CONFIGS[name]
        torch.manual_seed(0)
        model = build_model(kind, kwargs).eval()
        for device in devices:
            model = model.to(device=device, dtype=torch.float32)
            for batch_size in (1, args.batch):
                atoms = [structure(args.layers, seed) for seed in range(batch_size)]
                batch = Batch.from_atoms(atoms, cutoff=model.cutoff).to(device, torch.float32)
                seconds = time_forward(model, batch, args.repeats)
                n_atoms = batch.n_atoms
                row = {
                    "model": name,
                    "device": device,
                    "atoms_per_structure": len(atoms[0]),
                    "batch": batch_size,
                    "ms_per_structure": 1000 * seconds / batch_size,
                    "atoms_per_second": n_atoms / seconds,
                }
                rows.append(row)
                print(
                    f"{name:<14}{device:<8}{len(atoms[0]):>7}{batch_size:>7}"
                    f"{row['ms_per_structure']:>14.1f}{row['atoms_per_second']:>10.0f}"
                )
    hardware = {
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }
    write_json(args.out, {"benchmark": "model forward", "hardware": hardware, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
