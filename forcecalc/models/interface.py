"""What forcecalc needs of a model: the interface SpinConv and ForceNet implement.

A model takes a :class:`~forcecalc.graph.Batch` (flat tensors for all its systems, with a
per-atom system index) and returns raw, normalized outputs;
:class:`forcecalc.checkpoint.Potential` adds the checkpoint's normalizers and element
references to give eV and Å.  Everything that runs a model (the calculators, ``predict``, the
batched engine, training) reads only the members of :class:`Model` and, for the CUDA-graph
path, :class:`FixedShapeModel`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from forcecalc.graph.batch import Batch


@runtime_checkable
class Model(Protocol):
    """A force-field model on batched graphs.

    Attributes:
        cutoff: graph radius (Å); a batch must hold at least every pair within it (it may
            hold more: the model applies the cutoff and its max-neighbor rule itself).
        max_neighbors: the max-neighbor rule (each atom's closest neighbors kept), or
            ``None`` for none.
        energy_gradient: whether the forces are the energy's gradient (a forward then needs
            autograd enabled).
        defines_stress: whether the model gives a stress (``compute_stress=True``).
    """

    cutoff: float
    max_neighbors: int | None
    energy_gradient: bool
    defines_stress: bool

    def __call__(self, batch: Batch, compute_stress: bool = False) -> dict[str, Tensor]:
        """Raw ``"energy"`` ``[n_systems]``, ``"forces"`` ``[n_atoms, 3]`` and, with
        ``compute_stress``, ``"stress"`` ``[n_systems, 3, 3]``."""
        ...

    def supported_numbers(self) -> list[int] | None:
        """The atomic numbers the model has parameters for (``None``: every element)."""
        ...


@runtime_checkable
class FixedShapeModel(Model, Protocol):
    """A :class:`Model` that can also run with fixed shapes, capturable in a CUDA graph.

    Attributes:
        fixed_shapes: whether :meth:`fixed_shape_inputs` and :meth:`fixed_shape_forward` are
            available for this instance.
    """

    fixed_shapes: bool

    def fixed_shape_inputs(
        self, batch: Batch, previous: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """Inputs of :meth:`fixed_shape_forward` for ``batch``, at least as large as
        ``previous`` (inputs built earlier for the same atoms)."""
        ...

    def fixed_shape_forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """The outputs of ``__call__`` from :meth:`fixed_shape_inputs`, with fixed shapes and
        no host synchronisation, plus ``"overflow"`` ``[1]`` bool."""
        ...


def missing_members(model: object) -> list[str]:
    """The members of :class:`Model` that ``model`` lacks (none: it is a model)."""
    methods = ["__call__", "supported_numbers"]
    return [name for name in [*Model.__annotations__, *methods] if not hasattr(model, name)]
