"""Speed of our SpinConv-All and ForceNet (hidden 512, 5 layers) configurations beside the
original's, and of batched relaxation beside one-by-one ASE relaxation.

Prints tables and writes JSON (atomically):

1. Model forward (float32, forces without autograd: both configurations predict forces
   directly, random weights as in the original's measurement), OC20-size Cu(111) + CO slabs of
   38, 66 and 146 atoms: milliseconds per structure at batch 1, and atoms per second for a
   batch of ``--batch`` 66-atom structures; on the CPU and on CUDA when available.  Beside
   them, the original's figures: with ``--original-src DIR`` measured in the same run, the
   original (OCP's code, imported from a fairchem checkout, see ``original.py``) and ours
   taking turns on the same structures with the same weights, with how far their outputs
   are apart; otherwise quoted from ``shared/fixtures/ocp/README.md`` (measured by its
   authors on the same machine types).
2. One ASE step (``atoms.get_forces()`` after a move: graph, forward, transfer) with our
   calculator at batch 1, the figure the issue's "ms per ASE step" target refers to; for
   both models also with ``cuda_graph=True`` (on the CPU: the fixed-shape forward without a
   graph), without and with a 1 Å neighbor-list skin, on CUDA also with the skin and the
   replayed forward compiled (``compile_mode="default"``), with the largest force difference
   to the plain step, and the replayed forward alone.
3. With ``--relax``: ``benchmarks/relax_speed.py`` (batched ``forcecalc.relax`` vs one-by-one
   ASE relaxation with our calculator), with its own options after ``--relax-args``.

    python benchmarks/speed.py --out benchmarks/results/speed_cpu.json [--batch 32 --repeats 3]
    python benchmarks/speed.py --devices cuda --batch 32 256 --repeats 20 [--tf32]
        [--compile] [--triton]
    python benchmarks/speed.py --relax --relax-args --n 64 --model spinconv-fc
    python benchmarks/speed.py --devices cpu --batch --skip-ase-step --original-src DIR
"""

from __future__ import annotations

import argparse
import ast
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.build import add_adsorbate, fcc111, molecule

from forcecalc.atomic import write_json
from forcecalc.compiled import COMPILE_MODES, compiled_blocks
from forcecalc.graph import Batch
from forcecalc.models.registry import build_model

CONFIGS = {
    "spinconv_all": (
        "spinconv",
        {
            "hidden_channels": 32,
            "mid_hidden_channels": 256,
            "num_interactions": 3,
            "num_basis_functions": 512,
            "sphere_size_lat": 16,
            "sphere_size_long": 12,
            "max_num_neighbors": 40,
            "cutoff": 6.0,
            "force_estimator": "random",
            "num_rand_rotations": 5,
            "scale_distances": True,
            "basis_width_scalar": 3.0,
        },
    ),
    "forcenet_all": (
        "forcenet",
        {
            "hidden_channels": 512,
            "decoder_hidden_channels": 512,
            "num_interactions": 5,
            "cutoff": 6.0,
            "basis": "sphallmul",
            "feat": "full",
            "max_n": 3,
        },
    ),
}


#: The original's figures (shared/fixtures/ocp/README.md): ms per structure at batch 1 on an
#: H100 and on this 2-core CPU (by structure size), and batched atoms/s on an H100.
ORIGINAL = {
    "spinconv_all": {"cuda_ms": 45.0, "cuda_atoms_per_s": 8400.0, "cpu_ms": {38: 535.0, 66: 828.0}},
    "forcenet_all": {"cuda_ms": 13.0, "cuda_atoms_per_s": 15000.0, "cpu_ms": {}},
}
#: Slab repeats giving the issue's structure sizes (16 * layers + 2 or 9 * layers + 2 atoms).
SIZES = {38: (3, 3, 4), 66: (4, 4, 4), 146: (4, 4, 9)}


def structure(n_atoms: int, seed: int) -> Atoms:
    """A rattled Cu(111) slab with CO of ``n_atoms`` atoms (a key of ``SIZES``), OC20 style."""
    slab = fcc111("Cu", size=SIZES[n_atoms], vacuum=7.5)
    slab.pbc = True
    co = molecule("CO")
    co.rotate(180, "x")
    add_adsorbate(slab, co, 1.8, "fcc", mol_index=1)
    slab.rattle(0.05, seed=seed)
    return slab


