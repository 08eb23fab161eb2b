"""Building blocks shared by the models."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Swish(nn.Module):
    """``x * sigmoid(x)`` (SiLU), the activation of both papers."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(x)


class GaussianSmearing(nn.Module):
    """Gaussian radial basis with centres ``linspace(start, stop, num_gaussians)``.

    OCP's parameterisation: the buffer ``offset`` holds the centres and
    ``coeff = -0.5 / (basis_width_scalar * (offset[1] - offset[0])) ** 2`` (a Python float,
    computed from the float32 centres, not saved in the state_dict).
    """

    def __init__(
        self,
        start: float = 0.0,
        stop: float = 5.0,
        num_gaussians: int = 50,
        basis_width_scalar: float = 1.0,
    ) -> None:
        super().__init__()
        offset = torch.linspace(start, stop, num_gaussians, dtype=torch.float32)
        self.coeff = -0.5 / (basis_width_scalar * (offset[1] - offset[0]).item()) ** 2
        self.register_buffer("offset", offset)

    def forward(self, distances: Tensor) -> Tensor:
        """``[n] -> [n, num_gaussians]``."""
        diff = distances.unsqueeze(-1) - self.offset
        return torch.exp(self.coeff * diff.pow(2))
