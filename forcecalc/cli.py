"""The ``forcecalc`` command."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

import forcecalc
from forcecalc.atomic import check_writable, output_format
from forcecalc.compiled import COMPILE_MODES
from forcecalc.data.cli import add_data_commands
from forcecalc.train.cli import add_train_commands
from forcecalc.warning import ForcecalcWarning

if TYPE_CHECKING:
    from ase import Atoms
    from ase.md.md import MolecularDynamics

    from forcecalc.calculator import ForceCalculator
    from forcecalc.checkpoint import Potential
    from forcecalc.data.store import Dataset


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="checkpoint: a file, a shipped name (see 'forcecalc info') or an OCP name",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float64"],
        help="the model's precision (positions are float64 either way)",
    )
    parser.add_argument(
        "--allow-unsafe",
        action="store_true",
        help="allow full unpickling of the checkpoint (only for files you trust)",
    )


def _add_forces_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--forces",
        default=None,
        choices=["conservative", "compat"],
        help="energy-centric SpinConv only: the full -dE/dx (for MD, and the energy's own "
        "minima), or OCP's definition (default: the checkpoint's: conservative for ours, "
        "compat for OCP's)",
    )


def _forces_option(args: argparse.Namespace) -> dict[str, str]:
    """The model option ``--forces`` asks for (none: the checkpoint's own)."""
    return {} if args.forces is None else {"forces": args.forces}


def _add_cuda_graph_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="replay the model's forward from captured CUDA graphs (one launch per step; for "
        "small systems on a GPU; the same numbers)",
    )
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        metavar="MODE",
        choices=COMPILE_MODES,
        help="torch.compile the forward (fused kernels; the first step compiles, seconds to a "
        "minute; the same numbers to rounding): with --cuda-graph the replayed forward, "
        f"else the model's blocks; MODE one of {', '.join(COMPILE_MODES)}",
    )


def _cmd_info(args: argparse.Namespace) -> int:
    if args.checkpoint is None:
        import torch

        from forcecalc.hub import cache_dir, list_models

        print(f"forcecalc {forcecalc.__version__}")
        print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
        print(f"cache directory: {cache_dir()}")
        print("checkpoints:")
        list_models(show=True)
        return 0
    from forcecalc.checkpoint import load_checkpoint

    potential = load_checkpoint(args.checkpoint, device="cpu", allow_unsafe=args.allow_unsafe)
    info = potential.info
    report = {
        "file": info.path,
        "format": info.source_format,
        "model": info.model,
        "parameters": sum(p.numel() for p in potential.model.parameters()),
        "buffer_values": sum(b.numel() for b in potential.model.buffers()),
        "cutoff": info.model_kwargs.get("cutoff"),
        "elements": info.elements,
        "normalizers": info.normalizers.as_dict(),
        "model_kwargs": info.model_kwargs,
        "metadata": info.metadata,
    }
    print(json.dumps(report, indent=2, default=str))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    """Convert a checkpoint to forcecalc's format, in the dtype its weights are stored in
    (float64 if any stored floating-point tensor is float64: nothing is rounded; else
    float32), after checking that the output can be written and, unless ``--overwrite``,
    does not exist (IN and OUT swapped replaced a fine-tuned model)."""
    import torch

    from forcecalc.checkpoint import build_potential, read_checkpoint, save_checkpoint

    check_writable(args.output)
    if os.path.lexists(args.output) and not args.overwrite:
        raise ValueError(
            f"{args.output} exists (the output comes second: convert IN OUT); pass --overwrite "
            "to replace it"
        )
    info, state_dict = read_checkpoint(args.input, allow_unsafe=args.allow_unsafe)
    stored = {value.dtype for value in state_dict.values() if isinstance(value, torch.Tensor)}
    dtype = "float64" if torch.float64 in stored else "float32"
    potential = build_potential(info, state_dict, device="cpu", dtype=dtype)
    path = save_checkpoint(potential, args.output, metadata={"converted_from": str(args.input)})
    print(f"wrote {path} ({potential.name}, forcecalc format, {dtype})")
    return 0


def _read_errors() -> tuple[type[Exception], ...]:
    """What ``ase.io.read`` raises on a file it cannot parse (XYZError, ULM's are OSErrors)."""
    from ase.io.formats import UnknownFileTypeError

    return (OSError, ValueError, IndexError, KeyError, RuntimeError, UnknownFileTypeError)


def _read_structures(path: str) -> list:
    """Every structure of ``path``; a missing or unreadable file is a ValueError naming it."""
    from ase.io import read

    if not Path(path).exists():
        raise FileNotFoundError(f"input file {path} does not exist")
    if Path(path).suffix.lower() in (".h5", ".hdf5"):
        raise ValueError(
            f"{path} is a forcecalc data set (HDF5), which ASE does not read: `forcecalc data "
            "is2rs` writes the initial structures of OC20-EMT splits, `forcecalc data convert "
            f"{path} FILE.extxyz` its frames"
        )
    try:
        structures = read(path, index=":")
    except _read_errors() as error:
        raise ValueError(
            f"cannot read structures from {path}: {type(error).__name__}: {error}"
        ) from error
    return structures if isinstance(structures, list) else [structures]


def _write_structures(path: str, structures: list, fmt: str) -> None:
    """Write ``structures`` to ``path`` in ASE's format ``fmt``, atomically."""
    from ase.io import write

    from forcecalc.atomic import atomic_output

    target = Path(path)
    with atomic_output(target, suffix=target.suffix or ".extxyz") as tmp:
        write(tmp, structures, format=fmt)


def _check_at_least(args: argparse.Namespace, name: str, minimum: float) -> None:
    value = getattr(args, name)
    if value is not None and not value >= minimum:  # NaN too
        raise ValueError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


