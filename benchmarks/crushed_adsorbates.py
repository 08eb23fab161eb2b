"""Do relaxations crush adsorbates? Batched relaxations of OC20-EMT test systems, judged by EMT.

    python benchmarks/crushed_adsorbates.py scratch/medium [--models forcenet ...] [--systems 40]

Relaxes the stored initial structures of the first ``--systems`` systems of test_id and
test_ood_ads with :func:`forcecalc.relax` (LBFGS, fmax 0.05 eV/Å, at most 300 steps, float32,
as ``forcecalc eval is2rs``) and counts, per model: the end points where an adsorbate atom
(tag 2) is closer than 0.8 Å to another atom (a crushed bond; bonds are >= 0.96 Å), and those
where EMT's largest force on a free atom exceeds 1 eV/Å (a structure EMT rejects), with the
median of that force. Writes ``benchmarks/results/crushed_adsorbates.json`` (``--out``), one
entry per model: those of models not run this time are kept from an existing file of the same
splits and ``--systems``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.emt import EMT

from forcecalc import relax
from forcecalc.atomic import write_json
from forcecalc.data.store import open_dataset

RESULTS = Path(__file__).resolve().parent / "results" / "crushed_adsorbates.json"
SPLITS = ("test_id", "test_ood_ads")
CRUSHED = 0.8  # Å
REJECTED = 1.0  # eV/Å


def closest_to_adsorbate(atoms: Atoms) -> float:
    """The shortest distance (Å, minimum image) from an adsorbate atom to any other atom."""
    adsorbate = np.flatnonzero(atoms.get_tags() == 2)
    distances = atoms.get_all_distances(mic=True)[adsorbate]
    distances[np.arange(len(adsorbate)), adsorbate] = np.inf
    return float(distances.min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="an OC20-EMT folder (e.g. scratch/medium)")
    parser.add_argument("--models", nargs="+", default=["forcenet", "spinconv-fc"])
    parser.add_argument("--systems", type=int, default=40, help="per split")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # close contacts are what is counted here
    structures, labels = [], []
    for split in SPLITS:
        dataset = open_dataset(args.data / f"{split}.h5")
        for system in range(args.systems):
            structures.append(dataset.initial(system))
            labels.append(f"{split} {system} {dataset.systems['adsorbate'][system]}")
    report: dict[str, object] = {"splits": list(SPLITS), "systems_per_split": args.systems}
    if args.out.is_file():
        earlier = json.loads(args.out.read_text())
        if all(earlier.get(key) == value for key, value in report.items()):
            report = earlier
    print(f"{len(structures)} systems; model: crushed (< {CRUSHED} Å), EMT fmax > {REJECTED} eV/Å")
    for model in args.models:
        start = time.perf_counter()
        relaxed = relax(structures, model, optimizer="lbfgs", fmax=0.05, steps=300)
        crushed, emt_fmax = [], []
        for label, atoms in zip(labels, relaxed, strict=True):
            closest = closest_to_adsorbate(atoms)
            if closest < CRUSHED:
                crushed.append(f"{label} {closest:.2f} Å")
            atoms.calc = EMT()
            emt_fmax.append(float(np.linalg.norm(atoms.get_forces(), axis=1).max()))
        fmax = np.asarray(emt_fmax)
        report[model] = {
            "crushed": crushed,
            "emt_fmax_above_1": int((fmax > REJECTED).sum()),
            "emt_fmax_median": float(np.median(fmax)),
            "emt_fmax_max": float(fmax.max()),
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(
            f"{model}: crushed {len(crushed)} {crushed}; EMT fmax > {REJECTED}: "
            f"{(fmax > REJECTED).sum()}, median {np.median(fmax):.2f}, max {fmax.max():.1f} eV/Å"
        )
    write_json(args.out, report)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
