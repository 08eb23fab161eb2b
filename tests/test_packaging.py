"""Packaging: every subpackage is listed, so a non-editable install has all of forcecalc."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import forcecalc

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject() -> None:
    """pyproject's explicit package list names every folder with an __init__.py."""
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    package_root = Path(forcecalc.__file__).parent
    found = {
        ".".join(("forcecalc", *Path(folder).relative_to(package_root).parts))
        for folder, _, files in os.walk(package_root, followlinks=True)
        if "__init__.py" in files
    }
    assert found == listed
