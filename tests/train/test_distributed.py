"""Batch-norm statistics over processes (forcecalc.train.distributed), in one process."""

from __future__ import annotations

import torch
from train_fixtures import one_thread, training_frames  # noqa: F401

from forcecalc.train.distributed import GlobalBatchNorm, convert_batchnorm


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
