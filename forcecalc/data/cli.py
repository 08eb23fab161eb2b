"""The ``forcecalc data`` subcommand: generate OC20-EMT, convert between file formats.

``forcecalc data oc20emt --size tiny|small|medium|large --out DIR [--seed N --workers N]`` writes
``DIR/<split>.h5`` for the six splits; ``forcecalc data is2rs --size large --out FILE.extxyz``
writes only the initial structures of the test splits (the IS2RS inputs, FixAtoms and tags
kept; in the format ASE writes for the output's name, .traj too); ``forcecalc data convert IN
OUT [--overwrite]`` converts to HDF5 (.h5), ASE db (.db) or extxyz (.xyz/.extxyz) from those or
any file ASE reads, onto an existing OUT only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path


def _integer_from(minimum: int, kind: str) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``, ``kind`` in its error (argparse names the
    option)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {kind}, got {text!r}")
        return value

    return parse


#: ``--seed``: the data set's seed; ``--workers``: processes.
_seed = _integer_from(0, "a non-negative integer")
_workers = _integer_from(1, "a positive integer")


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


def _is2rs(args: argparse.Namespace) -> int:
    import ase.io

    from forcecalc.atomic import atomic_output, output_format
    from forcecalc.data.oc20emt import SIZES, is2rs_inputs

    start = time.perf_counter()
    count = sum(SIZES[args.size].systems[split] for split in set(args.splits))
    out_format = output_format(args.out, count)  # before any work: a folder, .traj, ...
    structures = is2rs_inputs(
        args.size, args.seed, args.splits, workers=args.workers, progress=not args.quiet
    )
    with atomic_output(args.out, suffix=Path(args.out).suffix or ".extxyz") as tmp:
        ase.io.write(tmp, structures, format=out_format)
    print(
        f"wrote {len(structures)} IS2RS inputs of oc20emt/{args.size} (seed {args.seed}, "
        f"{', '.join(args.splits)}) to {args.out} in {time.perf_counter() - start:.1f} s"
    )
    return 0


def _convert(args: argparse.Namespace) -> int:
    """Convert IN to OUT, unless OUT exists and ``--overwrite`` is not given (IN and OUT
    swapped replaced the user's only copy of their labels)."""
    from forcecalc.data.convert import convert

    if os.path.lexists(args.output) and not args.overwrite:
        raise ValueError(
            f"{args.output} exists (the output comes second: data convert IN OUT); pass "
            "--overwrite to replace it"
        )
    print(convert(args.input, args.output))  # its warnings: one line each (forcecalc.cli.main)
    return 0


def add_data_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``data`` (with ``oc20emt``, ``is2rs`` and ``convert``) on a CLI's subparsers;
    each leaf parser sets ``func`` to a callable taking the parsed arguments and returning an
    exit code."""
    from forcecalc.data.oc20emt import SIZES, SPLITS, TEST_SPLITS

    data = subparsers.add_parser("data", help="generate and convert data sets")
    sub = data.add_subparsers(dest="data_command", required=True)

    gen = sub.add_parser(
        "oc20emt",
        help="generate the OC20-EMT data set (one HDF5 file per split)",
        description="Adsorbate + slab systems labelled by ASE's EMT, OC20-shaped; "
        "reproducible from (size, seed) whatever the number of workers.",
    )
    gen.add_argument(
        "--size",
        choices=sorted(SIZES),
        required=True,
        help="how many systems (benchmarks/oc20emt.md)",
    )
    gen.add_argument(
        "--out",
        required=True,
        help="output folder: its split files are replaced only once all new ones are complete",
    )
    gen.add_argument("--seed", type=_seed, default=0, help="the data set's seed (>= 0)")
    gen.add_argument(
        "--workers",
        type=_workers,
        default=os.cpu_count() or 1,
        help="processes (default: all cores)",
    )
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=_oc20emt)

    is2rs = sub.add_parser(
        "is2rs",
        help="write the initial structures (IS2RS inputs) of OC20-EMT splits (extxyz, traj...)",
        description="Only the initial adsorbate + slab structures of a data set's systems, "
        "the initial frames 'forcecalc data oc20emt' stores (equal to extxyz's printed "
        "precision, 1e-8 Å), at the cost of one clean-slab EMT relaxation each.",
    )
    is2rs.add_argument("--size", choices=sorted(SIZES), required=True, help="the data set's size")
    is2rs.add_argument(
        "--out",
        required=True,
        help="output file, in the format ASE writes for its name (.extxyz, .traj: both keep "
        "tags, FixAtoms and info; checked before any work, written atomically)",
    )
    is2rs.add_argument("--seed", type=_seed, default=0, help="the data set's seed (>= 0)")
    is2rs.add_argument(
        "--splits",
        nargs="+",
        default=list(TEST_SPLITS),
        choices=list(SPLITS),
        metavar="SPLIT",
        help=f"which splits ({', '.join(SPLITS)})",
    )
    is2rs.add_argument(
        "--workers",
        type=_workers,
        default=os.cpu_count() or 1,
        help="processes (default: all cores)",
    )
    is2rs.add_argument("--quiet", action="store_true", help="no progress bar")
    is2rs.set_defaults(func=_is2rs)

    conv = sub.add_parser(
        "convert",
        help="convert to HDF5 (.h5), ASE db (.db) or extxyz (.xyz/.extxyz)",
    )
    conv.add_argument(
        "input", help="a data file (.h5, .db, .xyz/.extxyz, or any other file ASE reads)"
    )
    conv.add_argument("output", help="the converted file: .h5, .db, .xyz or .extxyz")
    conv.add_argument(
        "--overwrite", action="store_true", help="replace OUTPUT if it exists (else an error)"
    )
    conv.set_defaults(func=_convert)
