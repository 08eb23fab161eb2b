"""Error of TF32 matrix products against the original's float64 reference outputs.

For each OCP fixture checkpoint found (``tests/data/ocp`` and ``../shared/fixtures/ocp``), the
fixture structures are evaluated on ``--device`` in float32, once with full float32 matrix
products and once with TF32 ones (``torch.backends.cuda.matmul.allow_tf32``, cuDNN likewise),
and compared with the original's float64 outputs (``reference.json``). Printed and written as
JSON per model: the largest energy error (eV) and force error (relative to the structure's
largest reference force), beside the tolerances the float32 fixture tests use (2e-3 eV, times
|E| / 20 above 20 eV, and 2e-3 x max|F|), over the structures without a tie at the
max-neighbor cut, as in those tests. On the CPU both runs are float32 (TF32 is a CUDA
feature), which checks the script.

With ``--shipped``, also the shipped weights' force MAE on OC20-EMT check frames (EMT labels)
with and without TF32.

With ``--triton``, also SpinConv with the fused Triton kernels
(``forcecalc/models/triton_kernels.py``) at ``tf32x3``, ``mixed`` and ``tf32`` products, and
at ``tf32x3`` with PyTorch's remaining products in TF32.

    python benchmarks/tf32_error.py --device cuda --shipped --out DIR/tf32_error_cuda.json
    python benchmarks/tf32_error.py --device cuda --triton --out DIR/tf32_error_triton.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from forcecalc.atomic import write_json
from forcecalc.checkpoint import Potential
from forcecalc.graph import Batch

ROOT = Path(__file__).resolve().parents[1]
#: Where fixture checkpoints are looked for: the small ones in the repository, the large ones
#: in ``$FORCECALC_OCP_FIXTURES/checkpoints`` (as for the tests) or ``../shared``.
FOLDERS = (
    ROOT / "tests" / "data" / "ocp",
    Path(os.environ.get("FORCECALC_OCP_FIXTURES", ROOT.parent / "shared" / "fixtures" / "ocp"))
    / "checkpoints",
)
#: The float32 tolerances of the fixture tests (tests/models/test_spinconv.py, test_forcenet.py).
ENERGY_TOLERANCE_EV = 2e-3
FORCE_TOLERANCE = 2e-3


def checkpoint(name: str) -> Path | None:
    """Path of fixture checkpoint ``name``, or None."""
    for folder in FOLDERS:
        if (folder / f"{name}.pt").exists():
            return folder / f"{name}.pt"
    return None


def errors(potential: Potential, structures: dict, results: dict, device: str) -> dict:
    """Largest energy error (eV), its tolerance use, and largest relative force error."""
    worst_energy, worst_energy_ratio, worst_force = 0.0, 0.0, 0.0
    for name, expected in results.items():
        if expected["tie_cut"]:  # a tie at the max-neighbor cut: no single right answer
            continue
        batch = Batch.from_atoms([structures[name]], cutoff=potential.cutoff).to(
            device, torch.float32
        )
        with torch.no_grad():  # energy-centric models take their own gradient
            out = potential(batch)
        energy = float(out["energy"][0])
        forces = out["forces"].detach().cpu().double().numpy()
        reference = np.asarray(expected["forces"])
        scale = max(1.0, abs(expected["energy"]) / 20.0)
        error = abs(energy - expected["energy"])
        worst_energy = max(worst_energy, error)
        worst_energy_ratio = max(worst_energy_ratio, error / (ENERGY_TOLERANCE_EV * scale))
        worst_force = max(
            worst_force, float(np.abs(forces - reference).max() / np.abs(reference).max())
        )
    return {
        "max_energy_error_eV": worst_energy,
        "energy_error_over_tolerance": worst_energy_ratio,
        "max_force_error_relative": worst_force,
        "force_error_over_tolerance": worst_force / FORCE_TOLERANCE,
    }


def set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def shipped_rows(device: str) -> list[dict]:
    """Force MAE of each shipped model on the check-sample frames (OC20-EMT tiny, EMT labels)
    with float32 and with TF32 matrix products, and the largest force difference between the
    two runs."""
    from forcecalc.checkpoint import load_checkpoint
    from forcecalc.evaluate import check_sample, stacked_forces
    from forcecalc.metrics import forces_mae
    from forcecalc.predict import predict

    frames = check_sample()
    true, _, fixed = stacked_forces(frames)
    rows = []
    print(f"{'shipped model':<16}{'MAE float32':>12}{'MAE tf32':>10}{'max|F32-TF32|':>15}")
    for name in ("spinconv-fc", "spinconv-ec", "forcenet"):
        potential = load_checkpoint(name, device=device)
        runs = {}
        for tf32 in (False, True):
            set_tf32(tf32)
            runs[tf32] = np.concatenate([r["forces"] for r in predict(frames, potential)])
        set_tf32(False)
        row = {
            "model": name,
            "forces_mae_float32": forces_mae(runs[False], true, fixed),
            "forces_mae_tf32": forces_mae(runs[True], true, fixed),
            "max_force_difference": float(np.abs(runs[True] - runs[False]).max()),
        }
        rows.append(row)
        print(
            f"{name:<16}{row['forces_mae_float32']:>12.5f}{row['forces_mae_tf32']:>10.5f}"
            f"{row['max_force_difference']:>15.2e}"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="*", default=None, help="fixture names (default: all)")
    parser.add_argument(
        "--shipped", action="store_true", help="also the shipped weights on OC20-EMT frames"
    )
    parser.add_argument(
        "--triton",
        action="store_true",
        help="also SpinConv with the fused Triton kernels (tf32x3, mixed and tf32 products; on "
        "the CPU only in Triton's interpreter, TRITON_INTERPRET=1, where the products are "
        "float32 and only mixed's rounding differs)",
    )
    parser.add_argument("--out", default="benchmarks/results/tf32_error.json")
    args = parser.parse_args(argv)

    from ase.io import read

    from forcecalc.checkpoint import load_checkpoint

    data = ROOT / "tests" / "data" / "ocp"
    reference = json.loads((data / "reference.json").read_text())
    structures = {a.info["name"]: a for a in read(data / "structures.extxyz", index=":")}
    rows = []
    print(
        f"{'model':<22}{'matmul':<20}{'max|dE|/eV':>12}{'/tol':>7}{'max|dF|/max|F|':>16}{'/tol':>7}"
    )
    for name, model in reference["models"].items():
        if args.models and name not in args.models:
            continue
        path = checkpoint(name)
        if path is None:
            print(f"{name:<22}(checkpoint not found: skipped)")
            continue
        options = {}
        if model["kind"] == "spinconv":  # the reference's force rotations; OCP's grad forces
            estimator = torch.load(path, map_location="cpu", weights_only=True)["config"][
                "model_attributes"
            ]["force_estimator"]
            if estimator == "grad":
                options["forces"] = "compat"
            else:
                options["rotations"] = torch.tensor(model["rotations"], dtype=torch.float64)
        potential = load_checkpoint(path, device=args.device, dtype="float32", **options)
        runs = [("float32", potential, False), ("tf32", potential, True)]
        if args.triton and model["kind"] == "spinconv":
            from forcecalc.models.triton_kernels import with_triton_kernels

            tf32x3, mixed, tf32 = (
                with_triton_kernels(potential, p) for p in ("tf32x3", "mixed", "tf32")
            )
            runs += [
                ("triton-tf32x3", tf32x3, False),
                ("triton-mixed", mixed, False),
                ("triton-tf32", tf32, False),
                ("triton-tf32x3+tf32", tf32x3, True),  # PyTorch's products in TF32 too
            ]
        for matmul, runner, tf32 in runs:
            set_tf32(tf32)
            row = {
                "model": name,
                "tf32": tf32,
                "matmul": matmul,
                **errors(runner, structures, model["results"], args.device),
            }
            rows.append(row)
            print(
                f"{name:<22}{matmul:<20}{row['max_energy_error_eV']:>12.2e}"
                f"{row['energy_error_over_tolerance']:>7.2f}{row['max_force_error_relative']:>16.2e}"
                f"{row['force_error_over_tolerance']:>7.2f}"
            )
        set_tf32(False)
    shipped = shipped_rows(args.device) if args.shipped else []
    write_json(
        args.out,
        {
            "benchmark": "tf32_error",
            "device": args.device,
            "device_name": torch.cuda.get_device_name()
            if args.device.startswith("cuda")
            else "cpu",
            "torch": torch.__version__,
            "tolerances": {"energy_eV": ENERGY_TOLERANCE_EV, "force_relative": FORCE_TOLERANCE},
            "rows": rows,
            "shipped": shipped,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
