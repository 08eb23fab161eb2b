"""Batched evaluation of many structures: one forward pass per batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from forcecalc.checkpoint import Potential, load_checkpoint
from forcecalc.graph import Batch


def predict(
    structures: Sequence,
    model: str | Potential,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "float32",
    progress: bool = False,
    **model_options: Any,
) -> list[dict[str, Any]]:
    """Energies and forces of many ``ase.Atoms`` with one forward pass per batch.

    Args:
        structures: the ``ase.Atoms`` to evaluate.
        model: a checkpoint name/path or a loaded :class:`~forcecalc.checkpoint.Potential`.
        batch_size: structures per forward pass.
        device, dtype, **model_options: as for :func:`~forcecalc.checkpoint.load_checkpoint`
            (ignored for a loaded Potential).
        progress: show a progress bar.

    Returns:
        One dict per structure, in input order: ``energy`` (float, eV) and ``forces``
        (``[n_atoms, 3]`` float64 array, eV/Å). Equal to the calculator's one-by-one results.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    potential = (
        model
        if isinstance(model, Potential)
        else load_checkpoint(model, device=device, dtype=dtype, **model_options)
    )
    results: list[dict[str, Any]] = []
    starts = range(0, len(structures), batch_size)
    for start in tqdm(starts, disable=not progress, desc="predict", unit="batch"):
        chunk = list(structures[start : start + batch_size])
        batch = Batch.from_atoms(chunk, cutoff=potential.cutoff).to(
            device=potential.device, dtype=potential.dtype
        )
        potential.check_numbers(batch.numbers)
        with torch.set_grad_enabled(potential.defines_stress):
            out = potential(batch)
        energies = out["energy"].detach().cpu().double().numpy()
        forces = out["forces"].detach().cpu().double().numpy()
        bounds = np.cumsum([0] + [len(a) for a in chunk])
        for k in range(len(chunk)):
            results.append(
                {"energy": float(energies[k]), "forces": forces[bounds[k] : bounds[k + 1]]}
            )
    return results
