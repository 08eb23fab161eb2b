"""Learning-rate schedules and the moving average of the weights (forcecalc.train.optim)."""

from __future__ import annotations

import pytest
import torch
from train_fixtures import one_thread, training_frames  # noqa: F401

from forcecalc.train.optim import EMA, LRSchedule


def test_schedule_warmup_plateau_cosine():
    """Warmup rises linearly from ``warmup_factor * lr``; the plateau schedule multiplies by
    0.8 after more than ``patience`` reports without improvement (not below ``min_lr``);
    cosine ends at ``min_lr`` and never rises above ``lr`` (a fine-tune below the default
    ``min_lr``); the state round-trips."""
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
    gentle = LRSchedule(optimizer, "cosine", 1e-7, 100, min_lr=1e-6)  # lr below the floor
    assert max(gentle.lr_at(step) for step in range(101)) == pytest.approx(1e-7)


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
