"""Parity plots of a shipped model on an OC20-EMT split: energies and force components.

    python benchmarks/parity_plot.py NAME scratch/small/test_id.h5 [--max-frames 400] [--out F]
writes benchmarks/results/NAME-parity.png, or F (atomically); the shipped figure is made with
``--out weights/NAME-parity.png``. Free atoms only, as the metrics.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from forcecalc import load_checkpoint, predict
from forcecalc.atomic import atomic_output
from forcecalc.data import open_dataset
from forcecalc.evaluate import sample_frames
from forcecalc.graph.batch import fixed_mask

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name")
    parser.add_argument("data")
    parser.add_argument("--max-frames", type=int, default=400)
    parser.add_argument("--out", type=Path, default=None, help="the PNG (see above)")
    args = parser.parse_args()

    dataset = open_dataset(args.data)
    frames = [dataset[int(i)] for i in sample_frames(len(dataset), args.max_frames)]
    results = predict(frames, load_checkpoint(args.name, device="cpu"), batch_size=16)
    free = [~fixed_mask(a) for a in frames]
    f_true = np.concatenate(
        [a.get_forces(apply_constraint=False)[m] for a, m in zip(frames, free, strict=True)]
    )
    f_pred = np.concatenate([r["forces"][m] for r, m in zip(results, free, strict=True)])
    e_true = np.array([a.get_potential_energy() for a in frames])
    e_pred = np.array([r["energy"] for r in results])

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 4.2))
    for axis, true, pred, label in (
        (left, e_true, e_pred, "energy (eV)"),
        (right, f_true.ravel(), f_pred.ravel(), "force component (eV/Å)"),
    ):
        low, high = np.percentile(np.concatenate([true, pred]), [0.5, 99.5])
        axis.scatter(true, pred, s=2, alpha=0.3)
        axis.plot([low, high], [low, high], color="gray", linewidth=1)
        axis.set_xlim(low, high)
        axis.set_ylim(low, high)
        axis.set_xlabel(f"EMT {label}")
        axis.set_ylabel(f"{args.name} {label}")
        mae = np.abs(true - pred).mean()
        axis.set_title(f"MAE {mae:.3f}")
    figure.suptitle(f"{args.name} on OC20-EMT {Path(args.data).stem} ({len(frames)} frames)")
    figure.tight_layout()
    target = args.out or RESULTS / f"{args.name}-parity.png"
    with atomic_output(target, suffix=".png") as tmp:
        figure.savefig(tmp, dpi=100)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