def _check_relax_args(args: argparse.Namespace) -> None:
    _check_at_least(args, "fmax", 0)
    _check_at_least(args, "steps", 0)
    _check_at_least(args, "skin", 0)
    if args.batch_size != "auto" and not args.batched:
        raise ValueError("--batch-size applies to --batched relaxations: add --batched")
    if args.batch_size != "auto" and not (args.batch_size.isdigit() and int(args.batch_size)):
        raise ValueError(
            f"--batch-size must be 'auto' or a positive integer, got {args.batch_size!r}"
        )
    if args.batched and args.cuda_graph:
        raise ValueError(
            "--cuda-graph applies to ASE's optimizers (without --batched): the batched "
            "engine's batches change shape as structures converge"
        )


def _fix_below(atoms: Atoms, z: float) -> None:
    """Add a FixAtoms for the atoms below ``z`` to ``atoms``' constraints, merged with a
    FixAtoms already there (into the place of the first one); other constraints are kept."""
    from ase.constraints import FixAtoms

    constraints = list(atoms.constraints)
    fixed = [i for i, c in enumerate(constraints) if isinstance(c, FixAtoms)]
    indices = np.flatnonzero(atoms.positions[:, 2] < z)
    for i in fixed:
        indices = np.union1d(indices, constraints[i].get_indices())
    merged = FixAtoms(indices=indices)
    if fixed:
        constraints[fixed[0]] = merged
        constraints = [c for i, c in enumerate(constraints) if i not in fixed[1:]]
    else:
        constraints.append(merged)
    atoms.set_constraint(constraints)


def _add_kernels_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kernels",
        default=None,
        choices=["tf32x3", "mixed"],
        help="SpinConv's fused Triton kernels (force-centric models, float32, CUDA; pip "
        "install triton; about 3.5x the throughput of PyTorch's operators batched on an H100): "
        "tf32x3 has near float32's accuracy, mixed computes the bulk of the products in TF32 "
        "(1.2x faster; its errors on an H100 within 0.6 of the float32 fixture tolerances: "
        "see the README)",
    )


def _with_kernels(potential: Potential, args: argparse.Namespace) -> Potential:
    """``potential``, or a copy with the fused kernels where ``--kernels`` asks for them;
    ``ValueError`` naming what stands in their way."""
    import torch

    if args.kernels is None:
        return potential
    if getattr(args, "compile", None):
        raise ValueError(
            "--kernels and --compile exclude each other: the kernels replace the blocks that "
            "--compile compiles"
        )
    if potential.energy_gradient:
        raise ValueError(
            f"--kernels: {args.model} is energy-centric (its forces are the energy's gradient, "
            "and the fused kernels have no backward pass): they serve force-centric SpinConv "
            "models"
        )
    if potential.dtype != torch.float32:
        raise ValueError(f"--kernels computes in float32, not with --dtype {args.dtype}")
    try:
        from forcecalc.models.triton_kernels import kernels_run_on, with_triton_kernels
    except ImportError as error:
        raise ValueError("--kernels needs triton (pip install triton)") from error
    if not kernels_run_on(potential.device):
        raise ValueError(f"--kernels needs a CUDA device (the model is on {potential.device})")
    return with_triton_kernels(potential, args.kernels)


def _cmd_relax(args: argparse.Namespace) -> int:
    from forcecalc.checkpoint import load_checkpoint
    from forcecalc.relax import parse_shard, shard_indices
    from forcecalc.relax.engine import check_structures

    _check_relax_args(args)
    structures = _read_structures(args.input)
    indices = list(range(len(structures)))
    if args.shard:
        indices = shard_indices(len(structures), *parse_shard(args.shard))
    out_format = output_format(args.out, len(indices), bool(args.shard)) if args.out else None
    if not structures and not args.shard:
        raise ValueError(f"{args.input} holds no structures")
    if args.trajectory is not None:
        _check_trajectory_folder(args)
    potential = load_checkpoint(
        args.model,
        device=args.device,
        dtype=args.dtype,
        allow_unsafe=args.allow_unsafe,
        **_forces_option(args),
    )
    _note_cuda_graph_off_cuda(args, potential)
    if args.shard and not args.out:
        print(
            f"forcecalc: note: --shard {args.shard} without --out: this shard's results are "
            "printed, not saved for forcecalc merge",
            file=sys.stderr,
        )
    provenance = _run_record(args, potential)
    selected = []
    for index in indices:
        atoms = structures[index]
        atoms.info.update(input_index=index, input_count=len(structures), **provenance)
        if args.fix_below is not None:
            _fix_below(atoms, args.fix_below)
        selected.append(atoms)
    # all, before the first step (the batched engine checks overlaps itself, counting edges)
    check_structures(selected, potential, engine=args.batched, overlaps=not args.batched)
    potential = _with_kernels(potential, args)
    if args.batched and args.compile:
        from forcecalc.compiled import compiled_blocks

        potential = compiled_blocks(potential, args.compile)
    relaxed = (_relax_batched if args.batched else _relax_one_by_one)(selected, potential, args)
    print(f"{'#':>5} {'formula':<16} {'steps':>6} {'E_initial':>12} {'E_final':>12} {'fmax':>8}")
    for atoms in relaxed:
        head = f"{atoms.info['input_index']:>5} {atoms.get_chemical_formula():<16}"
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        if not (np.isfinite(energy) and np.isfinite(forces).all()):  # failed, no result
            print(f"{head} {atoms.info['relax_steps']:>6}  failed: {atoms.info['relax_error']}")
            continue
        fmax = float(np.linalg.norm(forces, axis=1).max())
        flag = "" if atoms.info["relax_converged"] else "  (not converged)"
        if "relax_error" in atoms.info:
            flag += f"  failed: {atoms.info['relax_error']}"
        print(
            f"{head} {atoms.info['relax_steps']:>6} {atoms.info['relax_initial_energy']:>12.4f} "
            f"{energy:>12.4f} {fmax:>8.4f}{flag}"
        )
    if args.out:
        _write_structures(args.out, relaxed, out_format)
        print(f"wrote {len(relaxed)} relaxed structure(s) to {args.out}")
    failed = [atoms.info["input_index"] for atoms in relaxed if "relax_error" in atoms.info]
    if failed:
        print(
            f"forcecalc: error: the relaxation of input structure(s) {failed[:10]} "
            f"({len(failed)} of {len(relaxed)}) failed (info['relax_error'] says why)",
            file=sys.stderr,
        )
        return 1
    return 0


