"""Close-contact frames: OC20-EMT frames with one adsorbate atom pushed toward a neighbour.

    python benchmarks/contact_frames.py scratch/medium/train.h5 \
        --out scratch/medium/contacts.h5 --frames 20000 --seed 0

OC20-EMT's frames (relaxation, rattled, MD) rarely bring two atoms much closer than a bond, so
a model trained on them alone need not learn how steeply the energy rises there: the
session-5 ForceNet squeezed an adsorbed CO to 0.30 Å under BFGS. Each frame written here
starts from a seeded, random frame of the input file that holds an adsorbate; one adsorbate
atom (tag 2) is moved toward one of its three nearest atoms (minimum image) to between
``--min-ratio`` and ``--max-ratio`` of their distance (and not below ``--min-distance``);
two adsorbate atoms both move, half each. Then every free atom is displaced by N(0, 0.03 Å),
which can bring a pair below ``--min-distance``; a frame where two atoms end closer than
``--closest`` (0.5 Å; the moved atom passed a third) is drawn again. EMT labels the frame,
referenced like the input (``E_EMT - e_slab - e_ref`` of its system). Before that, EMT's
energy of the untouched source frame is checked against the stored label, so the two files
share one energy reference. Frames are stored with kind 3 ("contact"), their system's row and
the source frame's index as ``step``; systems rows are copied from the input, less its frame
pointers (``initial_frame``, ``relaxed_frame``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from ase import Atoms
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from forcecalc.data.oc20emt import FRAME_KINDS
from forcecalc.data.store import RESERVED_ATTRS, DatasetWriter, FrameBatch, open_dataset

#: EMT's energy of a stored frame may differ from its label by rounding only.
REFERENCE_TOLERANCE = 1e-6  # eV
#: Frame kind code of the frames written here (after OC20-EMT's relax, rattled, md).
CONTACT_KIND = len(FRAME_KINDS)
NEAREST = 3


def compressed(
    atoms: Atoms, rng: np.random.Generator, ratios: tuple[float, float], min_distance: float
) -> Atoms:
    """A copy of ``atoms`` with one adsorbate atom pushed toward one of its nearest atoms and
    every free atom displaced by N(0, 0.03 Å)."""
    tags = atoms.get_tags()
    adsorbate = np.flatnonzero(tags == 2)
    i = int(rng.choice(adsorbate))
    others = np.delete(np.arange(len(atoms)), i)
    vectors = atoms.get_distances(i, others, mic=True, vector=True)
    distances = np.linalg.norm(vectors, axis=1)
    nearest = np.argsort(distances, kind="stable")[:NEAREST]
    k = int(rng.choice(nearest))
    j, d0, unit = int(others[k]), float(distances[k]), vectors[k] / distances[k]
    target = max(d0 * rng.uniform(*ratios), min(min_distance, d0))
    out = atoms.copy()
    shift = (d0 - target) * unit  # moves i toward j
    positions = out.positions
    if tags[j] == 2:
        positions[i] += shift / 2
        positions[j] -= shift / 2
    else:
        positions[i] += shift
    free = np.ones(len(out), dtype=bool)
    for constraint in out.constraints:
        free[constraint.get_indices()] = False
    positions[free] += rng.normal(0.0, 0.03, size=(int(free.sum()), 3))
    out.positions = positions
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="an OC20-EMT split file (e.g. scratch/medium/train.h5)")
    parser.add_argument("--out", required=True, help="HDF5 file to write")
    parser.add_argument("--frames", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-ratio", type=float, default=0.55)
    parser.add_argument("--max-ratio", type=float, default=0.9)
    parser.add_argument("--min-distance", type=float, default=0.65, help="Å")
    parser.add_argument(
        "--closest",
        type=float,
        default=0.5,
        help="Å: a frame with two atoms closer is drawn again (forcecalc warns below 0.4)",
    )
    args = parser.parse_args()

    source = open_dataset(args.data)
    systems = source.systems
    adsorbate_atoms = np.add.reduceat(source.atom_array("tags") == 2, source.offsets[:-1])
    candidates = np.flatnonzero(adsorbate_atoms > 0)
    rng = np.random.default_rng(args.seed)
    chosen = np.sort(rng.choice(candidates, size=args.frames, replace=False))
    start = time.perf_counter()
    frames, rows, steps, gaps = [], [], [], []
    redrawn = 0
    for f in chosen:
        atoms = source[int(f)]
        row = int(source.frames["system"][f])
        reference = float(systems["e_slab"][row] + systems["e_ref"][row])
        atoms.calc = EMT()
        gap = abs(atoms.get_potential_energy() - reference - source.frames["energy"][f])
        gaps.append(gap)
        if gap > REFERENCE_TOLERANCE:
            raise SystemExit(f"frame {f}: EMT differs from the stored label by {gap:.2e} eV")
        while True:  # redraw where the moved atom passed close to a third one
            moved = compressed(atoms, rng, (args.min_ratio, args.max_ratio), args.min_distance)
            distances = moved.get_all_distances(mic=True)
            if distances[np.triu_indices(len(moved), 1)].min() >= args.closest:
                break
            redrawn += 1
        moved.info = {}
        moved.calc = EMT()
        energy = moved.get_potential_energy() - reference
        forces = moved.get_forces(apply_constraint=False)
        moved.calc = SinglePointCalculator(moved, energy=energy, forces=forces)
        frames.append(moved)
        rows.append(row)
        steps.append(int(f))
    batch = FrameBatch.from_atoms(
        frames, system=rows, step=steps, kind=[CONTACT_KIND] * len(frames)
    )
    attrs = {key: value for key, value in source.attrs.items() if key not in RESERVED_ATTRS}
    attrs["frame_kinds"] = [*FRAME_KINDS, "contact"]
    attrs["contact_frames"] = {
        "source": str(args.data),
        "seed": args.seed,
        "ratios": [args.min_ratio, args.max_ratio],
        "min_distance": args.min_distance,
        "closest": args.closest,
    }
    # frame pointers into the input would point at the wrong frames here
    kept = {k: v for k, v in systems.items() if k not in ("initial_frame", "relaxed_frame")}
    with DatasetWriter(args.out, attrs) as writer:
        writer.append(batch, kept)
    forces = np.linalg.norm(batch.forces, axis=1)
    print(
        f"{len(frames)} frames from {len(np.unique(rows))} systems in "
        f"{time.perf_counter() - start:.0f} s ({redrawn} drawn again) -> {args.out}; "
        f"label check: max gap "
        f"{max(gaps):.1e} eV; |F| median {np.median(forces):.2f}, max {forces.max():.1f} eV/Å; "
        f"energy median {np.median(batch.energy):.2f}, max {batch.energy.max():.1f} eV"
    )


if __name__ == "__main__":
    main()
