"""The check that a relaxation's outputs carry the model's own stress (shared by the engine's
and the command line's tests)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator


def assert_calculator_stress(frames: Iterable[Atoms], calc: Calculator) -> None:
    """Each frame's stored stress (Voigt, eV/Å³) is ``calc``'s at the frame's positions and
    cell, to 1e-10, and not negligible (larger than 1e-3 somewhere)."""
    for frame in frames:
        reference = frame.copy()
        reference.calc = calc
        stress = frame.calc.results["stress"]
        assert np.abs(stress).max() > 1e-3
        np.testing.assert_allclose(stress, reference.get_stress(), rtol=0, atol=1e-10)
