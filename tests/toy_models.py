"""A base for the small test models (Morse, harmonic, models that fail on purpose) that stand
in for SpinConv and ForceNet: the members of :class:`forcecalc.models.interface.Model` a toy
does not need to vary."""

from __future__ import annotations

from torch import nn


class ToyModel(nn.Module):
    """Direct outputs, no max-neighbor rule, no stress, every element; subclasses set
    ``cutoff`` and define ``forward(batch)``."""

    cutoff: float
    max_neighbors: int | None = None
    energy_gradient = False
    defines_stress = False

    def supported_numbers(self) -> list[int] | None:
        return None