def _relax_one_by_one(structures: list, potential: Potential, args: argparse.Namespace) -> list:
    """ASE's own optimizer, one structure at a time, with our calculator (:func:`_relax_one`).

    On the CPU, numpy's BLAS is held to one thread meanwhile: ASE's BFGS diagonalizes its
    Hessian with it at every step, and BLAS threads keep spinning for a while after that
    call, competing with torch's threads for the cores during the next forward pass
    (spinconv-fc, 38-atom slab, 2 cores: 108 ms per BFGS step, 30 ms with one BLAS thread;
    LBFGS and FIRE use no threaded BLAS call)."""
    from threadpoolctl import threadpool_limits

    from forcecalc.calculator import load_calculator

    calc = load_calculator(
        potential, skin=args.skin or 0.0, cuda_graph=args.cuda_graph, compile_mode=args.compile
    )
    blas_threads = 1 if potential.device.type == "cpu" else None
    with threadpool_limits(blas_threads, user_api="blas"):
        for atoms in structures:
            _relax_one(atoms, calc, args)
    return structures


def _relax_one(atoms: Atoms, calc: ForceCalculator, args: argparse.Namespace) -> None:
    """Relax ``atoms`` in place with ASE's optimizer ``args.optimizer`` and end it as the
    batched engine ends a structure: a SinglePointCalculator with the results at its final
    positions (not ``calc``, shared by the structures, which keeps only the last one's),
    ``info["relax_steps"]`` (the steps whose positions were evaluated),
    ``info["relax_converged"]``, ``info["relax_initial_energy"]`` and, where it failed,
    ``info["relax_error"]``; the others go on. A failure ends it there: the model's
    non-finite output at the positions it came from, with that output; a step that brought
    two atoms within 0.01 Å at that step's positions, with NaN energy and forces; a step that
    was not finite (ASE's LBFGS at zero forces) at the last finite positions, with their
    results."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.optimize import BFGS, FIRE, LBFGS

    from forcecalc.calculator import NonFiniteOutput
    from forcecalc.relax.relaxation import MODEL_NOT_FINITE, atoms_met, step_not_finite

    atoms.calc = calc
    optimizer = {"BFGS": BFGS, "LBFGS": LBFGS, "FIRE": FIRE}[args.optimizer](atoms, logfile=None)
    evaluated: list[tuple[np.ndarray, dict, int]] = []  # the last positions, results, steps

    def keep_evaluated() -> None:  # an observer: called after each evaluation, step 0 too
        evaluated[:] = [(atoms.get_positions(), calc.results, optimizer.nsteps)]

    optimizer.attach(keep_evaluated)
    # set when the run ends: the frames carry the input's info, as the engine's do
    outcome: dict[str, object] = {"relax_converged": False}
    try:
        outcome["relax_initial_energy"] = atoms.get_potential_energy()
        with _trajectory_writer(args, atoms) as writer:
            if writer is not None:  # called at step 0 too (the input)
                optimizer.attach(writer)
            outcome["relax_converged"] = bool(optimizer.run(fmax=args.fmax, steps=args.steps))
    except NonFiniteOutput as error:  # its output there; as the engine's, without a stress
        results = {key: error.results[key] for key in ("energy", "free_energy", "forces")}
        outcome.setdefault("relax_initial_energy", results["energy"])
        outcome["relax_error"] = MODEL_NOT_FINITE
        evaluated[:] = [(atoms.get_positions(), results, optimizer.nsteps)]
    except ValueError as error:  # the calculator refused the positions a step made
        if np.isfinite(atoms.positions).all():  # two atoms within 0.01 Å: no results there
            nan = np.full((len(atoms), 3), np.nan)
            results = {"energy": np.nan, "free_energy": np.nan, "forces": nan}
            outcome["relax_error"] = atoms_met(optimizer.nsteps, str(error))
            evaluated[:] = [(atoms.get_positions(), results, optimizer.nsteps)]
        else:  # the step was not finite: the last finite positions stay
            outcome["relax_error"] = step_not_finite(args.optimizer)
    positions, results, steps = evaluated[-1]
    atoms.info.update(outcome, relax_steps=steps)
    atoms.positions = positions
    atoms.calc = SinglePointCalculator(atoms, **results)


def _check_trajectory_folder(args: argparse.Namespace) -> None:
    """``--trajectory DIR``: a folder that can be written (made if missing), where ``--out``
    would not overwrite a structure's path."""
    folder = Path(args.trajectory)
    if not args.trajectory.strip():
        raise ValueError("--trajectory needs a folder, got an empty name")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--trajectory {args.trajectory} is a file, not a folder")
    check_writable(str(folder / "0.traj"))
    out = Path(args.out or "")
    if out.suffix == ".traj" and out.stem.isdigit() and out.resolve().parent == folder.resolve():
        raise ValueError(
            f"--out {args.out} is where --trajectory writes structure {out.stem}'s path"
        )


@contextlib.contextmanager
def _trajectory_writer(args: argparse.Namespace, atoms: Atoms) -> Iterator[Callable | None]:
    """With ``--trajectory DIR``, a callable writing ``atoms`` (with its calculator's energy
    and forces) as the next frame of ``DIR/INDEX.traj`` (INDEX: its place in the input),
    which is put in place when the block ends, also when the model fails in it (the frames
    before the failure); ``None`` without ``--trajectory``."""
    from ase.calculators.calculator import CalculatorError
    from ase.io.trajectory import Trajectory

    from forcecalc.atomic import atomic_output

    if args.trajectory is None:
        yield None
        return
    failure = None
    with atomic_output(_trajectory_path(args, atoms), suffix=".traj") as tmp:
        trajectory = Trajectory(tmp, "w", atoms)
        try:
            yield trajectory.write
        # the model's failure (as _relax_one_by_one catches it): the frames before it are
        # the path; anything else (an interrupt) leaves no file
        except (CalculatorError, ValueError) as error:
            failure = error
        finally:
            trajectory.close()
    if failure is not None:
        raise failure


