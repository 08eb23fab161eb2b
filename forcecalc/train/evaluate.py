"""Validation: predictions over a frame set (sharded over processes) and the S2EF metrics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from forcecalc import metrics
from forcecalc.checkpoint import Potential
from forcecalc.train.data import Collater, IndexedFrames, SubsetFrames, shard
from forcecalc.train.distributed import DistInfo, all_gather_objects


@dataclass
class Predictions:
    """Predictions and targets of a frame set, in eV and eV/Å.

    Attributes:
        energy, energy_target: ``[n_systems]``.
        forces, forces_target: ``[n_atoms, 3]``.
        natoms: ``[n_systems]`` atoms per system.
        free: ``[n_atoms]`` bool, True for atoms not held by FixAtoms.
    """

    energy: np.ndarray
    energy_target: np.ndarray
    forces: np.ndarray
    forces_target: np.ndarray
    natoms: np.ndarray
    free: np.ndarray

    @classmethod
    def concatenate(cls, parts: Sequence[Predictions]) -> Predictions:
        return cls(
            *(np.concatenate([getattr(p, name) for p in parts]) for name in cls.__annotations__)
        )


def predict_frames(
    potential: Potential,
    frames: Sequence,
    batch_size: int,
    device: torch.device,
    info: DistInfo,
) -> Predictions:
    """Predictions (eV, eV/Å) for every frame: each process evaluates a contiguous shard, the
    shards are gathered on every process, in frame order.  The potential is used as it is
    (call ``eval()`` first for validation)."""
    indices = shard(len(frames), info.rank, info.world_size)
    subset = IndexedFrames(SubsetFrames(frames, list(indices)))
    collate = Collater(potential.cutoff)
    parts = []
    for start in range(0, len(subset), batch_size):
        batch = collate([subset[i] for i in range(start, min(start + batch_size, len(subset)))])
        with torch.set_grad_enabled(potential.energy_gradient):
            out = potential(batch.graph.to(device))  # float64 positions, as in inference
        energy, forces = out["energy"].detach(), out["forces"].detach()
        parts.append(
            Predictions(
                energy=energy.double().cpu().numpy(),
                energy_target=batch.energy.numpy(),
                forces=forces.double().cpu().numpy(),
                forces_target=batch.forces.numpy(),
                natoms=batch.graph.natoms.cpu().numpy(),
                free=(~batch.graph.fixed).cpu().numpy(),
            )
        )
    local = Predictions.concatenate(parts) if parts else _empty()
    return Predictions.concatenate(all_gather_objects(local, info))


def _empty() -> Predictions:
    return Predictions(
        energy=np.zeros(0),
        energy_target=np.zeros(0),
        forces=np.zeros((0, 3)),
        forces_target=np.zeros((0, 3)),
        natoms=np.zeros(0, dtype=np.int64),
        free=np.zeros(0, dtype=bool),
    )


def s2ef_metrics(pred: Predictions) -> dict[str, float]:
    """OC20's S2EF metrics (:func:`forcecalc.metrics.s2ef_metrics`): ``energy_mae`` (eV),
    ``forces_mae`` (eV/Å), ``forces_cos``, ``efwt``; forces over free atoms."""
    return metrics.s2ef_metrics(
        pred.energy,
        pred.energy_target,
        pred.forces,
        pred.forces_target,
        pred.natoms,
        fixed=~pred.free,
    )
