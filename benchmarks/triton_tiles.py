"""Where SpinConv-All's batched forward with the fused Triton kernels spends its device time,
kernel by kernel, for several tile choices: to pick ``forcecalc/models/triton_kernels.py``'s
defaults from the whole forward (``fused_kernels.py`` times the blocks alone).

For each variant (module constants of ``triton_kernels`` set, the others at their
defaults) it runs the forward of ``--batch`` 66-atom slabs (``speed.py``'s structures) under
``torch.profiler`` and sums the device time of each fused kernel (``_linear_kernel``,
``_basis_linear_kernel``, ``_mixture_kernel``, ``_spectra_kernel``, ``_products_kernel``,
``_inverse_kernel``, ``_directions_kernel``, ``_bins_kernel``, ``_split_kernel``,
``_spectra_product_kernel``) and of
everything else, with the wall time per forward (atoms/s).  Every variant changes each
kernel's constants (variant 1: Triton's own ``tf32x3``, ``SPLIT_WEIGHTS = False``; variant
2: one spectra product per longitude, ``SPECTRA_ONE_PRODUCT = False``), so the
best choice per kernel can be read from one pass (a variant that fails to compile, e.g. out
of shared memory, is reported and skipped).  The top device kernels and operators of the
first variant run are printed too.  Prints tables, writes JSON.

    python benchmarks/triton_tiles.py --batch 64 --out DIR/triton_tiles.json
"""

from __future__ import annotations

import argparse
import collections
import time
from typing import Any

import torch
from speed import CONFIGS, hardware, structure
from torch.profiler import ProfilerActivity, profile

from forcecalc.atomic import write_json
from forcecalc.graph import Batch
from forcecalc.models import triton_kernels
from forcecalc.models.registry import build_model

KERNELS = (
    "_linear_kernel",
    "_basis_linear_kernel",
    "_mixture_kernel",
    "_spectra_kernel",
    "_spectra_product_kernel",
    "_products_kernel",
    "_inverse_kernel",
    "_directions_kernel",
    "_bins_kernel",
    "_split_kernel",
)

#: Tile choices (module constant -> value); each changes every kernel's constants.
VARIANTS: list[dict[str, Any]] = [
    {},
    {"SPLIT_WEIGHTS": False},
    {"SPECTRA_ONE_PRODUCT": False},
    {
        "LINEAR_WARPS": 4,
        "MIXTURE_WARPS": 8,
        "SPECTRA_GRIDS": 1,
        "PRODUCTS_WARPS": 8,
        "INVERSE_COLUMNS": 256,
    },
    {
        "LINEAR_TILES": (128, 128, 32),
        "MIXTURE_TILES": (128, 128, 32),
        "MIXTURE_WARPS": 8,
        "SPECTRA_GRIDS": 4,
        "PRODUCTS_TILES": (128, 128, 32),
        "PRODUCTS_WARPS": 8,
        "INVERSE_COLUMNS": 1024,
    },
    {
        "LINEAR_TILES": (64, 64, 32),
        "LINEAR_WARPS": 4,
        "MIXTURE_TILES": (64, 64, 32),
        "SPECTRA_WARPS": 4,
        "PRODUCTS_TILES": (64, 64, 32),
    },
    {
        "LINEAR_TILES": (128, 64, 64),
        "LINEAR_STAGES": 2,
        "MIXTURE_TILES": (128, 64, 32),
        "MIXTURE_STAGES": 4,
        "SPECTRA_STAGES": 2,
        "PRODUCTS_STAGES": 4,
    },
    {
        "MIXTURE_TILES": (64, 128, 64),
        "MIXTURE_STAGES": 2,
        "SPECTRA_GRIDS": 4,
        "SPECTRA_WARPS": 4,
        "SPECTRA_STAGES": 2,
        "PRODUCTS_TILES": (64, 128, 32),
    },
]