def _write_trajectories(args: argparse.Namespace, relaxed: list) -> None:
    """``--trajectory DIR`` of the batched engine: each structure's frames
    (``info["trajectory"]``, taken out) to ``DIR/INDEX.traj``, atomically; none for a
    structure the model failed on before its first frame."""
    from ase.io import write

    from forcecalc.atomic import atomic_output

    for atoms in relaxed:
        frames = atoms.info.pop("trajectory")
        if frames:
            with atomic_output(_trajectory_path(args, atoms), suffix=".traj") as tmp:
                write(tmp, frames, format="traj")


def _trajectory_path(args: argparse.Namespace, atoms: Atoms) -> Path:
    """``DIR/INDEX.traj`` of ``--trajectory DIR``: INDEX the structure's place in the input."""
    return Path(args.trajectory) / f"{atoms.info['input_index']}.traj"


def _relax_batched(structures: list, potential: Potential, args: argparse.Namespace) -> list:
    """forcecalc's batched engine: many structures per forward pass."""
    from forcecalc.relax import relax

    batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    relaxed = relax(
        structures,
        potential,
        optimizer=args.optimizer.lower(),
        fmax=args.fmax,
        steps=args.steps,
        batch_size=batch_size,
        skin=args.skin,
        trajectory=args.trajectory is not None,
        progress=True,
    )
    if args.trajectory is not None:
        _write_trajectories(args, relaxed)
    return relaxed


#: What decides the numbers of a ``relax`` output, recorded in each structure's info (info key
#: -> what `merge` names when the shards differ in it): the input file and the model weights
#: (their SHA-256), the model's forces and precision, the relaxation's settings.
_RUN_RECORD = {
    "input_digest": "input files",
    "model_digest": "model weights",
    "model_forces": "--forces",
    "model_dtype": "--dtype",
    "model_kernels": "--kernels",
    "run_optimizer": "--optimizer",
    "run_fmax": "--fmax",
    "run_max_steps": "--steps",
    "run_fix_below": "--fix-below",
}


def _run_record(args: argparse.Namespace, potential: Potential) -> dict[str, Any]:
    """This ``relax`` run's values of :data:`_RUN_RECORD`, in its order (the digests as text,
    which extxyz cannot take for a number)."""
    from forcecalc.hub import file_sha256

    values = (
        f"sha256:{file_sha256(Path(args.input))[:16]}",
        f"sha256:{file_sha256(Path(potential.info.path))[:16]}",
        potential.model.forces if potential.energy_gradient else "direct",
        args.dtype,
        args.kernels or "none",
        args.optimizer,
        args.fmax,
        args.steps,
        "none" if args.fix_below is None else args.fix_below,
    )
    return dict(zip(_RUN_RECORD, values, strict=True))


def _cmd_merge(args: argparse.Namespace) -> int:
    # an empty file is the output of an empty shard (more shards than structures)
    structures = [
        atoms
        for path in args.inputs
        if not (Path(path).is_file() and Path(path).stat().st_size == 0)
        for atoms in _read_structures(path)
    ]
    if not structures:
        raise ValueError("the shard outputs hold no structures")
    missing = [i for i, atoms in enumerate(structures) if "input_index" not in atoms.info]
    if missing:
        raise ValueError(
            f"structures {missing[:10]} carry no info['input_index'] (not from --shard)"
        )
    out_format = output_format(args.output, len(structures))
    order = sorted(structures, key=lambda atoms: atoms.info["input_index"])
    indices = [atoms.info["input_index"] for atoms in order]
    if len(set(indices)) != len(indices):
        raise ValueError("the shard outputs overlap: some input_index appears twice")
    counts = {atoms.info.get("input_count") for atoms in order}
    if len(counts) > 1:
        raise ValueError(f"the shard outputs come from inputs of different sizes: {counts}")
    for key, what in _RUN_RECORD.items():
        values = {str(atoms.info[key]) for atoms in order if key in atoms.info}
        if len(values) > 1:
            raise ValueError(
                f"the shard outputs come from different {what} ({', '.join(sorted(values))}): "
                "merge the shards of one run"
            )
    count = counts.pop()
    expected = int(count) if count is not None else max(indices) + 1
    gaps = sorted(set(range(expected)) - set(indices))
    if gaps:
        raise ValueError(
            f"input structures {gaps[:10]} ({len(gaps)} of {expected}) are missing from the "
            "shard outputs: a shard's output is missing or incomplete"
        )
    _write_structures(args.output, order, out_format)
    print(f"wrote {len(order)} structure(s) in input order to {args.output}")
    return 0


def _check_eval_data(
    args: argparse.Namespace, datasets: list[Dataset], train: Dataset | None
) -> None:
    """Refuse, before any model is loaded, what `eval` could not score: for s2ef, --data
    frames (of the --max-frames sample) and --train frames (of the baseline's sample) without
    stored labels; for is2rs, --data systems without initial and relaxed frames and relaxed
    energies, and a --train without relaxed energies; a --train from another generated data
    set than a --data file. Each error names the option and the file."""
    from forcecalc import evaluate

    train_label = f"--train {args.train}"
    if train is not None:
        if args.task == "s2ef":
            baseline = evaluate.sample_frames(len(train), evaluate.MEDIAN_TRAIN_FRAMES)
            evaluate.check_frames(train, baseline, train_label, "to fit the median baseline on")
        else:
            evaluate.check_is2re_train(train, train_label)
    for path, dataset in zip(args.data, datasets, strict=True):
        label = f"--data {path}"
        if args.task == "s2ef":
            frames = evaluate.sample_frames(len(dataset), args.max_frames)
            evaluate.check_frames(dataset, frames, label)
        else:
            evaluate.check_is2rs_systems(dataset, args.max_systems, label=label)
        if train is not None:
            evaluate.check_same_dataset(train, dataset, train_label, label)