def cpu_name() -> str:
    """The CPU's model name with its family and model numbers (``/proc/cpuinfo`` on Linux:
    virtual machines often report a generic name, the numbers tell the generation), else what
    ``platform`` knows."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(
        (key.strip(), value.strip())
        for key, _, value in (line.partition(":") for line in text.splitlines())
        if key.strip() in ("model name", "cpu family", "model", "vendor_id")
    )
    return (
        f"{fields.get('model name', platform.machine())} ({fields.get('vendor_id', '?')}, "
        f"family {fields.get('cpu family', '?')}, model {fields.get('model', '?')}, "
        f"{os.cpu_count()} cores)"
    )


def hardware(tf32: bool) -> dict:
    """The machine a benchmark ran on, for its JSON."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "cpu": cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "tf32": tf32,
    }


def time_calls(calls: list[Callable[[], object]], cuda: bool, repeats: int) -> list[list[float]]:
    """Seconds of ``repeats + 1`` calls of each of ``calls`` (the first is the warm-up; with
    ``torch.compile`` the compilation), ``[call][round]``.  The calls take turns, one round
    after the other, so a slow spell of a shared machine falls on all of them alike."""
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats + 1):
        for call, seconds in zip(calls, times, strict=True):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            call()
            if cuda:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
    return times


def forward_call(model: torch.nn.Module, batch: Batch) -> Callable[[], object]:
    """One forward pass of our ``model`` on ``batch`` without autograd."""

    def call() -> object:
        with torch.no_grad():
            return model(batch)

    return call


def original_call(model: torch.nn.Module, data: object) -> Callable[[], object]:
    """One forward pass of the original ``model`` without autograd, as its figures in
    ``shared/fixtures/ocp/README.md`` were measured (under ``torch.no_grad`` its SpinConv
    turns autograd back on for its input positions)."""

    def call() -> object:
        with torch.inference_mode():
            return model(data)

    return call


def ase_step_seconds(atoms: Atoms, repeats: int) -> float:
    """Median seconds of one ``atoms.get_forces()`` (its calculator attached) after a small
    random move, over ``repeats`` steps after one warm-up step."""
    rng = np.random.default_rng(0)
    times = []
    for _ in range(repeats + 1):
        atoms.positions = atoms.positions + rng.normal(scale=1e-3, size=atoms.positions.shape)
        start = time.perf_counter()
        atoms.get_forces()
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))


#: Neighbor-list skin (Å) of the last ASE-step row: the graph rebuilt only when an atom moved
#: by half of it (the benchmark's steps move atoms by ~1e-3 Å).
ASE_STEP_SKIN = 1.0


def time_ase_step(
    name: str,
    model: torch.nn.Module,
    device: str,
    repeats: int,
    cuda_graph: bool = False,
    skin: float = 0.0,
    compile_mode: str | None = None,
) -> tuple[float, np.ndarray]:
    """:func:`ase_step_seconds` of our calculator around ``model`` (66 atoms), optionally
    replaying CUDA graphs (of a compiled forward) and with a neighbor-list skin, and the
    forces it gives for the unmoved structure."""
    from forcecalc.calculator import load_calculator
    from forcecalc.checkpoint import CheckpointInfo, Normalizers, Potential

    kind, kwargs = CONFIGS[name]
    info = CheckpointInfo(kind, dict(kwargs), Normalizers(), "forcecalc")
    calc = load_calculator(
        Potential(model, info),
        device=device,
        dtype="float32",
        cuda_graph=cuda_graph,
        skin=skin,
        compile_mode=compile_mode,
    )
    forces = calc.get_forces(structure(66, 0))
    atoms = structure(66, 0)
    atoms.calc = calc
    return ase_step_seconds(atoms, repeats), forces


def time_replay(model: torch.nn.Module, device: str, repeats: int) -> float:
    """Median seconds of one replayed fixed-shape forward of the 66-atom slab (its inputs
    built once on the CPU; the copies to the device included)."""
    from forcecalc.replay import GraphReplay

    batch = Batch.from_atoms([structure(66, 0)], cutoff=model.cutoff).to(dtype=torch.float32)
    inputs = model.fixed_shape_inputs(batch)
    replay = GraphReplay(model.fixed_shape_forward, device)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        replay(inputs)["forces"].cpu()
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))