def device_times(forward: Any, repeats: int) -> tuple[float, dict[str, float], list, list]:
    """Wall milliseconds per ``forward()``, device milliseconds per forward of each fused
    kernel and of the rest (``"other"``), the profiler's events by self device time, and its
    operators (by input shapes) by the device time of the kernels they launched."""
    with torch.no_grad():
        forward()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            forward()
        torch.cuda.synchronize()
        wall_ms = 1000 * (time.perf_counter() - start) / repeats
        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
        with profile(activities=activities, record_shapes=True) as prof:
            for _ in range(repeats):
                forward()
            torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    totals: dict[str, float] = collections.defaultdict(float)
    for event in kernels:
        ms = event.self_device_time_total / 1000 / repeats
        # the longest name it holds (_linear_kernel is in _basis_linear_kernel)
        name = max((k for k in KERNELS if k in event.key), key=len, default="other")
        totals[name] += ms
    events = sorted(kernels, key=lambda e: -e.self_device_time_total)
    operators = [
        e for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("aten::")
    ]
    operators.sort(key=lambda e: -e.device_time_total)
    return wall_ms, dict(totals), events, operators


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=64, help="66-atom slabs per forward")
    parser.add_argument("--precision", default="tf32x3", choices=triton_kernels.PRECISIONS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--variants", type=int, nargs="+", default=None, help="indices of VARIANTS (default: all)"
    )
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/triton_tiles.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("no CUDA device is visible")
    kind, kwargs = CONFIGS["spinconv_all"]
    torch.manual_seed(0)
    model = build_model(kind, kwargs).eval().to("cuda", torch.float32)
    fused = triton_kernels.with_triton_kernels(model, args.precision)
    atoms = [structure(66, seed) for seed in range(args.batch)]
    batch = Batch.from_atoms(atoms, cutoff=model.cutoff).to("cuda", torch.float32)
    with torch.no_grad():
        reference = model(batch)["forces"]
    defaults = {key: getattr(triton_kernels, key) for v in VARIANTS for key in v}
    header = "".join(f"{k.strip('_').removesuffix('_kernel')[:9]:>10}" for k in KERNELS)
    print(f"{'variant':<8}{'atoms/s':>10}{'wall ms':>9}{header}{'other':>10}{'rel.diff':>10}")
    rows: list[dict[str, Any]] = []
    top: list[dict[str, Any]] = []
    top_operators: list[dict[str, Any]] = []
    for number, variant in enumerate(VARIANTS):
        if args.variants is not None and number not in args.variants:
            continue
        for key, value in {**defaults, **variant}.items():
            setattr(triton_kernels, key, value)
        try:
            wall_ms, totals, events, operators = device_times(lambda: fused(batch), args.repeats)
            with torch.no_grad():
                difference = (fused(batch)["forces"] - reference).abs().max()
        except Exception as error:  # a tile choice the compiler or the device refuses
            print(f"{number:<8}failed: {type(error).__name__}: {str(error)[:200]}")
            rows.append({"variant": number, "tiles": {**defaults, **variant}, "error": str(error)})
            continue
        row = {
            "variant": number,
            "tiles": {**defaults, **variant},
            "wall_ms": wall_ms,
            "atoms_per_second": 1000 * batch.n_atoms / wall_ms,
            "device_ms": totals,
            "max_force_difference_relative": float(difference / reference.abs().max()),
        }
        rows.append(row)
        times = "".join(f"{totals.get(k, 0.0):>10.2f}" for k in KERNELS)
        print(
            f"{number:<8}{row['atoms_per_second']:>10.0f}{wall_ms:>9.1f}{times}"
            f"{totals.get('other', 0.0):>10.2f}{row['max_force_difference_relative']:>10.1e}"
        )
        if not top:
            top = [
                {"name": e.key, "calls": e.count / args.repeats,
                 "self_ms": e.self_device_time_total / 1000 / args.repeats}
                for e in events[: args.top]
            ]  # fmt: skip
            top_operators = [
                {"name": e.key, "shapes": str(e.input_shapes), "calls": e.count / args.repeats,
                 "device_ms": e.device_time_total / 1000 / args.repeats}
                for e in operators[: args.top]
            ]  # fmt: skip
    for key, value in defaults.items():
        setattr(triton_kernels, key, value)
    print(f"\ntop device kernels, first variant (per forward of {batch.n_atoms} atoms)")
    for entry in top:
        print(f"  {entry['name'][:70]:<72}{entry['calls']:>6.0f}{entry['self_ms']:>9.3f}")
    print("\ntop operators by the device time of their kernels, first variant (input shapes)")
    for entry in top_operators:
        print(
            f"  {entry['name'][:28]:<30}{entry['shapes'][:70]:<72}{entry['calls']:>6.0f}"
            f"{entry['device_ms']:>9.3f}"
        )
    write_json(
        args.out,
        {
            "benchmark": "triton_tiles",
            "hardware": hardware(False),
            "batch": args.batch,
            "atoms": batch.n_atoms,
            "precision": args.precision,
            "rows": rows,
            "top_first_variant": top,
            "top_operators_first_variant": top_operators,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