def _cmd_eval(args: argparse.Namespace) -> int:
    from forcecalc import evaluate
    from forcecalc.atomic import write_json
    from forcecalc.checkpoint import load_checkpoint
    from forcecalc.data import open_dataset

    if args.task == "s2ef":
        _check_at_least(args, "max_frames", 1)
    else:
        _check_at_least(args, "fmax", 0)
        _check_at_least(args, "steps", 0)
        _check_at_least(args, "max_systems", 1)
    if args.out:
        check_writable(args.out)
    names = [Path(path).stem for path in args.data]
    if len(set(names)) != len(names):
        raise ValueError(f"--data files must have distinct names (the report's keys): {names}")
    datasets = [open_dataset(path) for path in args.data]  # all readable before any work
    train = open_dataset(args.train) if args.train else None
    _check_eval_data(args, datasets, train)
    potential = load_checkpoint(
        args.model, device=args.device, dtype=args.dtype, allow_unsafe=args.allow_unsafe
    )
    potential = _with_kernels(potential, args)
    report: dict[str, dict] = {}
    for name, dataset in zip(names, datasets, strict=True):
        if args.task == "s2ef":
            row = {"model": evaluate.evaluate_s2ef(potential, dataset, max_frames=args.max_frames)}
            if train is not None:
                row["median"] = evaluate.median_s2ef_metrics(train, dataset, args.max_frames)
        else:
            row = evaluate.evaluate_relaxations(
                potential,
                dataset,
                optimizer=args.optimizer,
                fmax=args.fmax,
                steps=args.steps,
                max_systems=args.max_systems,
            )
            if train is not None:
                row["median_is2re"] = evaluate.median_is2re_metrics(
                    train, dataset, args.max_systems
                )
        report[name] = row
        print(_format_eval_row(name, row, args.task), flush=True)
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")
    what = "frames" if args.task == "s2ef" else "systems"
    counts = {name: row["model"] if args.task == "s2ef" else row for name, row in report.items()}
    failed = [f"{name}: {c['failed']} of {c[what]}" for name, c in counts.items() if c["failed"]]
    if failed:  # scored without them, as relax writes all and exits with 1
        print(
            f"forcecalc: error: {what} failed ({'; '.join(failed)}), left out of the scores and "
            "counted as 'failed' (the warnings name them)",
            file=sys.stderr,
        )
        return 1
    return 0


def _format_eval_row(name: str, row: dict, task: str) -> str:
    """The table line(s) of one split's results: scores (``n/a`` where every frame or
    system failed), and how many failed and were left out of them."""
    if task == "s2ef":
        lines = []
        for label, values in row.items():
            line = (
                f"{name:<14} {label:<7} energy MAE {_score(values['energy_mae'], '.4f', ' eV')}  "
                f"force MAE {_score(values['forces_mae'], '.4f', ' eV/Å')}  "
                f"force cos {_score(values['forces_cos'], '.3f')}  "
                f"EFwT {_score(values['efwt'], '.2%')}"
            )
            if "failed" in values:
                line += f"  failed {values['failed']} of {values['frames']} frames"
            lines.append(line)
        return "\n".join(lines)
    is2rs, is2re, base = row["is2rs"], row["is2re"], row["baseline_initial_structure"]
    text = (
        f"{name:<14} ADwT {_score(is2rs['adwt'], '.1%')}  AFbT {_score(is2rs['afbt'], '.1%')}  "
        f"IS2RE MAE {_score(is2re['energy_mae'], '.4f', ' eV')}  "
        f"EwT {_score(is2re['ewt'], '.1%')}  "
        f"converged {100 * row['converged']:.0f}% of {row['systems']}, failed {row['failed']}  "
        f"(initial structures: ADwT {100 * base['adwt']:.1f}%, AFbT {100 * base['afbt']:.1f}%)"
    )
    if "median_is2re" in row:
        text += f"  median IS2RE MAE {row['median_is2re']['energy_mae']:.4f} eV"
    return text


def _score(value: float | None, spec: str, unit: str = "") -> str:
    """A score in the table: ``value`` formatted by ``spec`` followed by ``unit``, or
    ``n/a`` for None (no frame or system left to score)."""
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def _check_md_args(args: argparse.Namespace) -> None:
    """``md``'s arguments: the physical ones in the ranges the Python ``md()`` accepts (NaN,
    inf and absurd values refused), the counts and the skin not below their least."""
    from forcecalc.relax.dynamics import check_md_option

    for option, name in (
        ("timestep", "timestep"),
        ("temperature", "temperature_K"),
        ("friction", "friction"),
    ):
        check_md_option(name, getattr(args, option), f"--{option}")
    _check_at_least(args, "seed", 0)
    _check_at_least(args, "steps", 0)
    _check_at_least(args, "log_interval", 1)
    _check_at_least(args, "skin", 0)


def _note_cuda_graph_off_cuda(args: argparse.Namespace, potential: Potential) -> None:
    """A note on stderr where ``--cuda-graph`` was asked for on a device without CUDA graphs:
    the same fixed-shape forward runs there without one (no faster; usually slower)."""
    if args.cuda_graph and potential.device.type != "cuda":
        print(
            f"forcecalc: note: --cuda-graph on {potential.device.type}: no CUDA graph there, "
            "the fixed-shape forward runs as it is (no faster there: use it on a GPU)",
            file=sys.stderr,
        )


def _note_energy_conservation(potential: Potential) -> None:
    """A note on stderr where ``potential``'s forces are no energy gradient (direct forces, or
    OCP's compat forces), whose dynamics conserve no energy."""
    if not potential.energy_gradient:
        print(
            f"forcecalc: note: the {potential.name} model predicts forces directly, not as an "
            "energy gradient: its dynamics conserve no energy (use spinconv-ec for MD)",
            file=sys.stderr,
        )
    elif not potential.defines_stress:
        print(
            "forcecalc: note: OCP's compat forces differentiate the energy through the distance "
            "features only, not the full -dE/dx: its dynamics conserve no energy (add --forces "
            "conservative)",
            file=sys.stderr,
        )


