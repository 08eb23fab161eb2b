"""The shipped checkpoints: intact, described, and as accurate as their model cards say."""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path

import pytest

from forcecalc import load_checkpoint
from forcecalc.evaluate import check_forces_mae, check_sample
from forcecalc.hub import shipped_checkpoints

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
MANIFEST = json.loads((WEIGHTS / "manifest.json").read_text())
#: The check sample's force MAE may exceed the model card's figure by this factor at most
#: (float32 rounding and BLAS differences between machines move it by far less).
MARGIN = 1.05


@cache
def check_frames() -> list:
    """The check sample, generated once per test session."""
    return check_sample()


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
    """On OC20-EMT frames generated here (tiny, seed 7), the force MAE stays within MARGIN of
    the figure the model card records for that sample (a regression in the model code, the
    graph or the file shows up here)."""
    mae = check_forces_mae(name, check_frames())
    card = MANIFEST[name]["check_forces_mae"]
    assert mae < MARGIN * card, f"{name}: force MAE {mae:.4f} vs model card {card:.4f}"
