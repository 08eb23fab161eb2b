"""The OCP reference outputs and checkpoints (shared by the tests; see tests/data/README.md)."""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"
OCP_DATA = DATA / "ocp"
#: The large fixture checkpoints (SpinConv-All, ForceNet-All): ``$FORCECALC_OCP_FIXTURES``, else
#: the project's ``../shared/fixtures/ocp`` (a folder holding ``checkpoints/``).
SHARED_OCP = Path(
    os.environ.get(
        "FORCECALC_OCP_FIXTURES",
        Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "ocp",
    )
)


@cache
def ocp_reference() -> dict:
    """``reference.json`` of the shared OCP fixtures (see tests/data/README.md)."""
    return json.loads((OCP_DATA / "reference.json").read_text())


@cache
def ocp_structures() -> dict:
    """The fixture structures by name (``ase.Atoms`` with FixAtoms and tags)."""
    from ase.io import read

    return {a.info["name"]: a for a in read(OCP_DATA / "structures.extxyz", index=":")}


def ocp_checkpoint_path(name: str) -> Path:
    """Path of fixture checkpoint ``name`` (e.g. ``"spinconv_small_fc"``); skips if absent."""
    for folder in (OCP_DATA, SHARED_OCP / "checkpoints"):
        path = folder / f"{name}.pt"
        if path.exists():
            return path
    pytest.skip(
        f"checkpoint {name}.pt not found (the large fixtures: set FORCECALC_OCP_FIXTURES to "
        f"a folder with checkpoints/, now {SHARED_OCP})"
    )


def load_ocp_raw(name: str) -> dict:
    """The raw OCP checkpoint dict of fixture ``name``."""
    return torch.load(ocp_checkpoint_path(name), map_location="cpu", weights_only=True)