def _cmd_md(args: argparse.Namespace) -> int:
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.verlet import VelocityVerlet

    from forcecalc.calculator import load_calculator

    try:
        from ase.md.velocitydistribution import thermalize_momenta
    except ImportError:  # ASE < 3.29
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta

    _check_md_args(args)
    structures = _read_structures(args.input)
    if not -len(structures) <= args.index < len(structures):
        raise ValueError(
            f"--index {args.index} is out of range: {args.input} holds {len(structures)} "
            "structure(s)"
        )
    out_format = output_format(args.out, args.steps // args.log_interval + 1) if args.out else None
    atoms = structures[args.index]
    atoms.calc = load_calculator(
        args.model,
        device=args.device,
        dtype=args.dtype,
        allow_unsafe=args.allow_unsafe,
        skin=args.skin,
        cuda_graph=args.cuda_graph,
        compile_mode=args.compile,
        **_forces_option(args),
    )
    _note_energy_conservation(atoms.calc.potential)
    _note_cuda_graph_off_cuda(args, atoms.calc.potential)
    rng = np.random.default_rng(args.seed)
    if args.keep_momenta:
        if not atoms.get_momenta().any():
            print(
                f"forcecalc: note: structure {args.index} of {args.input} holds no momenta: "
                "--keep-momenta starts it at rest",
                file=sys.stderr,
            )
    else:
        thermalize_momenta(atoms, temperature_K=args.temperature, rng=rng)
    dt = args.timestep * units.fs
    if args.integrator == "verlet":
        dyn = VelocityVerlet(atoms, timestep=dt)
    else:
        dyn = Langevin(
            atoms,
            timestep=dt,
            temperature_K=args.temperature,
            friction=args.friction / units.fs,
            fixcm=False,
            rng=rng,
        )
    print(f"{'step':>6} {'time/fs':>9} {'E_pot':>12} {'E_kin':>10} {'E_total':>12} {'T/K':>8}")

    def log() -> None:
        epot = atoms.get_potential_energy()
        ekin = atoms.get_kinetic_energy()
        print(
            f"{dyn.nsteps:>6} {dyn.nsteps * args.timestep:>9.2f} {epot:>12.5f} {ekin:>10.5f} "
            f"{epot + ekin:>12.5f} {atoms.get_temperature():>8.1f}"
        )

    dyn.attach(log, interval=args.log_interval)
    atoms.get_potential_energy()  # the input's own problems (overlapping atoms): exit code 2
    if args.out:
        _run_saving_frames(dyn, atoms, args, out_format)
    else:
        _run_dynamics(dyn, args.steps)
    return 0


def _run_dynamics(dyn: MolecularDynamics, steps: int) -> None:
    """``dyn.run(steps)``; the calculator's refusal of positions the run made (two atoms
    within 0.01 Å) is a failed run (``CalculatorError``: exit code 1), naming the step."""
    from ase.calculators.calculator import CalculatorError

    try:
        dyn.run(steps)
    except ValueError as error:
        raise CalculatorError(f"md stopped in step {dyn.nsteps + 1}: {error}") from error


def _run_saving_frames(
    dyn: MolecularDynamics, atoms: Atoms, args: argparse.Namespace, out_format: str | None
) -> None:
    """Run ``dyn`` for ``args.steps`` steps, a frame every ``args.log_interval`` steps going to
    ``OUT.part`` (an ASE trajectory), then to ``args.out`` in ``out_format`` when the run ends:
    an earlier OUT survives a run that fails or is interrupted, and the frames written so far
    stay in OUT.part."""
    from ase.io import read
    from ase.io.trajectory import Trajectory

    from forcecalc.atomic import commit_file

    partial = Path(f"{args.out}.part")
    partial.parent.mkdir(parents=True, exist_ok=True)
    traj = Trajectory(partial, "w", atoms)
    dyn.attach(traj.write, interval=args.log_interval)
    try:
        _run_dynamics(dyn, args.steps)
    except BaseException:
        traj.close()
        print(
            f"forcecalc: md stopped; the frames written so far are in {partial} (an ASE "
            "trajectory)",
            file=sys.stderr,
        )
        raise
    traj.close()
    if out_format == "traj":
        commit_file(partial, Path(args.out))
    else:
        _write_structures(args.out, read(partial, index=":", format="traj"), out_format)
        partial.unlink()


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help, with each option's default where it has one to show (not for flags,
    nor for options whose help already says what their default is)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = action.option_strings and not (
            default is None or default is False or default == argparse.SUPPRESS
        )
        if shown and "default" not in text:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose usage errors are one line (``forcecalc relax: error: ...``,
    exit code 2), like forcecalc's own errors, instead of the usage block first, and whose
    help shows the options' defaults (its subcommands' parsers are of this class too)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(
            2, f"{self.prog}: error: {message}{self._swallowed(message)} (see {self.prog} --help)\n"
        )

    def _swallowed(self, message: str) -> str:
        """For a missing positional argument where an option takes several values (``finetune
        --data f.extxyz CHECKPOINT`` gives CHECKPOINT to --data): how to write it."""
        if not message.startswith("the following arguments are required"):
            return ""
        words = set(self._words)
        lists = [
            option
            for action in self._actions
            if action.nargs == "+"
            for option in action.option_strings
            if option in words
        ]
        missing = [a.metavar or a.dest for a in self._actions if not a.option_strings]
        missing = [name for name in missing if name in message]
        if not lists or not missing:
            return ""
        return (
            f"; {', '.join(lists)} takes every word after it: give {missing[0]} before it, or "
            "end its values with --"
        )

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """argparse's, remembering the words it parses (for :meth:`_swallowed`)."""
        self._words = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)


