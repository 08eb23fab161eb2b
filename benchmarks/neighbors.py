"""Neighbor-list timings: forcecalc's backends against ASE, vesin and matscipy.

Structures: dense fcc Cu bulk and a Cu(111) slab with 12 Å of vacuum (fully periodic, as in
OC20), about 100 to 20,000 atoms, cutoff 6 Å.  Every method returns the full pair list
(i, j, shift and the edge vectors), and every method's pair count is checked against the
others.  Then 64 small slabs (37 atoms each), forcecalc's per-system loop against one batched
call, on the CPU and (when available) on a CUDA device.

Prints a table and writes JSON (atomically: a temporary file, then a rename)::

    OMP_NUM_THREADS=1 python benchmarks/neighbors.py --out benchmarks/results/neighbors.json

vesin (also inside forcecalc's vesin backend) and torch use ``OMP_NUM_THREADS`` threads (all
cores when unset); ``OMP_NUM_THREADS=1`` compares single-threaded code with single-threaded
code (ASE, matscipy).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.build import add_adsorbate, bulk, fcc111
from ase.neighborlist import neighbor_list as ase_neighbor_list

from forcecalc.atomic import write_json
from forcecalc.graph import radius_graph

#: fcc Cu supercell repeats (4 n^3 atoms: 108 ... 19,652).
BULK_REPEATS = (3, 5, 7, 10, 13, 17)
#: Cu(111) slab sizes (m x m x 6 layers: 96 ... 20,184 atoms).
SLAB_SIZES = (4, 9, 16, 26, 39, 58)
CUTOFF = 6.0

Method = Callable[[Atoms, float], int]


def copper_bulk(repeat: int) -> Atoms:
    """Cubic fcc Cu (a = 3.61 Å) repeated ``repeat`` times along each axis."""
    return bulk("Cu", "fcc", a=3.61, cubic=True).repeat(repeat)


def copper_slab(size: int) -> Atoms:
    """A Cu(111) ``size x size x 6`` slab with 12 Å of vacuum, periodic in all directions."""
    slab = fcc111("Cu", (size, size, 6), a=3.61, vacuum=6.0)
    slab.pbc = True
    return slab


def _tensors(atoms_list: list[Atoms], device: str) -> tuple[torch.Tensor, ...]:
    """``(positions, cell, pbc, system_idx)`` of structures on ``device`` (float64)."""
    positions = torch.tensor(np.concatenate([a.positions for a in atoms_list]), device=device)
    cell = torch.tensor(np.stack([a.cell.array for a in atoms_list]), device=device)
    pbc = torch.tensor(np.stack([a.pbc for a in atoms_list]), device=device)
    counts = torch.tensor([len(a) for a in atoms_list], device=device)
    system_idx = torch.repeat_interleave(torch.arange(len(atoms_list), device=device), counts)
    return positions, cell, pbc, system_idx


def forcecalc_method(backend: str) -> Method:
    """``radius_graph`` with ``backend`` on the CPU (edge vectors and distances included)."""

    def run(atoms: Atoms, cutoff: float) -> int:
        graph = radius_graph(*_tensors([atoms], "cpu"), cutoff, backend=backend)
        return graph.edge_index.shape[1]

    return run


def ase_method(atoms: Atoms, cutoff: float) -> int:
    """``ase.neighborlist.neighbor_list("ijSD")``."""
    return len(ase_neighbor_list("ijSD", atoms, cutoff)[0])


def vesin_method(atoms: Atoms, cutoff: float) -> int:
    """vesin's numpy interface, full list, ``"ijSD"``."""
    from vesin import NeighborList

    calculator = NeighborList(cutoff=cutoff, full_list=True)
    i, *_ = calculator.compute(atoms.positions, atoms.cell.array, atoms.pbc, "ijSD")
    return len(i)


def matscipy_method(atoms: Atoms, cutoff: float) -> int:
    """``matscipy.neighbours.neighbour_list("ijSD")``."""
    from matscipy.neighbours import neighbour_list

    return len(neighbour_list("ijSD", atoms, cutoff)[0])


def available_methods() -> dict[str, Method]:
    """The CPU methods whose packages are installed, by name."""
    methods = {
        "forcecalc-vesin": forcecalc_method("vesin"),
        "forcecalc-torch": forcecalc_method("torch"),
        "ase": ase_method,
    }
    for name, module, method in (
        ("vesin", "vesin", vesin_method),
        ("matscipy", "matscipy", matscipy_method),
    ):
        try:
            __import__(module)
        except ImportError:
            continue
        methods[name] = method
    return methods


def time_call(function: Callable[[], object], repeats: int, sync: bool = False) -> dict:
    """Timings of ``repeats`` calls (the caller has made a warm-up call).

    Returns:
        ``median_s`` / ``min_s``: wall time; ``median_cpu_s``: the process's CPU time (less
        sensitive to other processes on a shared machine; with several threads it adds them).
    """
    wall, cpu = [], []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        function()
        if sync:
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {
        "median_s": statistics.median(wall),
        "min_s": min(wall),
        "median_cpu_s": statistics.median(cpu),
        "repeats": repeats,
    }


