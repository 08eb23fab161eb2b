"""The shipped checkpoints: intact, described, and as accurate as their model cards say."""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from forcecalc import load_checkpoint, predict
from forcecalc.hub import shipped_checkpoints

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
MANIFEST = json.loads((WEIGHTS / "manifest.json").read_text())
#: The sample's force MAE may exceed the model card's test_id figure by this factor at most
#: (a small sample of other systems scatters around the card's number).
MARGIN = 1.5


@cache
def tiny_sample() -> list:
    """Frames of OC20-EMT ``tiny`` (seed 7, not the training seed): test_id and val_id."""
    import tempfile

    from forcecalc.data import open_dataset
    from forcecalc.data.oc20emt import generate

    folder = Path(tempfile.mkdtemp(prefix="oc20emt-tiny-"))
    generate("tiny", folder, seed=7, workers=1, progress=False)
    frames = []
    for split in ("test_id", "val_id"):
        dataset = open_dataset(folder / f"{split}.h5", in_memory=True)
        frames += [dataset[i] for i in range(0, len(dataset), 3)]
    return frames


def test_manifest_lists_every_shipped_file() -> None:
    """weights/manifest.json describes exactly the .pt files that are shipped."""
    assert set(MANIFEST) == set(shipped_checkpoints())


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_checksum_and_metadata(name: str) -> None:
    """Each file has the manifest's SHA-256 and size, and loads with its model card metadata."""
    entry = MANIFEST[name]
    path = WEIGHTS / entry["file"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    assert path.stat().st_size == entry["bytes"] <= 15 * 1024 * 1024
    potential = load_checkpoint(name, device="cpu")
    assert potential.name == entry["model"]
    assert potential.info.source_format == "forcecalc"
    for key in ("name", "description", "license", "energy", "training"):
        assert key in potential.info.metadata, key
    assert potential.info.metadata["name"] == name
    assert "rotations" not in potential.info.model_kwargs


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_force_mae_within_model_card(name: str) -> None:
    """On OC20-EMT frames the test generates, the force MAE (free atoms) stays under the model
    card's test_id figure times MARGIN."""
    from forcecalc.graph.batch import fixed_mask

    frames = tiny_sample()
    results = predict(frames, name, batch_size=8, device="cpu")
    errors = [
        np.abs(r["forces"] - a.get_forces(apply_constraint=False))[~fixed_mask(a)]
        for r, a in zip(results, frames, strict=True)
    ]
    mae = float(np.concatenate(errors).mean())
    card = MANIFEST[name]["test_id"]["forces_mae"]
    assert mae < MARGIN * card, f"{name}: force MAE {mae:.4f} vs model card {card:.4f}"
