"""Building blocks of the models: the Gaussian radial basis (SpinConv's distance features)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class GaussianSmearing(nn.Module):
    """Gaussian radial basis with centres ``linspace(start, stop, num_gaussians)``.

    OCP's parameterisation: the buffer ``offset`` holds the centres and
    ``coeff = -0.5 / (basis_width_scalar * (offset[1] - offset[0])) ** 2`` (a Python float,
    not saved in the state_dict), with the product rounded to float32 as OCP computes it (a
    float32 tensor operation; the float64 product differs by up to ~1e-7 relative, which moves
    energies by ~5e-8 eV).
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
        self.coeff = -0.5 / (basis_width_scalar * (offset[1] - offset[0])).item() ** 2
        self.register_buffer("offset", offset)

    def forward(self, distances: Tensor) -> Tensor:
        """``[n] -> [n, num_gaussians]``."""
        diff = distances.unsqueeze(-1) - self.offset
        return torch.exp(self.coeff * diff.pow(2))
