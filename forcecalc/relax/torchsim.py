"""torch-sim adapter: a forcecalc potential as torch-sim's ``ModelInterface`` (optional).

With ``torch-sim-atomistic`` installed (``pip install torch-sim-atomistic``; it does not
replace torch), torch-sim's batched optimizers, integrators and autobatchers can drive
SpinConv and ForceNet::

    import torch_sim as ts
    from forcecalc.relax.torchsim import ForcecalcModel

    model = ForcecalcModel("spinconv-ec", device="cuda")
    relaxed = ts.optimize(atoms_list, model, optimizer=ts.optimizers.fire)

Importing this module without torch-sim raises ``ImportError`` saying how to install it.
forcecalc's own :func:`forcecalc.relax.relax` / :func:`forcecalc.relax.md` need none of it.

Conventions: torch-sim stores cells with lattice vectors as *columns* (``state.cell``;
``state.row_vector_cell`` is ASE's layout) and periodicity as one flag or a ``[3]`` flag; the
adapter converts both.  torch-sim 0.3's ``atoms_to_state`` keeps one flag for all systems
(``all(atoms.pbc)``): a slab with ``pbc=(True, True, False)`` becomes non-periodic there, so give
slabs ``pbc=True`` with their vacuum (longer than the cutoff) as OC20's data does.

Energies are eV ``[n_systems]``, forces eV/Å ``[n_atoms, 3]``, stress
(energy-centric SpinConv with ``forces="conservative"`` only) eV/Å³ ``[n_systems, 3, 3]`` as
ASE defines it (``(1/V) dE/dstrain``), all in the model's dtype (``model.dtype``: float32
unless loaded with ``dtype="float64"``, which NVE wants): torch-sim then runs its state in that
dtype.  The neighbor list is rebuilt on every call (torch-sim passes no
state between calls).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

try:
    from torch_sim.models.interface import ModelInterface
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "forcecalc.relax.torchsim needs torch-sim: pip install torch-sim-atomistic"
    ) from error

from forcecalc.graph import Batch, radius_graph
from forcecalc.graph.neighbors import has_volume
from forcecalc.relax.relaxation import potential_device, resolve_potential


class ForcecalcModel(ModelInterface):
    """A forcecalc :class:`~forcecalc.checkpoint.Potential` behind torch-sim's interface.

    Args:
        model: a checkpoint name or path, or a loaded potential.
        device, dtype: for loading a checkpoint (default float32); with a loaded Potential,
            its own (another one is an error).
        compute_stress: also return the stress (energy-centric SpinConv with
            ``forces="conservative"``: pass it for an OCP energy-centric checkpoint).
        **model_options: model options for :func:`~forcecalc.checkpoint.load_checkpoint`
            (e.g. ``forces="conservative"``).
    """

    def __init__(
        self,
        model: str | os.PathLike | nn.Module,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        compute_stress: bool = False,
        **model_options: Any,
    ) -> None:
        super().__init__()
        self.potential = resolve_potential(model, device, dtype, **model_options)
        if compute_stress and not getattr(self.potential, "defines_stress", False):
            raise ValueError(
                "this model defines no stress: its forces are predicted directly, or (an "
                "energy-centric SpinConv with forces='compat') are a partial derivative; use "
                "an energy-centric SpinConv with forces='conservative' for stress"
            )
        self._device = potential_device(self.potential)
        self._dtype = getattr(self.potential, "dtype", torch.float32)
        self._compute_stress = bool(compute_stress)
        self._compute_forces = True
        self._memory_scales_with = "n_atoms_x_density"

    def forward(self, state: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Energies ``[S]``, forces ``[N, 3]`` (and stress ``[S, 3, 3]``) of a torch-sim
        ``SimState`` (or a dict with ``positions``, ``cell``, ``pbc``, ``atomic_numbers``,
        ``system_idx``); an element the model has no parameters for is a ``ValueError``
        naming the atoms (their indices in the state), as in the calculators."""
        get = state.get if isinstance(state, dict) else lambda key: getattr(state, key)
        positions = get("positions").to(self._device)
        numbers = get("atomic_numbers").to(device=self._device, dtype=torch.int64)
        check_numbers = getattr(self.potential, "check_numbers", None)
        if check_numbers is not None:  # an element without parameters: named, as every path
            check_numbers(numbers)
        system_idx = get("system_idx")
        if system_idx is None:
            system_idx = torch.zeros(len(positions), dtype=torch.int64, device=self._device)
        system_idx = system_idx.to(device=self._device, dtype=torch.int64)
        cell = get("cell").to(device=self._device, dtype=torch.float64)
        cell = cell.reshape(-1, 3, 3).mT  # columns (torch-sim) -> rows (forcecalc, ASE)
        n_systems = cell.shape[0]
        pbc = torch.as_tensor(get("pbc"), dtype=torch.bool, device=self._device)
        if pbc.ndim == 0:
            pbc = pbc.repeat(3)
        pbc = pbc.reshape(-1, 3).expand(n_systems, 3)
        cell = cell.detach()  # a cell filter's cell may require grad; the models make their own
        if self._compute_stress:
            flat = np.flatnonzero(~has_volume(cell.cpu().numpy())).tolist()
            if flat:
                raise ValueError(
                    "stress needs cells of three independent vectors (as the ASE calculator; "
                    f"a slab's or a molecule's with its vacuum); systems {flat[:10]} have none "
                    "(build the model with compute_stress=False)"
                )
        graph = radius_graph(
            positions.detach().to(torch.float64),
            cell,
            pbc,
            system_idx,
            float(self.potential.cutoff),
        )
        # positions and cell in float64 whatever the model's dtype, as every other path
        # (calculators, predict, the engine): SpinConv's frame geometry is float64
        batch = Batch(
            positions=positions.detach().to(torch.float64),
            numbers=numbers,
            cell=cell,
            pbc=pbc.contiguous(),
            system_idx=system_idx,
            natoms=torch.bincount(system_idx, minlength=n_systems),
            tags=torch.zeros_like(numbers),
            fixed=torch.zeros_like(numbers, dtype=torch.bool),
            edge_index=graph.edge_index,
            shifts=graph.shifts,
        )
        grad = bool(getattr(self.potential, "energy_gradient", False))
        with torch.set_grad_enabled(grad):
            if self._compute_stress:
                out = self.potential(batch, compute_stress=True)
            else:
                out = self.potential(batch)
        # in the model's dtype: an energy-centric model's forces and stress are gradients with
        # respect to the float64 positions (and its energy with element references float64)
        results = {"energy": out["energy"], "forces": out["forces"]}
        if self._compute_stress:
            results["stress"] = out["stress"]
        return {key: value.detach().to(self._dtype) for key, value in results.items()}