def cpu_rows(repeats: int, max_ase_atoms: int, scale: int) -> list[dict]:
    """Time every CPU method on the bulk and slab series."""
    structures = [("bulk", copper_bulk(r)) for r in BULK_REPEATS[:scale]]
    structures += [("slab", copper_slab(s)) for s in SLAB_SIZES[:scale]]
    rows = []
    for kind, atoms in structures:
        counts = {}
        for name, method in available_methods().items():
            if name == "ase" and len(atoms) > max_ase_atoms:
                continue
            n_pairs = method(atoms, CUTOFF)  # also the warm-up call
            counts[name] = n_pairs
            timing = time_call(lambda m=method, a=atoms: m(a, CUTOFF), repeats)
            rows.append(
                {
                    "structure": kind,
                    "n_atoms": len(atoms),
                    "method": name,
                    "device": "cpu",
                    "n_pairs": n_pairs,
                    **timing,
                }
            )
        if len(set(counts.values())) != 1:
            raise RuntimeError(f"{kind} with {len(atoms)} atoms: pair counts differ: {counts}")
    return rows


def small_slabs(n: int) -> list[Atoms]:
    """``n`` rattled Cu(111) 3x3x4 slabs with an O adsorbate (37 atoms, OC20-like)."""
    slabs = []
    for seed in range(n):
        slab = fcc111("Cu", (3, 3, 4), a=3.61, vacuum=6.0)
        add_adsorbate(slab, "O", 1.5, "fcc")
        slab.pbc = True
        slab.rattle(0.05, seed=seed)
        slabs.append(slab)
    return slabs


def batch_rows(device: str, repeats: int, n_systems: int = 64) -> list[dict]:
    """``n_systems`` small slabs on ``device``: per-system calls against one batched call."""
    slabs = small_slabs(n_systems)
    batch = _tensors(slabs, device)
    singles = [_tensors([slab], device) for slab in slabs]

    def loop(backend: str) -> int:
        return sum(radius_graph(*t, CUTOFF, backend=backend).edge_index.shape[1] for t in singles)

    def batched(backend: str) -> int:
        return radius_graph(*batch, CUTOFF, backend=backend).edge_index.shape[1]

    cases = {
        "forcecalc-vesin per-system loop": lambda: loop("vesin"),
        "forcecalc-torch per-system loop": lambda: loop("torch"),
        "forcecalc-vesin batch (loops inside)": lambda: batched("vesin"),
        "forcecalc-torch batched": lambda: batched("torch"),
    }
    on_gpu = device.startswith("cuda")
    rows = []
    for name, function in cases.items():
        n_pairs = function()  # also the warm-up call
        timing = time_call(function, repeats, sync=on_gpu)
        rows.append(
            {
                "structure": f"{n_systems} slabs",
                "n_atoms": sum(len(s) for s in slabs),
                "method": name,
                "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
                "n_pairs": n_pairs,
                **timing,
            }
        )
    if len({row["n_pairs"] for row in rows}) != 1:
        raise RuntimeError(f"{n_systems} slabs on {device}: pair counts differ")
    return rows


def print_table(rows: list[dict], key: str = "median_s") -> None:
    """Times ``key`` (ms) per structure (rows) and method (columns)."""
    methods = list(dict.fromkeys(row["method"] for row in rows))
    keys = list(dict.fromkeys((row["structure"], row["n_atoms"]) for row in rows))
    times = {(row["structure"], row["n_atoms"], row["method"]): row[key] for row in rows}
    pairs = {(row["structure"], row["n_atoms"]): row["n_pairs"] for row in rows}
    width = max(len(m) for m in methods) + 2
    print(f"{'structure':<12}{'atoms':>8}{'pairs':>11}" + "".join(f"{m:>{width}}" for m in methods))
    for structure, n_atoms in keys:
        cells = []
        for method in methods:
            value = times.get((structure, n_atoms, method))
            cells.append(f"{'-' if value is None else f'{value * 1e3:.2f}':>{width}}")
        print(f"{structure:<12}{n_atoms:>8}{pairs[(structure, n_atoms)]:>11}" + "".join(cells))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/neighbors.json"))
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case (median)")
    parser.add_argument("--max-ase-atoms", type=int, default=5000, help="skip ASE above this")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (vesin: OMP_NUM_THREADS)"
    )
    parser.add_argument(
        "--scale", type=int, default=len(BULK_REPEATS), help="number of sizes per series"
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = cpu_rows(args.repeats, args.max_ase_atoms, args.scale)
    batches = batch_rows("cpu", args.repeats)
    if torch.cuda.is_available():
        batches += batch_rows("cuda", args.repeats)
    print(
        f"median wall time (ms) of {args.repeats} calls, cutoff {CUTOFF} Å, "
        f"torch CPU threads {torch.get_num_threads()}"
    )
    print_table(rows)
    print("\nmedian CPU time of the process (ms)")
    print_table(rows, "median_cpu_s")
    print()
    for row in batches:
        print(
            f"{row['structure']} ({row['n_atoms']} atoms, {row['n_pairs']} pairs) on "
            f"{row['device']}: {row['method']:<38}{row['median_s'] * 1e3:9.2f} ms wall"
            f"{row['median_cpu_s'] * 1e3:9.2f} ms CPU"
        )
    write_json(
        args.out,
        {
            "benchmark": "neighbor lists",
            "cutoff": CUTOFF,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "results": rows + batches,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