def ase_step_rows(
    name: str, runner: torch.nn.Module, device: str, args: argparse.Namespace
) -> list[dict]:
    """One ASE step with our calculator; for a model with a fixed-shape forward also with
    ``cuda_graph=True`` (not with ``--compile``), without and with a skin of
    ``ASE_STEP_SKIN`` (on CUDA also with the skin and ``compile_mode="default"``), each with
    its forces' largest difference to the plain step's, and the replayed forward alone."""
    variants = [(False, 0.0, None)]
    if getattr(runner, "fixed_shapes", False) and not args.compile:
        variants += [(True, 0.0, None), (True, ASE_STEP_SKIN, None)]
        if device == "cuda":
            variants.append((True, ASE_STEP_SKIN, "default"))
    rows, plain_forces = [], None
    for cuda_graph, skin, mode in variants:
        seconds, forces = time_ase_step(name, runner, device, args.repeats, cuda_graph, skin, mode)
        row = {
            "model": name,
            "device": device,
            "what": "ase_step",
            "atoms_per_structure": 66,
            "batch": 1,
            "ms_per_structure": 1000 * seconds,
            "compiled": args.compile,
            "triton": args.triton if name.startswith("spinconv") else None,
            "cuda_graph": cuda_graph,
            "skin": skin,
            "compile_mode": mode,
        }
        if plain_forces is None:
            label, plain_forces = "ASE step, 66 atoms, ms", forces
        else:
            label = "ASE step, graph" + (f", skin {skin:g}" if skin else "")
            label += ", compiled" if mode else ""
            difference = float(np.abs(forces - plain_forces).max())
            row["max_force_difference_to_plain"] = difference
            row["max_force_difference_relative"] = difference / float(np.abs(plain_forces).max())
        rows.append(row)
        print(f"{name:<14}{device:<7}{label:<24}{1000 * seconds:>12.1f}")
    if len(variants) > 1:
        seconds = time_replay(runner, device, args.repeats)
        rows.append(
            {
                "model": name,
                "device": device,
                "what": "replayed_forward",
                "atoms_per_structure": 66,
                "batch": 1,
                "ms_per_structure": 1000 * seconds,
                "cuda_graph": True,
                "triton": args.triton if name.startswith("spinconv") else None,
            }
        )
        print(f"{name:<14}{device:<7}{'replayed forward, ms':<24}{1000 * seconds:>12.1f}")
    return rows


def available_devices(parser: argparse.ArgumentParser, devices: list[str] | None) -> list[str]:
    """``devices``, each checked (``parser.error`` naming one that is unknown or missing here),
    or by default the CPU and, when there is one, CUDA."""
    from forcecalc.checkpoint import resolve_device

    for device in devices or []:
        try:
            resolve_device(device)
        except ValueError as error:
            parser.error(str(error))
    return devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def original_models(parser: argparse.ArgumentParser, src: str | None) -> dict[str, type] | None:
    """The original's model classes from ``--original-src`` (see ``original.py``), or None;
    ``parser.error`` if they cannot be imported from there."""
    if not src:
        return None
    import original

    try:
        return original.import_models(src)
    except (ImportError, OSError) as error:
        parser.error(f"--original-src {src}: cannot import the original models: {error}")


