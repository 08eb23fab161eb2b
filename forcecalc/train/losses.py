"""Losses on normalized targets, summed over the global batch, and rotation augmentation.

Every loss term is a sum over the local batch divided by a *global* denominator (systems for
the energy, the sum of atom weights for the forces, both summed over all processes), so the
gradient of a step does not depend on how its frames are split between processes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from forcecalc.graph import Batch


@dataclass(frozen=True)
class LossTerms:
    """The step's loss and its parts (all 0-d tensors).

    Attributes:
        loss: ``energy_coefficient * energy + force_coefficient * forces`` over the global batch,
            times ``world_size`` (each process's gradient is averaged over processes).
        energy: this process's share of the global energy loss.
        forces: this process's share of the global force loss.
    """

    loss: Tensor
    energy: Tensor
    forces: Tensor


def energy_errors(pred: Tensor, target: Tensor, kind: str) -> Tensor:
    """``[n_systems]`` per-system energy loss: ``|d|`` (``l1``) or ``d**2`` (``mse``)."""
    diff = pred - target
    return diff.abs() if kind == "l1" else diff * diff


def force_errors(pred: Tensor, target: Tensor, kind: str) -> Tensor:
    """``[n_atoms]`` per-atom force loss: component mean of ``|d|`` (``l1``) or ``d**2``
    (``mse``), or the Euclidean norm ``|d|_2`` (``l2mae``, OCP's default)."""
    diff = pred - target
    if kind == "l1":
        return diff.abs().mean(dim=1)
    if kind == "mse":
        return (diff * diff).mean(dim=1)
    return torch.linalg.vector_norm(diff, dim=1)


def compute_loss(
    pred_energy: Tensor,
    pred_forces: Tensor,
    target_energy: Tensor,
    target_forces: Tensor,
    weights: Tensor,
    denominators: Tensor,
    energy_loss: str = "l1",
    force_loss: str = "l1",
    energy_coefficient: float = 1.0,
    force_coefficient: float = 100.0,
    world_size: int = 1,
) -> LossTerms:
    """The weighted loss of one step (normalized units).

    Args:
        pred_energy, target_energy: ``[n_systems]``.
        pred_forces, target_forces: ``[n_atoms, 3]``.
        weights: ``[n_atoms]`` force-loss weight of each atom.
        denominators: ``[2]``: the number of systems and the sum of atom weights over the
            global batch (all processes).
        world_size: processes whose gradients are averaged.
    """
    energy = energy_errors(pred_energy, target_energy, energy_loss).sum() / denominators[0]
    # a global batch whose atoms all weigh 0 (tag weights 0 for bulk or molecules) has no force
    # term: 0 / 1, with a zero gradient (a tiny denominator made the gradient inf * 0 = NaN)
    weight_sum = denominators[1]
    weight_sum = torch.where(weight_sum > 0, weight_sum, torch.ones_like(weight_sum))
    forces = (force_errors(pred_forces, target_forces, force_loss) * weights).sum() / weight_sum
    loss = (energy_coefficient * energy + force_coefficient * forces) * world_size
    return LossTerms(loss=loss, energy=energy, forces=forces)


def rotation_axes(graph: Batch, mode: str) -> np.ndarray:
    """``[n_systems]`` bool: True where a system gets a full 3D rotation, False for z only.

    ``mode``: ``"3d"`` (all), ``"z"`` (none), ``"auto"`` (molecules, i.e. systems without any
    periodic axis, get 3D; slabs and bulk get z).
    """
    if mode == "3d":
        return np.ones(graph.n_systems, dtype=bool)
    if mode == "z":
        return np.zeros(graph.n_systems, dtype=bool)
    return ~graph.pbc.any(dim=1).cpu().numpy()


def random_rotations(keys: Sequence[Sequence[int]], full: np.ndarray) -> np.ndarray:
    """``[n, 3, 3]`` rotation matrices, one per key, each a function of its key only.

    Args:
        keys: per system, integers seeding its rotation (e.g. ``(seed, epoch, frame)``), so a
            frame gets the same rotation whatever batch or process it lands in.
        full: ``[n]`` bool: uniform over SO(3) where True, about z where False.
    """
    out = np.empty((len(keys), 3, 3))
    for k, key in enumerate(keys):
        rng = np.random.default_rng([int(x) for x in key])
        if full[k]:
            q = rng.standard_normal(4)
            w, x, y, z = q / np.linalg.norm(q)
            out[k] = [
                [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
            ]
        else:
            angle = rng.uniform(0.0, 2.0 * math.pi)
            c, s = math.cos(angle), math.sin(angle)
            out[k] = [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]
    return out


def rotate(graph: Batch, forces: Tensor, rotations: Tensor) -> tuple[Batch, Tensor]:
    """Rotate every system (positions, cell, target forces) by its own rotation.

    The edges stay valid: rotating positions and cell together keeps every
    ``pos[j] - pos[i] + shift @ cell`` the rotated vector of the same pair.

    Args:
        graph: the batch.
        forces: ``[n_atoms, 3]`` target forces.
        rotations: ``[n_systems, 3, 3]`` rotation matrices ``R`` (vectors ``v -> R v``).
    """
    rotations = rotations.to(device=forces.device, dtype=graph.positions.dtype)
    per_atom = rotations[graph.system_idx]
    positions = torch.einsum("nij,nj->ni", per_atom, graph.positions)
    cell = torch.einsum("sij,skj->ski", rotations, graph.cell)
    return (
        graph.with_positions(positions, cell),
        torch.einsum("nij,nj->ni", per_atom.to(forces.dtype), forces),
    )
