"""Losses and rotation augmentation (forcecalc.train.losses)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from train_fixtures import one_thread, training_frames  # noqa: F401

from forcecalc.train.data import Collater
from forcecalc.train.losses import (
    compute_loss,
    force_errors,
    random_rotations,
    rotate,
    rotation_axes,
)


def test_force_and_energy_loss_kinds():
    """Per-atom force losses: ``l1`` is the component mean of |d|, ``mse`` of d², ``l2mae`` the
    Euclidean norm; the force loss is the weighted sum over the global weight sum, the energy
    loss the sum over the global number of systems, coefficients as given."""
    pred = torch.tensor([[3.0, 0.0, 4.0], [1.0, 1.0, 1.0]])
    target = torch.zeros(2, 3)
    assert force_errors(pred, target, "l1").tolist() == pytest.approx([7 / 3, 1.0])
    assert force_errors(pred, target, "mse").tolist() == pytest.approx([25 / 3, 1.0])
    assert force_errors(pred, target, "l2mae").tolist() == pytest.approx([5.0, math.sqrt(3)])
    weights = torch.tensor([1.0, 0.05])
    terms = compute_loss(
        torch.tensor([1.0, -1.0]),
        pred,
        torch.tensor([0.5, 0.0]),
        target,
        weights,
        denominators=torch.tensor([2.0, 1.05]),
        energy_coefficient=2.0,
        force_coefficient=100.0,
    )
    assert terms.energy.item() == pytest.approx(0.75)
    assert terms.forces.item() == pytest.approx((7 / 3 + 0.05) / 1.05)
    assert terms.loss.item() == pytest.approx(2 * 0.75 + 100 * (7 / 3 + 0.05) / 1.05)


def test_loss_of_split_batch_sums_to_whole():
    """With global denominators, the loss shares of two halves of a batch (two processes) sum,
    after dividing by the world size, to the loss of the whole batch."""
    generator = torch.Generator().manual_seed(0)
    pred_e, target_e = torch.randn(4, generator=generator), torch.randn(4, generator=generator)
    pred_f, target_f = (
        torch.randn(10, 3, generator=generator),
        torch.randn(10, 3, generator=generator),
    )
    weights = torch.rand(10, generator=generator)
    whole = compute_loss(
        pred_e, pred_f, target_e, target_f, weights, torch.tensor([4.0, weights.sum()])
    )
    denominators = torch.tensor([4.0, weights.sum()])
    first = compute_loss(
        pred_e[:1], pred_f[:3], target_e[:1], target_f[:3], weights[:3], denominators, world_size=2
    )
    second = compute_loss(
        pred_e[1:], pred_f[3:], target_e[1:], target_f[3:], weights[3:], denominators, world_size=2
    )
    assert ((first.loss + second.loss) / 2).item() == pytest.approx(whole.loss.item(), rel=1e-6)


def test_rotation_keeps_edges_and_rotates_forces():
    """Rotating a batch rotates every edge vector and target force by its system's rotation
    (the graph stays valid); z-rotations keep z; ``auto`` gives molecules (no periodic axis) 3D
    rotations and slabs z-rotations; each rotation is a function of its key only."""
    from ase.build import molecule
    from ase.calculators.singlepoint import SinglePointCalculator

    slab = training_frames()[0]
    water = molecule("H2O")
    water.calc = SinglePointCalculator(water, energy=0.0, forces=np.ones((3, 3)))
    batch = Collater(cutoff=4.0)([(0, slab), (1, water)])
    full = rotation_axes(batch.graph, "auto")
    assert full.tolist() == [False, True]
    matrices = random_rotations([(0, 0, 0), (0, 0, 1)], full)
    np.testing.assert_allclose(
        matrices @ matrices.transpose(0, 2, 1), np.tile(np.eye(3), (2, 1, 1)), atol=1e-12
    )
    np.testing.assert_allclose(np.linalg.det(matrices), [1.0, 1.0])
    assert matrices[0][2].tolist() == [0.0, 0.0, 1.0]
    np.testing.assert_array_equal(random_rotations([(0, 0, 1)], full[1:])[0], matrices[1])
    rotations = torch.from_numpy(matrices)
    graph, forces = rotate(batch.graph, batch.forces, rotations)
    per_edge = rotations[batch.graph.system_idx[batch.graph.edge_index[1]]]
    expected = torch.einsum("eij,ej->ei", per_edge, batch.graph.edge_vectors())
    torch.testing.assert_close(graph.edge_vectors(), expected)
    per_atom = rotations[batch.graph.system_idx]
    torch.testing.assert_close(forces, torch.einsum("nij,nj->ni", per_atom, batch.forces))


def test_a_batch_without_force_weight_has_no_force_term():
    """A global batch whose atoms all weigh 0 (tag weights 0 for bulk cells or molecules, ASE's
    tag 0) contributes no force loss and a zero, finite force gradient: its 0 / 0 made the
    gradient NaN and the whole model NaN at the next update."""
    pred_forces = torch.randn(5, 3, requires_grad=True)
    weights = torch.zeros(5)
    for kind in ("l2mae", "mae", "mse"):
        terms = compute_loss(
            torch.zeros(2, requires_grad=True),
            pred_forces,
            torch.ones(2),
            torch.randn(5, 3),
            weights,
            torch.stack([torch.tensor(2.0), weights.sum()]),
            force_loss=kind,
        )
        terms.loss.backward()
        assert terms.forces.item() == 0.0 and torch.isfinite(terms.loss)
        assert torch.equal(pred_forces.grad, torch.zeros(5, 3))
        pred_forces.grad = None
