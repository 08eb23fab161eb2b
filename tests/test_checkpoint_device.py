"""Device names: checked when resolved, before any checkpoint is read."""

from __future__ import annotations

import pytest
import torch
from ocp_fixtures import OCP_DATA

from forcecalc.checkpoint import load_checkpoint, resolve_device

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")


def test_none_means_cuda_when_available_else_cpu() -> None:
    """device=None resolves to CUDA when torch sees a GPU, else to the CPU."""
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None) == torch.device(expected)


def test_cpu_is_accepted() -> None:
    """'cpu' and a torch.device('cpu') resolve to the CPU."""
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@needs_no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda")])
def test_cuda_without_cuda_is_refused(device: str | torch.device) -> None:
    """On a machine without CUDA, a CUDA device raises ValueError saying CUDA is not
    available, and why (this torch's build, or no GPU visible)."""
    with pytest.raises(ValueError, match=r"device 'cuda(:0)?' requested but CUDA is not availa"):
        resolve_device(device)


@needs_no_cuda
def test_load_checkpoint_refuses_cuda_before_reading(tmp_path) -> None:
    """load_checkpoint checks the device before it reads the checkpoint: the device error
    comes first, even for a file that does not exist."""
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_checkpoint(tmp_path / "absent.pt", device="cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_checkpoint(OCP_DATA / "forcenet_small.pt", device="cuda")


def test_cuda_index_past_the_device_count_is_refused(monkeypatch) -> None:
    """A CUDA index at or past the number of visible GPUs raises ValueError naming the
    device and the count (here one GPU, simulated)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match=r"'cuda:1' requested but only 1 cuda device\(s\)"):
        resolve_device("cuda:1")


@pytest.mark.parametrize("device", ["gpu", "CPU", "cuda:x", 1.5])
def test_unknown_device_is_refused(device: object) -> None:
    """A string (or object) torch does not know as a device raises ValueError naming it."""
    with pytest.raises(ValueError, match=rf"unknown device {device!r}"):
        resolve_device(device)


def test_device_forcecalc_cannot_compute_on_is_refused() -> None:
    """A torch device type with no backend to compute on ('meta') raises ValueError."""
    with pytest.raises(ValueError, match="'meta' is not one forcecalc can compute on"):
        resolve_device("meta")