def same_weights(model: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """Give our ``model`` the original model's weights (the same parameter names: ours load
    OCP's checkpoints as they are), so both compute the same function."""
    result = model.load_state_dict(theirs.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"the original's weights do not fit ours: {result}")


def compare_outputs(name: str, ours: dict, theirs: tuple) -> dict:
    """How far our forward's outputs are from the original's ``(energy, forces)`` on the same
    batch (raw model outputs, no normalizers), relative to their size (random weights give
    outputs far from eV scale): largest energy difference over largest energy, and largest
    force component difference over largest force component.  SpinConv's forces are left
    out: with ``force_estimator="random"`` the original draws new rotations per atom at every
    call, ours uses fixed ones."""
    energy, their_energy = ours["energy"].view(-1), theirs[0].view(-1).to(ours["energy"])
    out = {
        "energy_relative_difference": float(
            (energy - their_energy).abs().max() / their_energy.abs().max()
        )
    }
    if not name.startswith("spinconv"):
        forces, their_forces = ours["forces"], theirs[1].to(ours["forces"])
        out["force_relative_difference"] = float(
            (forces - their_forces).abs().max() / their_forces.abs().max()
        )
    return out


def quoted_original(name: str, device: str, n_atoms: int, per_structure: bool) -> float | None:
    """The original's figure from ``ORIGINAL`` for a row: ms per structure at batch 1
    (``per_structure``), else batched atoms per second; None where none was measured."""
    quoted = ORIGINAL[name]
    if device == "cuda":
        return quoted["cuda_ms"] if per_structure else quoted["cuda_atoms_per_s"]
    return quoted["cpu_ms"].get(n_atoms) if per_structure else None


def model_rows(args: argparse.Namespace, classes: dict[str, type] | None) -> list[dict]:
    devices = args.devices
    rows = []
    print(f"{'model':<14}{'device':<7}{'what':<24}{'ours':>12}{'original':>12}{'speed-up':>10}")
    for name in args.models:
        kind, kwargs = CONFIGS[name]
        torch.manual_seed(0)
        model = build_model(kind, kwargs).eval()
        theirs = None
        if classes is not None:
            import original

            torch.manual_seed(0)
            theirs = original.build(classes, kind, kwargs)
            same_weights(model, theirs)
        for device in devices:
            model = model.to(device=device, dtype=torch.float32)
            runner = model
            if args.triton and kind == "spinconv":
                from forcecalc.models.triton_kernels import with_triton_kernels

                runner = with_triton_kernels(runner, args.triton)
            if args.compile:
                runner = compiled_blocks(runner, args.compile)
            if theirs is not None:
                theirs = theirs.to(device=device, dtype=torch.float32)
            cases = [(size, 1) for size in args.sizes] + [(66, batch) for batch in args.batch]
            for n_atoms, batch_size in cases:
                atoms = [structure(n_atoms, seed) for seed in range(batch_size)]
                batch = Batch.from_atoms(atoms, cutoff=model.cutoff).to(device, torch.float32)
                calls = [forward_call(runner, batch)]
                if theirs is not None:
                    data = original.batch(atoms, device)
                    calls.append(original_call(theirs, data))
                timings = time_calls(calls, device == "cuda", args.repeats)
                first, seconds = timings[0][0], float(np.median(timings[0][1:]))
                if runner is not model:
                    with torch.no_grad():
                        eager = model(batch)["forces"]
                        difference = (runner(batch)["forces"] - eager).abs().max()
                    runner_error = float(difference / eager.abs().max())
                row = {
                    "model": name,
                    "device": device,
                    "what": "forward",
                    "atoms_per_structure": n_atoms,
                    "batch": batch_size,
                    "ms_per_structure": 1000 * seconds / batch_size,
                    "atoms_per_second": batch.n_atoms / seconds,
                    "compiled": args.compile,
                    "triton": args.triton if runner is not model and kind == "spinconv" else None,
                    "first_call_seconds": first,
                }
                if runner is not model:
                    row["max_force_difference_to_eager_relative"] = runner_error
                per_structure = batch_size == 1
                label = f"{n_atoms} atoms, ms" if per_structure else f"batch {batch_size}, atoms/s"
                ours = row["ms_per_structure" if per_structure else "atoms_per_second"]
                if theirs is not None:
                    their_seconds = float(np.median(timings[1][1:]))
                    rounds = np.array(timings[1][1:]) / np.array(timings[0][1:])
                    with torch.no_grad():
                        row |= compare_outputs(name, model(batch), calls[1]())
                    row |= {
                        "original_source": "measured",
                        "original_ms_per_structure": 1000 * their_seconds / batch_size,
                        "original_atoms_per_second": batch.n_atoms / their_seconds,
                        "speedup_per_round": rounds.tolist(),
                    }
                    theirs_value = row[
                        "original_ms_per_structure"
                        if per_structure
                        else "original_atoms_per_second"
                    ]
                    speedup = float(np.median(rounds))
                else:
                    theirs_value = quoted_original(name, device, n_atoms, per_structure)
                    speedup = None
                    if theirs_value is not None:
                        row["original_source"] = "quoted (shared/fixtures/ocp/README.md)"
                        speedup = theirs_value / ours if per_structure else ours / theirs_value
                row.update(original=theirs_value, speedup=speedup)
                rows.append(row)
                differences = [
                    f"{key.split('_')[0]} {row[key]:.1e}"
                    for key in row
                    if key.endswith("difference")
                ]
                print(
                    f"{name:<14}{device:<7}{label:<24}{ours:>12.1f}"
                    f"{'-' if theirs_value is None else f'{theirs_value:.1f}':>12}"
                    f"{'-' if speedup is None else f'{speedup:.2f}x':>10}"
                    + (f"  (relative differences: {', '.join(differences)})" if differences else "")
                )
            if not args.skip_ase_step:
                rows.extend(ase_step_rows(name, runner, device, args))
    return rows


def kernel_constants(
    parser: argparse.ArgumentParser, settings: list[str], triton: str | None
) -> dict[str, Any]:
    """Set ``NAME=VALUE`` module constants of the fused kernels (timed with ``--triton``
    ``triton``); returns them by name."""
    if not settings:
        return {}
    if not triton:
        parser.error("--kernel-constants sets the fused kernels' constants: it needs --triton")
    from forcecalc.models import triton_kernels

    constants: dict[str, Any] = {}
    for setting in settings:
        name, _, text = setting.partition("=")
        if not name.isupper() or not hasattr(triton_kernels, name):
            parser.error(f"--kernel-constants: {name!r} is no constant of triton_kernels")
        try:
            constants[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            parser.error(f"--kernel-constants: {setting!r} is not NAME=VALUE (a Python literal)")
        setattr(triton_kernels, name, constants[name])
    return constants


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--batch", type=int, nargs="*", default=[32], help="batched rows: structures per batch"
    )
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu and cuda")
    parser.add_argument("--tf32", action="store_true", help="CUDA: float32 matrix products in TF32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        choices=list(COMPILE_MODES),
        help="time the models with their blocks compiled by torch.compile (SpinConv's spin "
        "convolutions, ForceNet's interactions; dynamic shapes, mode MODE; the first call, "
        "with the compilation, apart)",
    )
    parser.add_argument(
        "--triton",
        nargs="?",
        const="tf32x3",
        default=None,
        choices=["tf32x3", "mixed", "tf32", "ieee"],
        help="time SpinConv with the fused Triton kernels (forcecalc.models.triton_kernels; "
        "with_triton_kernels precision PRECISION, default tf32x3), with the largest force "
        "difference to the PyTorch path",
    )
    parser.add_argument(
        "--kernel-constants",
        nargs="+",
        default=[],
        metavar="NAME=VALUE",
        help="with --triton: set these module constants of forcecalc.models.triton_kernels "
        "first (e.g. SPECTRA_ONE_PRODUCT=True; the tile variants of triton_tiles.py)",
    )
    parser.add_argument("--skip-ase-step", action="store_true", help="no ASE-step rows")
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="*",
        default=list(SIZES),
        choices=list(SIZES),
        help="atoms of the batch-1 rows",
    )
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--relax", action="store_true", help="also run relax_speed.py")
    parser.add_argument(
        "--relax-args", nargs=argparse.REMAINDER, default=[], help="options of relax_speed.py"
    )
    parser.add_argument(
        "--original-src",
        default=None,
        metavar="DIR",
        help="time the original implementation side by side, imported from DIR, a checkout "
        "of FAIR-Chem/fairchem at e7a8745eb (see original.py), with the same weights",
    )
    parser.add_argument("--out", default="benchmarks/results/speed.json")
    args = parser.parse_args()
    args.devices = available_devices(parser, args.devices)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    constants = kernel_constants(parser, args.kernel_constants, args.triton)

    rows = model_rows(args, original_models(parser, args.original_src))
    write_json(
        args.out,
        {
            "benchmark": "speed",
            "hardware": hardware(args.tf32),
            "compile": args.compile,
            "triton": args.triton,
            "kernel_constants": constants,
            "rows": rows,
        },
    )
    print(f"wrote {args.out}")
    if args.relax:
        import relax_speed

        relax_speed.main(args.relax_args)


if __name__ == "__main__":
    main()
