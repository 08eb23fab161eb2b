"""The ``forcecalc data`` subcommand: generate OC20-EMT, convert between file formats.

``forcecalc data oc20emt --size tiny|small|medium --out DIR [--seed N --workers N]`` writes
``DIR/<split>.h5`` for the six splits; ``forcecalc data convert IN OUT`` converts between
HDF5 (.h5), ASE db (.db) and extxyz (.xyz/.extxyz).
"""

from __future__ import annotations

import argparse
import os
import time


def _oc20emt(args: argparse.Namespace) -> int:
    from forcecalc.data.oc20emt import generate

    start = time.perf_counter()
    paths = generate(
        args.size, args.out, seed=args.seed, workers=args.workers, progress=not args.quiet
    )
    for split, path in paths.items():
        print(f"{split}: {path}")
    print(
        f"generated oc20emt/{args.size} (seed {args.seed}) in {time.perf_counter() - start:.1f} s"
    )
    return 0


def _convert(args: argparse.Namespace) -> int:
    from forcecalc.data.convert import convert

    print(convert(args.input, args.output))
    return 0


def add_data_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``data`` (with ``oc20emt`` and ``convert``) on a CLI's subparsers; each leaf
    parser sets ``func`` to a callable taking the parsed arguments and returning an exit code."""
    from forcecalc.data.oc20emt import SIZES

    data = subparsers.add_parser("data", help="generate and convert data sets")
    sub = data.add_subparsers(dest="data_command", required=True)

    gen = sub.add_parser(
        "oc20emt",
        help="generate the OC20-EMT data set (one HDF5 file per split)",
        description="Adsorbate + slab systems labelled by ASE's EMT, OC20-shaped; "
        "reproducible from (size, seed) whatever the number of workers.",
    )
    gen.add_argument("--size", choices=sorted(SIZES), required=True)
    gen.add_argument("--out", required=True, help="output folder")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)"
    )
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=_oc20emt)

    conv = sub.add_parser(
        "convert",
        help="convert between HDF5 (.h5), ASE db (.db) and extxyz (.xyz/.extxyz)",
    )
    conv.add_argument("input")
    conv.add_argument("output")
    conv.set_defaults(func=_convert)
