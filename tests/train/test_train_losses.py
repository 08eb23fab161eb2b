"""Losses, rotation augmentation, learning-rate schedule, moving average, global batch norm."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from train_fixtures import one_thread, training_frames  # noqa: F401

from forcecalc.train.data import Collater
from forcecalc.train.distributed import GlobalBatchNorm, convert_batchnorm
from forcecalc.train.losses import (
    compute_loss,
    force_errors,
    random_rotations,
    rotate,
    rotation_axes,
)
from forcecalc.train.optim import EMA, LRSchedule


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


def test_schedule_warmup_plateau_cosine():
    """Warmup rises linearly from ``warmup_factor * lr``; the plateau schedule multiplies by
    0.8 after more than ``patience`` reports without improvement (not below ``min_lr``);
    cosine ends at ``min_lr``; the state round-trips."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = LRSchedule(
        optimizer, "plateau", 1.0, 100, warmup_steps=4, warmup_factor=0.2, min_lr=0.7, patience=1
    )
    assert [schedule.lr_at(s) for s in (0, 2, 4, 50)] == pytest.approx([0.2, 0.6, 1.0, 1.0])
    for metric in (1.0, 1.0, 1.0):
        schedule.report(metric)
    assert schedule.lr_at(10) == pytest.approx(0.8)
    for metric in (1.0, 1.0):
        schedule.report(metric)
    assert schedule.lr_at(10) == pytest.approx(0.7)
    assert schedule.apply(10) == optimizer.param_groups[0]["lr"]
    restored = LRSchedule(optimizer, "plateau", 1.0, 100)
    restored.load_state_dict(schedule.state_dict())
    assert restored.state_dict() == schedule.state_dict()
    cosine = LRSchedule(optimizer, "cosine", 1.0, 100, warmup_steps=10, min_lr=0.1)
    assert cosine.lr_at(10) == pytest.approx(1.0)
    assert cosine.lr_at(55) == pytest.approx(0.55)
    assert cosine.lr_at(100) == pytest.approx(0.1)


def test_ema_averages_and_restores():
    """The moving average follows ``d * shadow + (1 - d) * p`` with ``torch_ema``'s warm-up
    of ``d`` (``n`` counting this update); inside ``applied()`` the parameters hold the
    averages, afterwards their own values."""
    parameter = torch.nn.Parameter(torch.zeros(2))
    ema = EMA([parameter], decay=0.5)
    with torch.no_grad():
        parameter.fill_(1.0)
    ema.update()  # d = min(0.5, 2/11)
    assert ema.shadow[0].tolist() == pytest.approx([9 / 11, 9 / 11])
    ema.update()  # d = min(0.5, 3/12) = 0.25
    assert ema.shadow[0].tolist() == pytest.approx([0.25 * 9 / 11 + 0.75] * 2)
    with ema.applied():
        assert parameter.tolist() == pytest.approx([0.25 * 9 / 11 + 0.75] * 2)
    assert parameter.tolist() == [1.0, 1.0]


def test_global_batchnorm_without_processes_is_batchnorm():
    """Converted batch norms keep their state-dict keys and, in one process, compute exactly
    what ``nn.BatchNorm1d`` computes (outputs and running statistics)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    reference = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    reference.load_state_dict(model.state_dict())
    convert_batchnorm(model)
    assert isinstance(model[1], GlobalBatchNorm)
    assert model.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(16, 4)
    torch.testing.assert_close(model(x), reference(x))
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)
