"""The model interface (:mod:`forcecalc.models.interface`): what every model gives forcecalc,
and a clear refusal of a module that is not a model."""

from __future__ import annotations

import pytest
import torch
from toy_models import ToyModel

from forcecalc.checkpoint import CheckpointInfo, Normalizers, Potential
from forcecalc.graph import Batch
from forcecalc.models.forcenet import ForceNet
from forcecalc.models.interface import FixedShapeModel, Model, missing_members
from forcecalc.models.spinconv import SpinConv

SMALL = {"hidden_channels": 16, "mid_hidden_channels": 16, "num_basis_functions": 8}


def _info(name: str) -> CheckpointInfo:
    return CheckpointInfo(name, {}, Normalizers(), "test")


@pytest.mark.parametrize(
    "model",
    [
        SpinConv(**SMALL),
        SpinConv(**SMALL, force_estimator="grad", forces="conservative"),
        ForceNet(hidden_channels=16, num_interactions=1),
    ],
    ids=["spinconv-fc", "spinconv-ec", "forcenet"],
)
def test_the_models_implement_the_whole_interface(model) -> None:
    """SpinConv (both variants) and ForceNet have every member forcecalc reads, the
    fixed-shape ones included, and a Potential reports them as the model declares them."""
    assert missing_members(model) == []
    assert isinstance(model, Model) and isinstance(model, FixedShapeModel)
    potential = Potential(model, _info("model"))
    assert potential.cutoff == model.cutoff
    assert potential.max_neighbors == model.max_neighbors
    assert potential.energy_gradient == model.energy_gradient
    assert potential.defines_stress == model.defines_stress
    assert potential.fixed_shapes
    assert potential.table_elements == model.supported_numbers()


def test_a_module_that_is_not_a_model_is_refused_naming_what_it_lacks() -> None:
    """Wrapping a plain ``nn.Module`` (here ``nn.Linear``) in a Potential raises ``TypeError``
    naming the missing members, instead of failing later inside a relaxation."""
    with pytest.raises(TypeError, match="Linear is not a forcecalc model") as error:
        Potential(torch.nn.Linear(3, 1), _info("linear"))
    for member in ("cutoff", "max_neighbors", "energy_gradient", "defines_stress"):
        assert member in str(error.value)
    assert "supported_numbers" in str(error.value)


class _Quadratic(ToyModel):
    """``E = sum |r|^2 / 2`` per system: a model without a fixed-shape forward."""

    cutoff = 2.0

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        per_atom = 0.5 * (batch.positions**2).sum(dim=1)
        energy = torch.zeros(batch.n_systems, dtype=per_atom.dtype)
        return {
            "energy": energy.index_add(0, batch.system_idx, per_atom),
            "forces": -batch.positions,
        }


def test_a_model_without_fixed_shapes_runs_and_refuses_the_fixed_shape_path() -> None:
    """The fixed-shape members are optional: a model without them runs through a Potential,
    says it has no fixed-shape forward, and asking for one is a clear error naming it."""
    from ase import Atoms

    potential = Potential(_Quadratic(), _info("quadratic"))
    assert not potential.fixed_shapes and potential.table_elements is None
    batch = Batch.from_atoms([Atoms("H2", positions=[[0, 0, 0], [0, 0, 1.0]])], cutoff=2.0)
    out = potential(batch)
    assert float(out["energy"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"quadratic model .* has no fixed-shape forward"):
        potential.fixed_shape_inputs(batch)