def _add_eval_commands(sub: argparse._SubParsersAction) -> None:
    """``eval s2ef`` and ``eval is2rs``, each with its own options (the frame sample for s2ef,
    the system sample and the relaxations' settings for is2rs)."""
    evaluation = sub.add_parser(
        "eval",
        help="evaluate a model on OC20-EMT splits (the papers' S2EF / IS2RS+IS2RE tables)",
        description="Score a model on OC20-EMT split files, with the papers' median baselines "
        "fitted on --train (a split of the same generated data set).",
    )
    tasks = evaluation.add_subparsers(dest="task", metavar="TASK", required=True)
    s2ef = tasks.add_parser(
        "s2ef",
        help="energies and forces of the stored frames (energy/force MAE, force cos, EFwT)",
        description="The model's energies and forces on every stored frame (or a seeded "
        "sample) against the stored labels; the median baseline beside it with --train.",
    )
    is2rs = tasks.add_parser(
        "is2rs",
        help="relax each system's initial structure (ADwT, AFbT; IS2RE: energy MAE, EwT)",
        description="Relax each system's initial structure with the model (forcecalc's "
        "batched engine) and score it against the stored relaxed structure (IS2RS) and energy "
        "(IS2RE); the IS2RE median baseline beside it with --train.",
    )
    for parser in (s2ef, is2rs):
        _add_model_options(parser)
        _add_kernels_option(parser)
        parser.add_argument("--data", nargs="+", required=True, help="split files (HDF5)")
        parser.add_argument(
            "--train",
            default=None,
            help="training split of the same data set, for the median baselines",
        )
        parser.add_argument("--out", default=None, help="write the results as JSON")
        parser.set_defaults(func=_cmd_eval)
    s2ef.add_argument("--max-frames", type=int, default=None, help="frame sample (default: all)")
    is2rs.add_argument("--max-systems", type=int, default=None, help="system sample (default: all)")
    is2rs.add_argument(
        "--optimizer",
        default="lbfgs",
        type=str.lower,
        choices=["fire", "lbfgs", "bfgs"],
        help="the relaxations' optimizer (forcecalc's batched engine; any case)",
    )
    is2rs.add_argument("--fmax", type=float, default=0.05, help="force threshold, eV/Å")
    is2rs.add_argument("--steps", type=int, default=300, help="maximum steps")


def _add_info_command(sub: argparse._SubParsersAction) -> None:
    """``forcecalc info [CHECKPOINT]``."""
    info = sub.add_parser(
        "info", help="show the installation and known checkpoints, or describe one checkpoint"
    )
    info.add_argument("checkpoint", nargs="?", help="a checkpoint file or name")
    info.add_argument("--allow-unsafe", action="store_true", help="allow full unpickling")
    info.set_defaults(func=_cmd_info)


def _add_convert_command(sub: argparse._SubParsersAction) -> None:
    """``forcecalc convert IN OUT``."""
    convert = sub.add_parser("convert", help="convert an OCP checkpoint to forcecalc's format")
    convert.add_argument("input", help="OCP checkpoint (.pt) or name")
    convert.add_argument("output", help="where to write the forcecalc checkpoint")
    convert.add_argument("--allow-unsafe", action="store_true", help="allow full unpickling")
    convert.add_argument(
        "--overwrite", action="store_true", help="replace OUT if it exists (else an error)"
    )
    convert.set_defaults(func=_cmd_convert)


def _add_relax_command(sub: argparse._SubParsersAction) -> None:
    """``forcecalc relax INPUT``: ASE's optimizers one by one, or the batched engine."""
    relax = sub.add_parser(
        "relax",
        help="relax structures with an ASE optimizer",
        description="Relax every structure of INPUT (any file ASE reads) to --fmax. A structure "
        "the model fails on (a NaN or infinite output) ends with info['relax_error'], the others "
        "go on; all are written, and the exit code is 1 if any failed (2: bad arguments or "
        "inputs).",
    )
    relax.add_argument("input", help="structure file (extxyz, POSCAR, traj, ASE db, ...)")
    _add_model_options(relax)
    relax.add_argument("--fmax", type=float, default=0.05, help="force threshold, eV/Å")
    relax.add_argument("--steps", type=int, default=300, help="maximum optimizer steps")
    relax.add_argument(
        "--optimizer",
        default="BFGS",
        type=str.upper,
        choices=["BFGS", "LBFGS", "FIRE"],
        help="ASE optimizer (any case)",
    )
    relax.add_argument(
        "--fix-below",
        type=float,
        default=None,
        help="also fix the atoms with z below this (Å), keeping the input's constraints",
    )
    _add_forces_option(relax)
    relax.add_argument(
        "--out",
        default=None,
        help="write the relaxed structures here, each with its final energy and forces; the "
        "format follows the name (.extxyz, .traj, CONTCAR, ...; extxyz for other names "
        "without a suffix), checked before "
        "relaxing",
    )
    relax.add_argument(
        "--trajectory",
        default=None,
        metavar="DIR",
        help="also write each structure's relaxation, every step with its energy and forces "
        "(the input first), to DIR/INDEX.traj, INDEX its place in INPUT (ASE trajectories, "
        "as the optimizers' trajectory=...; a structure's file replaces an earlier one, other "
        "files in DIR stay; with --batched all frames are held in memory until the end)",
    )
    relax.add_argument(
        "--batched",
        action="store_true",
        help="relax many structures per forward pass (forcecalc's engine; same results as "
        "ASE's optimizers, much faster on a GPU)",
    )
    relax.add_argument(
        "--batch-size", default="auto", help="structures per batch with --batched (or 'auto')"
    )
    relax.add_argument(
        "--skin",
        type=float,
        default=None,
        help="neighbor-list skin, Å (reuse between steps; default: 0 one by one and on the "
        "CPU, 0.5 batched on CUDA)",
    )
    _add_cuda_graph_option(relax)
    _add_kernels_option(relax)
    relax.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="relax only shard I of N (1-based) of the input, e.g. for a SLURM array; each "
        "output structure keeps info['input_index'] so the shards' outputs can be merged",
    )
    relax.set_defaults(func=_cmd_relax)


