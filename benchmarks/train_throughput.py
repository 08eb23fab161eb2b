"""Training throughput (frames per second) of ForceNet and SpinConv, CPU and GPU.

One training step is what :meth:`forcecalc.train.Trainer.train_step` does: rotation
augmentation, forward, the L1 energy + force loss, backward (double backward for the
energy-centric SpinConv), gradient clipping, an Adam (amsgrad) update.  Batches are collated
beforehand (graph building runs in data-loader workers during training); its own rate,
"collate frames/s" (one CPU process), is reported separately.

Frames: rattled Cu(111) 3x3x4 slabs with a CO adsorbate (38 atoms, an OC20-sized system),
labelled by EMT, pbc on all axes with vacuum, bottom two layers fixed.

Models (``--preset``): ``paper`` uses the published sizes (ForceNet: 5 interactions, width
512; SpinConv: the S2EF-All hyperparameters, energy-centric with a 12x8 sphere as in the
paper); ``small`` the fixture sizes (ForceNet width 64, 2 interactions; SpinConv hidden 16,
mid 32, 2 interactions, 8x8 sphere), for a quick CPU run; ``shipped`` the shipped weights'
architectures (``benchmarks/configs/*.yaml``).

Prints a table and writes JSON (atomically: a temporary file, then a rename)::

    python benchmarks/train_throughput.py --preset small --batch-sizes 8 16 --devices cpu
    python benchmarks/train_throughput.py --out benchmarks/results/train_throughput.json
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from forcecalc.atomic import write_json
from forcecalc.train import Collater, TrainConfig, Trainer

PRESETS: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {
    "small": {
        "forcenet": ("forcenet", {"hidden_channels": 64, "decoder_hidden_channels": 64,
                                  "num_interactions": 2}),
        "spinconv-fc": ("spinconv", {"hidden_channels": 16, "mid_hidden_channels": 32,
                                     "num_interactions": 2, "num_basis_functions": 64,
                                     "sphere_size_lat": 8, "sphere_size_long": 8,
                                     "max_num_neighbors": 20, "cutoff": 6.0,
                                     "force_estimator": "random", "num_rand_rotations": 3,
                                     "basis_width_scalar": 3.0}),
        "spinconv-ec": ("spinconv", {"hidden_channels": 16, "mid_hidden_channels": 32,
                                     "num_interactions": 2, "num_basis_functions": 64,
                                     "sphere_size_lat": 8, "sphere_size_long": 8,
                                     "max_num_neighbors": 20, "cutoff": 6.0,
                                     "force_estimator": "grad", "basis_width_scalar": 3.0}),
    },
    "paper": {
        "forcenet": ("forcenet", {"hidden_channels": 512, "decoder_hidden_channels": 512,
                                  "num_interactions": 5}),
        "spinconv-fc": ("spinconv", {"hidden_channels": 32, "mid_hidden_channels": 256,
                                     "num_interactions": 3, "num_basis_functions": 512,
                                     "sphere_size_lat": 16, "sphere_size_long": 12,
                                     "max_num_neighbors": 40, "cutoff": 6.0,
                                     "force_estimator": "random", "num_rand_rotations": 5,
                                     "basis_width_scalar": 3.0}),
        "spinconv-ec": ("spinconv", {"hidden_channels": 32, "mid_hidden_channels": 256,
                                     "num_interactions": 3, "num_basis_functions": 512,
                                     "sphere_size_lat": 12, "sphere_size_long": 8,
                                     "max_num_neighbors": 40, "cutoff": 6.0,
                                     "force_estimator": "grad", "basis_width_scalar": 3.0}),
    },
}  # fmt: skip
CONFIG_DIR = Path(__file__).parent / "configs"


def shipped_preset() -> dict[str, tuple[str, dict[str, Any]]]:
    """The shipped weights' architectures, from ``benchmarks/configs/<name>.yaml``."""
    import yaml

    preset = {}
    for name in ("forcenet", "spinconv-fc", "spinconv-ec"):
        config = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
        preset[name] = (config["model"], config["model_kwargs"])
    return preset


PRESETS["shipped"] = shipped_preset()


