"""Turn a training run's model into a shipped checkpoint in weights/ and record it in the manifest.

    python benchmarks/package_weights.py scratch/runs/spinconv-fc/best.pt spinconv-fc \
        --description "SpinConv force-centric trained on OC20-EMT small"

What it does: loads the run's checkpoint (forcecalc format, as `forcecalc train` writes it),
resets options that only matter for training (SpinConv's `rotations: random` becomes the default
fixed, seeded set, so forces are a deterministic function of positions), fills the distance
scaling of element pairs the training data lacked (`fill_untrained_pairs`; a no-op for files
`forcecalc train` wrote since it does so itself), records the elements of
OC20-EMT (the only ones the model has seen), adds metadata, writes `weights/NAME.pt` atomically,
and stores its SHA-256, size and force MAE on the quick check sample
(`forcecalc.evaluate.check_sample`) in `weights/manifest.json` (which the tests check).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ase.data import atomic_numbers

from forcecalc.atomic import atomic_output, write_json
from forcecalc.checkpoint import load_checkpoint, save_checkpoint
from forcecalc.evaluate import check_forces_mae
from forcecalc.hub import file_sha256
from forcecalc.models.spinconv import fill_untrained_pairs

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
#: The elements of OC20-EMT: EMT's metals and the adsorbate elements.
OC20EMT_ELEMENTS = sorted(
    atomic_numbers[s] for s in ("H", "C", "N", "O", "Al", "Ni", "Cu", "Pd", "Ag", "Pt", "Au")
)
#: Model options that configure training, not the model a user gets.
TRAINING_ONLY_OPTIONS = ("rotations",)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_checkpoint", type=Path, help="best.pt or final.pt of a run")
    parser.add_argument("name", help="shipped name, e.g. spinconv-fc")
    parser.add_argument("--description", required=True)
    parser.add_argument("--metadata", type=Path, default=None, help="extra metadata (JSON)")
    parser.add_argument(
        "--s2ef",
        type=Path,
        default=None,
        help="`forcecalc eval s2ef --out` JSON of this file: its test_id row goes into the "
        "manifest (the shipped-weights test checks the model against it)",
    )
    args = parser.parse_args()

    potential = load_checkpoint(args.run_checkpoint, device="cpu")
    potential.info.model_kwargs = {
        k: v for k, v in potential.info.model_kwargs.items() if k not in TRAINING_ONLY_OPTIONS
    }
    # the run's own elements (a fine-tune may have added some) and every OC20-EMT element
    potential.info.elements = sorted(set(OC20EMT_ELEMENTS) | set(potential.info.elements or []))
    filled = fill_untrained_pairs(potential.model)
    extra = json.loads(args.metadata.read_text()) if args.metadata else {}
    metadata = {
        "name": args.name,
        "description": args.description,
        "license": "MIT",
        "energy": "OC20-EMT adsorption energy (eV): E_EMT(system) - E_EMT(clean relaxed slab) "
        "- sum of gas-phase references of the adsorbate atoms",
        "source_checkpoint": str(args.run_checkpoint),
        **({"filled_pairs": filled} if filled else {}),
        **extra,
    }
    target = WEIGHTS / f"{args.name}.pt"
    # checked before it is put in place: a file in weights/ must already match the manifest
    with atomic_output(target) as staged:
        save_checkpoint(potential, staged, metadata=metadata)
        check = load_checkpoint(staged, device="cpu")
        assert "rotations" not in check.info.model_kwargs
        entry = {
            "file": target.name,
            "sha256": file_sha256(staged),
            "bytes": staged.stat().st_size,
            "model": check.name,
            "parameters": sum(p.numel() for p in check.model.parameters()),
            "description": args.description,
            "check_forces_mae": check_forces_mae(check),
        }
    # a crash before the manifest is written leaves it naming the old file: run this again
    manifest_path = WEIGHTS / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest[args.name] = entry
    if args.s2ef is not None:
        manifest[args.name]["test_id"] = json.loads(args.s2ef.read_text())["test_id"]["model"]
    write_json(manifest_path, dict(sorted(manifest.items())), indent=2)
    print(json.dumps(manifest[args.name], indent=2))


if __name__ == "__main__":
    main()
