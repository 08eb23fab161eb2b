"""Statistics and median baselines of a generated OC20-EMT data set (``forcecalc data oc20emt``).

For each split file in DIR: frames (by kind), systems, atoms, file size, composition (facets,
bulk kinds, adsorbates, anomalies, converged relaxations, relaxation steps), and the trivial
baselines computed with :mod:`forcecalc.metrics`:

* S2EF median baseline (OC20): the training median energy for every frame and the training
  per-component median force (free atoms) for every free atom; all frames of the split;
* IS2RE median baseline (OC20): the training median relaxed energy for every system;
* IS2RS initial-structure baseline (OC20 has no median one): the initial structure as the
  prediction; ADwT against the relaxed structure, AFbT from the EMT forces of the initial
  structure (the "ML-relaxed" structure here).

Prints markdown tables and writes them as JSON (atomically: temporary file + rename)::

    python benchmarks/oc20emt.py scratch/small --json scratch/small_stats.json
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from forcecalc import metrics
from forcecalc.atomic import write_json
from forcecalc.data import Dataset, open_dataset
from forcecalc.data.oc20emt import FRAME_KINDS, SPLITS


def split_stats(ds: Dataset) -> dict[str, Any]:
    """Size and composition of one split file."""
    sys_ = ds.systems
    kinds = Counter(FRAME_KINDS[k] for k in ds.frames["kind"])
    bulk_kind = Counter(
        "pure" if ":" not in b else ("random" if b.endswith("random") else "ordered")
        for b in sys_["bulk"]
    )
    anomaly = sys_["anomaly"]
    return {
        "frames": len(ds),
        "frames_by_kind": {k: kinds.get(k, 0) for k in FRAME_KINDS},
        "systems": ds.n_systems,
        "atoms": int(ds.offsets[-1]),
        "mean_atoms_per_frame": float(np.mean(ds.natoms)),
        "megabytes": ds.path.stat().st_size / 1e6,
        "facets": dict(sorted(Counter(sys_["facet"]).items())),
        "bulk_kinds": dict(sorted(bulk_kind.items())),
        "distinct_bulks": len(set(sys_["bulk"])),
        "distinct_adsorbates": len(set(sys_["adsorbate"])),
        "converged": float(np.mean(sys_["converged"])),
        "mean_relax_steps": float(np.mean(sys_["n_relax_steps"])),
        "anomalies": {
            "desorbed": int(np.sum(anomaly & 1 > 0)),
            "dissociated": int(np.sum(anomaly & 2 > 0)),
            "reconstructed": int(np.sum(anomaly & 4 > 0)),
        },
    }


def baselines(ds: Dataset, e_med: float, f_med: np.ndarray, re_med: float) -> dict[str, float]:
    """S2EF / IS2RE median and IS2RS initial-structure baselines on one split."""
    forces = ds.atom_array("forces").astype(np.float64)
    fixed = ds.atom_array("fixed")
    energy = ds.frames["energy"]
    s2ef = metrics.s2ef_metrics(
        np.full_like(energy, e_med),
        energy,
        np.broadcast_to(f_med, forces.shape),
        forces,
        ds.natoms,
        fixed,
    )
    relaxed_e = ds.systems["relaxed_energy"]
    is2re = metrics.is2re_metrics(np.full_like(relaxed_e, re_med), relaxed_e)
    init = [ds.arrays(int(i)) for i in ds.systems["initial_frame"]]
    final = [ds.arrays(int(i)) for i in ds.systems["relaxed_frame"]]
    natoms = np.array([len(a["numbers"]) for a in init])
    init_fixed = np.concatenate([a["fixed"] for a in init])
    is2rs = metrics.is2rs_metrics(
        np.concatenate([a["positions"] for a in init]),
        np.concatenate([a["positions"] for a in final]),
        np.stack([a["cell"] for a in final]),
        natoms,
        init_fixed,
        true_max_forces=metrics.max_free_force(
            np.concatenate([a["forces"] for a in init]), natoms, init_fixed
        ),
    )
    return {
        **{f"s2ef_{k}": v for k, v in s2ef.items()},
        **{f"is2re_{k}": v for k, v in is2re.items()},
        **{f"is2rs_{k}": v for k, v in is2rs.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir", type=Path, help="folder with <split>.h5 files")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    data = {s: open_dataset(args.dir / f"{s}.h5", in_memory=True) for s in SPLITS}
    train = data["train"]
    e_med, f_med = metrics.median_s2ef_baseline(
        train.frames["energy"], train.atom_array("forces"), train.atom_array("fixed")
    )
    re_med = metrics.median_is2re_baseline(train.systems["relaxed_energy"])
    stats = {s: split_stats(ds) for s, ds in data.items()}
    base = {s: baselines(ds, e_med, f_med, re_med) for s, ds in data.items()}
    attrs = train.attrs

    print(f"oc20emt/{attrs['size']} seed {attrs['seed']}, generator {attrs['generator_version']}")
    force = ", ".join(f"{x:.1e}" for x in f_med)
    print(f"train medians: energy {e_med:.4f} eV, force [{force}] eV/Å, relaxed {re_med:.4f} eV\n")
    print("| split | systems | frames (relax/rattled/md) | atoms | MB | converged | steps |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for s, st in stats.items():
        k = st["frames_by_kind"]
        print(
            f"| {s} | {st['systems']} | {st['frames']} ({k['relax']}/{k['rattled']}/{k['md']})"
            f" | {st['atoms']} | {st['megabytes']:.1f} | {st['converged']:.0%}"
            f" | {st['mean_relax_steps']:.0f} |"
        )
    print("\n| split | S2EF E MAE | F MAE | F cos | EFwT | IS2RE MAE | EwT | ADwT | AFbT |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s, b in base.items():
        print(
            f"| {s} | {b['s2ef_energy_mae']:.3f} | {b['s2ef_forces_mae']:.4f}"
            f" | {b['s2ef_forces_cos']:.4f} | {b['s2ef_efwt']:.2%} | {b['is2re_energy_mae']:.3f}"
            f" | {b['is2re_ewt']:.2%} | {b['is2rs_adwt']:.2%} | {b['is2rs_afbt']:.2%} |"
        )
    if args.json:
        payload = {
            "attrs": {k: v for k, v in attrs.items() if isinstance(v, str | int | float)},
            "medians": {"energy": e_med, "forces": f_med.tolist(), "relaxed_energy": re_med},
            "stats": stats,
            "baselines": base,
        }
        write_json(args.json, payload)


if __name__ == "__main__":
    main()