def slab_frames(n: int, seed: int = 0) -> list:
    """``n`` rattled Cu(111) 3x3x4 + CO slabs labelled by EMT (38 atoms each)."""
    from ase.build import add_adsorbate, fcc111, molecule
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.constraints import FixAtoms

    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        slab = fcc111("Cu", (3, 3, 4), vacuum=8.0)
        add_adsorbate(slab, molecule("CO"), 1.9, "ontop")
        slab.info.pop("adsorbate_info", None)
        slab.pbc = True
        slab.set_constraint(FixAtoms(indices=[a.index for a in slab if a.tag >= 3]))
        slab.positions += rng.normal(0.0, 0.05, slab.positions.shape)
        slab.calc = EMT()
        energy, forces = slab.get_potential_energy(), slab.get_forces(apply_constraint=False)
        slab.calc = SinglePointCalculator(slab, energy=energy, forces=forces)
        frames.append(slab)
    return frames


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(
    model: str,
    kwargs: dict[str, Any],
    frames: list,
    batch_size: int,
    device: str,
    amp: bool,
    steps: int,
    warmup: int,
) -> dict[str, float]:
    """Training and collate rates of one configuration (frames per second)."""
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            model=model,
            model_kwargs=kwargs,
            out=out,
            device=device,
            batch_size=batch_size,
            val_fraction=0.0,
            progress=False,
            amp=amp,
            normalizer_frames=32,
        )
        trainer = Trainer(config, frames, [])
        collate = Collater(trainer.potential.cutoff)
        items = [(i, frames[i % len(frames)]) for i in range(batch_size)]
        start = time.perf_counter()
        batches = [collate(items) for _ in range(3)]
        collate_rate = 3 * batch_size / (time.perf_counter() - start)
        for k in range(warmup):
            trainer.train_step(batches[k % 3])
        _sync(device)
        start = time.perf_counter()
        for k in range(steps):
            trainer.train_step(batches[k % 3])
        _sync(device)
        elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    return {
        "train_frames_per_s": steps * batch_size / elapsed,
        "ms_per_step": 1e3 * elapsed / steps,
        "collate_frames_per_s": collate_rate,
        "peak_gib": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    parser.add_argument("--models", nargs="+", default=["forcenet", "spinconv-fc", "spinconv-ec"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 16, 32, 64])
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu and cuda")
    parser.add_argument("--amp", action="store_true", help="also bf16 autocast rows (CUDA)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads")
    parser.add_argument("--out", default="benchmarks/results/train_throughput.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    frames = slab_frames(64)
    rows = []
    header = (
        f"{'model':<12} {'device':<6} {'amp':<4} {'batch':>5} {'frames/s':>9} "
        f"{'ms/step':>9} {'collate/s':>10} {'peak GiB':>9}"
    )
    print(f"preset {args.preset}, 38-atom slabs, torch {torch.__version__}")
    print(header)
    for name in args.models:
        model, kwargs = PRESETS[args.preset][name]
        for device in devices:
            for amp in [False, True] if (args.amp and device.startswith("cuda")) else [False]:
                for batch_size in args.batch_sizes:
                    try:
                        result = measure(
                            model, kwargs, frames, batch_size, device, amp, args.steps, args.warmup
                        )
                    except torch.OutOfMemoryError:
                        print(f"{name:<12} {device:<6} {amp!s:<4} {batch_size:>5}   out of memory")
                        torch.cuda.empty_cache()
                        continue
                    row = {"model": name, "device": device, "amp": amp, "batch_size": batch_size}
                    rows.append({**row, **result})
                    peak = "-" if result["peak_gib"] is None else f"{result['peak_gib']:.2f}"
                    print(
                        f"{name:<12} {device:<6} {amp!s:<4} {batch_size:>5} "
                        f"{result['train_frames_per_s']:>9.1f} {result['ms_per_step']:>9.1f} "
                        f"{result['collate_frames_per_s']:>10.1f} {peak:>9}",
                        flush=True,
                    )
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    write_json(
        Path(args.out),
        {
            "benchmark": "train_throughput",
            "preset": args.preset,
            "atoms_per_frame": 38,
            "date": datetime.now(timezone.utc).isoformat(),
            "torch": str(torch.__version__),
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_threads": torch.get_num_threads(),
            "load_average_1min": os.getloadavg()[0],
            "gpu": gpu,
            "rows": rows,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
