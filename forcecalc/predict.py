"""Batched evaluation of many structures: one forward pass per batch."""

from __future__ import annotations

from collections.abc import Iterable
from numbers import Integral
from typing import Any

import numpy as np
import torch

from forcecalc.checkpoint import Potential, as_potential
from forcecalc.graph import Batch
from forcecalc.warning import warn


def predict(
    structures: Iterable,
    model: str | Potential,
    batch_size: int | str = 32,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    progress: bool = False,
    apply_constraint: bool = True,
    **model_options: Any,
) -> list[dict[str, Any]]:
    """Energies and forces of many ``ase.Atoms`` with one forward pass per batch.

    Args:
        structures: the ``ase.Atoms`` to evaluate, any iterable (one ``Atoms`` is taken as a
            list of one).
        model: a checkpoint name/path or a loaded :class:`~forcecalc.checkpoint.Potential`.
        batch_size: structures per forward pass (an integer), or ``"auto"``: batches filled
            by the memory model of :func:`forcecalc.relax.relaxation.relax`, split on an
            out-of-memory error without losing a structure (it evaluates them:
            ``relax(steps=0)``); one too large for the memory even alone gets NaN energy and
            forces.
        device, dtype, **model_options: as for :func:`~forcecalc.checkpoint.load_checkpoint`
            (dtype float32 by default); with a loaded Potential, its device and dtype, and
            others are an error.
        progress: show a progress bar.
        apply_constraint: adjust energies and forces by each structure's constraints
            (FixAtoms: zero force on fixed atoms; Hookean: its energy and forces), as
            ``Atoms.get_potential_energy()`` and ``get_forces()`` do by default.

    Returns:
        One dict per structure, in input order: ``energy`` (float, eV) and ``forces``
        (``[n_atoms, 3]`` float64 array, eV/Å). Equal to the calculator's one-by-one results
        (``atoms.get_potential_energy(apply_constraint=...)`` and ``atoms.get_forces(...)``:
        with constraints applied, a restraint such as ``Hookean`` adds its energy and
        forces). A structure the model gives a NaN or infinite output for gets it as it is
        (the others are unaffected), where the calculator raises ``CalculationFailed``: a
        screening loses no structure to another's failure. One warning names the structures
        without a finite result (the first ten), and why.
    """
    from ase import Atoms

    structures = [structures] if isinstance(structures, Atoms) else list(structures)
    potential = as_potential(model, device=device, dtype=dtype, **model_options)
    raw, failures = model_outputs(structures, potential, batch_size, progress)
    if failures:
        named = sorted(failures)[:10]
        warn(
            f"{len(failures)} of {len(structures)} structures have NaN or infinite energy "
            "and forces: "
            + "; ".join(
                f"structure {k} ({structures[k].get_chemical_formula()}): {failures[k]}"
                for k in named
            )
            + ("; and more" if len(failures) > len(named) else "")
        )
    results: list[dict[str, Any]] = []
    for atoms, (energy, forces) in zip(structures, raw, strict=True):
        if apply_constraint:  # as Atoms.get_potential_energy() and get_forces() apply them
            for constraint in atoms.constraints:
                constraint.adjust_forces(atoms, forces)
                if hasattr(constraint, "adjust_potential_energy"):
                    energy += float(constraint.adjust_potential_energy(atoms))
        results.append({"energy": energy, "forces": forces})
    return results


def model_outputs(
    structures: list, potential: Potential, batch_size: int | str, progress: bool = False
) -> tuple[list[tuple[float, np.ndarray]], dict[int, str]]:
    """The model's own ``(energy, forces [n_atoms, 3])`` of each structure (no constraint
    applied; float64 numpy), as :func:`predict` computes them (``batch_size`` likewise), and
    why, by input index, for each whose energy or forces are not finite (no warning: the
    caller reports them)."""
    from tqdm.auto import tqdm

    from forcecalc.relax.engine import check_structures
    from forcecalc.relax.relaxation import MODEL_NOT_FINITE

    auto = batch_size == "auto"
    if not auto and (
        isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be 'auto' or an integer >= 1, got {batch_size!r}")
    # overlapping atoms named by input place (the engine's plan checks them itself)
    check_structures(structures, potential, engine=False, overlaps=not auto)
    failures: dict[int, str] = {}
    if auto:
        raw, failures = _evaluated_by_the_engine(structures, potential, progress)
    else:
        raw = []
        starts = range(0, len(structures), int(batch_size))
        for start in tqdm(starts, disable=not progress, desc="predict", unit="batch"):
            chunk = structures[start : start + batch_size]
            batch = Batch.from_atoms(chunk, cutoff=potential.cutoff).to(
                device=potential.device, dtype=torch.float64
            )
            with torch.set_grad_enabled(potential.energy_gradient):
                out = potential(batch)
            energies = out["energy"].detach().cpu().double().numpy()
            forces = out["forces"].detach().cpu().double().numpy()
            bounds = np.cumsum([0] + [len(a) for a in chunk])
            raw += [(float(e), forces[bounds[k] : bounds[k + 1]]) for k, e in enumerate(energies)]
    for index, (energy, forces) in enumerate(raw):
        if not (np.isfinite(energy) and np.isfinite(forces).all()):
            failures.setdefault(index, MODEL_NOT_FINITE)
    return raw, failures


def _evaluated_by_the_engine(
    structures: list, potential: Potential, progress: bool
) -> tuple[list[tuple[float, np.ndarray]], dict[int, str]]:
    """``(energy, forces [n_atoms, 3])`` of each structure from the batched engine
    (``relax(steps=0)``: batches from its memory model, split on out-of-memory), on copies
    without constraints (the engine refuses those it cannot move atoms under; evaluating
    needs none); and the engine's reason for each it could not evaluate, by input index."""
    from forcecalc.relax import relax

    bare = []
    for atoms in structures:
        copy = atoms.copy()
        copy.set_constraint()
        bare.append(copy)
    evaluated = relax(bare, potential, steps=0, batch_size="auto", progress=progress)
    failures = {
        k: a.info["relax_error"] for k, a in enumerate(evaluated) if "relax_error" in a.info
    }
    raw = [(a.get_potential_energy(), a.get_forces(apply_constraint=False)) for a in evaluated]
    return raw, failures