def _add_merge_command(sub: argparse._SubParsersAction) -> None:
    """``forcecalc merge OUT SHARDS...``."""
    merge = sub.add_parser(
        "merge",
        help="merge the outputs of 'forcecalc relax --shard I/N' runs back into input order",
    )
    merge.add_argument(
        "output",
        help="merged structure file (format from the name, as for relax --out)",
    )
    merge.add_argument("inputs", nargs="+", help="the shards' --out files")
    merge.set_defaults(func=_cmd_merge)


def _add_md_command(sub: argparse._SubParsersAction) -> None:
    """``forcecalc md INPUT``: ASE's velocity Verlet or Langevin with a calculator."""
    md = sub.add_parser("md", help="molecular dynamics (velocity Verlet or Langevin)")
    md.add_argument("input", help="structure file")
    _add_model_options(md)
    md.add_argument(
        "--index", type=int, default=0, help="which structure of INPUT (0-based; -1: the last)"
    )
    md.add_argument(
        "--integrator",
        default="langevin",
        type=str.lower,
        choices=["verlet", "langevin"],
        help="verlet: NVE; langevin: NVT at --temperature",
    )
    md.add_argument(
        "--temperature",
        type=float,
        default=300.0,
        help="K: Langevin's, and the initial velocities' unless --keep-momenta",
    )
    md.add_argument(
        "--keep-momenta",
        action="store_true",
        help="start from the momenta stored in the input (e.g. the last frame of an earlier "
        "run's --out) instead of drawing them at --temperature",
    )
    md.add_argument("--timestep", type=float, default=1.0, help="fs")
    md.add_argument("--steps", type=int, default=100, help="MD steps")
    md.add_argument("--friction", type=float, default=0.01, help="Langevin friction, 1/fs")
    md.add_argument(
        "--seed", type=int, default=0, help="seed of the initial velocities and Langevin noise"
    )
    md.add_argument(
        "--log-interval",
        type=int,
        default=10,
        help="print a line, and save a frame to --out, every this many steps (and at step 0)",
    )
    md.add_argument(
        "--out",
        default=None,
        help="trajectory: a frame every --log-interval steps, with energy, forces and momenta; "
        "the format follows the name (.traj, .extxyz, ...; extxyz for a name without a "
        "suffix that ASE does not know); frames are "
        "saved to OUT.part as the run goes, then OUT is written when it ends",
    )
    md.add_argument(
        "--skin", type=float, default=0.0, help="neighbor-list skin, Å (reuse between steps)"
    )
    _add_forces_option(md)
    _add_cuda_graph_option(md)
    md.set_defaults(func=_cmd_md)


#: The destinations of the subcommand levels, outermost first (``forcecalc eval s2ef``).
_SUBCOMMANDS = ("command", "task", "data_command")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``forcecalc`` command."""
    parser = _Parser(
        prog="forcecalc",
        description="SpinConv and ForceNet force fields (Open Catalyst Project) for ASE.",
    )
    parser.add_argument("--version", action="version", version=f"forcecalc {forcecalc.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_info_command(sub)
    _add_convert_command(sub)
    _add_relax_command(sub)
    _add_eval_commands(sub)
    _add_merge_command(sub)
    _add_md_command(sub)
    add_data_commands(sub)
    add_train_commands(sub)
    return parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommands of ``parser`` by name (none for a command without any)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _option_before_task(parser: argparse.ArgumentParser, argv: Sequence[str]) -> str | None:
    """The usage error for an option written between a command and its task (``forcecalc eval
    --model X s2ef``: argparse would call the option's value an invalid task), else None."""
    if len(argv) < 2 or not argv[1].startswith("-") or argv[1] in ("-h", "--help"):
        return None
    command = _subcommands(parser).get(argv[0])
    tasks = _subcommands(command) if command is not None else {}
    if not tasks:
        return None
    where = f"forcecalc {argv[0]}"
    return (
        f"{where}: error: {argv[1]} comes before the task: name the task first, then its "
        f"options ({where} {'|'.join(tasks)} {argv[1]} ...; see {where} --help)"
    )


def _one_line_warnings(fallback: Callable[..., None]) -> Callable[..., None]:
    """A ``warnings.showwarning`` that shows a :class:`ForcecalcWarning` as one line,
    ``forcecalc: warning: ...``, as its errors are shown, and others by ``fallback``."""

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: Any = None,
        line: str | None = None,
    ) -> None:
        if issubclass(category, ForcecalcWarning):
            print(f"forcecalc: warning: {' '.join(str(message).splitlines())}", file=sys.stderr)
        else:
            fallback(message, category, filename, lineno, file, line)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``forcecalc`` command: a bad argument or input (``ValueError``), a
    failed file operation (``OSError``) or something not implemented ends with one line on
    stderr, ``forcecalc: error: ...``, and exit code 2; a model that failed (ASE's
    ``CalculatorError``, e.g. a non-finite output) the same with exit code 1; Ctrl-C with
    ``forcecalc: interrupted`` and exit code 130, as a shell reports it; other exceptions (a
    bug) propagate."""
    from ase.calculators.calculator import CalculatorError

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    misplaced = _option_before_task(parser, argv)
    if misplaced:
        print(misplaced, file=sys.stderr)
        return 2
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the (sub)command that does not know them, with its own --help
        where = " ".join(
            ["forcecalc"]
            + [str(getattr(args, dest)) for dest in _SUBCOMMANDS if getattr(args, dest, None)]
        )
        print(
            f"{where}: error: unrecognized arguments: {' '.join(unknown)} (see {where} --help)",
            file=sys.stderr,
        )
        return 2
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 1
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(warnings.showwarning)
            return int(args.func(args) or 0)
    except KeyboardInterrupt:  # outputs are written atomically: nothing half-written
        print("forcecalc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of the output stopped early (forcecalc info | head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError, NotImplementedError) as error:
        message = " ".join(str(error).splitlines())  # one line, whatever the exception says
        print(f"forcecalc: error: {message}", file=sys.stderr)
        return 2
    except CalculatorError as error:  # the model failed (a non-finite output): exit code 1
        message = " ".join(str(error).splitlines())
        print(f"forcecalc: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
