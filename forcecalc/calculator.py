"""ASE calculators for SpinConv and ForceNet.

Energy semantics: the OC20 checkpoints (OCP's and ours trained on OC20-EMT) predict
**adsorption-referenced** energies as OC20 defines them (the system's energy minus the clean
slab's and the adsorbate's gas-phase references), not total energies. Differences between
configurations of the same adsorbate/slab system (relaxation, MD, NEB barriers) are meaningful;
comparing the absolute number with a DFT total energy is not.
"""

from __future__ import annotations

import copy
import os
from typing import Any, ClassVar

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import (
    CalculationFailed,
    Calculator,
    PropertyNotImplementedError,
    all_changes,
    equal,
)

from forcecalc.checkpoint import Potential, as_potential
from forcecalc.compiled import compiled_blocks, compiled_function
from forcecalc.graph import Batch, radius_graph
from forcecalc.graph.batch import atoms_to_arrays
from forcecalc.graph.neighbors import MIN_DISTANCE_SQ, checked_skin, has_volume
from forcecalc.models.spinconv import warn_max_neighbor_cut
from forcecalc.replay import GraphReplay

#: The Voigt order ASE uses for stress: xx, yy, zz, yz, xz, xy.
VOIGT = (np.array([0, 1, 2, 1, 0, 0]), np.array([0, 1, 2, 2, 2, 1]))


class NonFiniteOutput(CalculationFailed):
    """The model's output was not finite (NaN or inf).

    Attributes:
        results: that output as ASE's results (``energy``, ``free_energy``, ``forces``
            ``[n_atoms, 3]`` and, where computed, ``stress`` ``[6]``), for a caller that keeps
            a record of where and how the model failed (``forcecalc relax``), as the batched
            engine keeps it.
    """

    def __init__(self, message: str, results: dict[str, Any]) -> None:
        super().__init__(message)
        self.results = results


class ForceCalculator(Calculator):
    """An ASE calculator for any forcecalc checkpoint (SpinConv or ForceNet).

    Args:
        checkpoint: a path, a shipped name (``"spinconv-fc"``), an OCP name
            (``"SpinConv-S2EF-OC20-All"``) or a loaded :class:`~forcecalc.checkpoint.Potential`.
        device: ``"cpu"``, ``"cuda"``...; default CUDA when available, else CPU (with a
            loaded ``Potential``: its device, and another one is an error).
        dtype: ``"float32"`` (default) or ``"float64"`` (use it for NVE MD); with a loaded
            ``Potential``: its dtype, and another one is an error.
        rotations: SpinConv force-centric only: ``None`` (a fixed, seeded set: forces are a
            deterministic function of positions), ``"random"`` (fresh every call, as the
            original) or a ``[R, 3, 3]`` array of rotation matrices.
        forces: energy-centric SpinConv only: ``"conservative"`` (the full ``-dE/dx``, and
            stress; the default of our checkpoints) or ``"compat"`` (OCP's definition, the
            gradient through the distances only; the default of OCP's checkpoints).
        max_neighbors: override the max-neighbor rule of the graph (the trained value
            otherwise; SpinConv's energy readout keeps its trained normalisation), for this
            calculator only (a ``Potential`` passed in is not changed).
        skin: if > 0, keep the neighbor list built at ``cutoff + skin`` and rebuild it only
            when an atom moved more than ``skin / 2``, the cell, numbers or pbc changed, or
            two atoms came within 0.01 Å of each other (the build then refuses them, as
            without a skin).  Results are identical to rebuilding every step.
        cuda_graph: replay the model's forward (for an energy-centric SpinConv with its
            backward pass, forces and stress) from captured CUDA graphs, one launch per step
            in place of hundreds (a small system's forward is bound by those launches).  The
            neighbor list's edges and tables are built on the CPU, padded to sizes that rarely
            change; the edge selection (cutoff, max-neighbor rule) runs inside the graph, so
            with a ``skin`` a step copies only the new positions to the device.  The same
            numbers as without.  Each new set of sizes (another structure, or edges that
            outgrow their padding) costs a capture, about three forwards; the last 4 graphs
            are kept.  For many steps of one structure (relaxation, MD), not for screening
            many structures once each.  On a CPU device the same fixed-shape forward runs
            without a graph.
        compile_mode: ``torch.compile`` the forward with this mode (``"default"`` or
            ``"max-autotune-no-cudagraphs"``): with ``cuda_graph`` the replayed fixed-shape
            forward (static shapes: SpinConv-All's 66-atom step on an H100 4.6 -> 3.3 ms),
            else the model's blocks (:func:`forcecalc.compiled.compiled_blocks`, on a copy).
            The first call compiles (seconds to a minute); the numbers agree to rounding.
        allow_unsafe: allow full unpickling of the checkpoint (trusted files only).
        label, directory, atoms: as for :class:`ase.calculators.calculator.Calculator`.

    ``calc.todict()`` (ASE writes it into trajectories and databases) holds the arguments that
    make the calculator again, as ASE's convention has it: ``load_calculator(**calc.todict())``
    (``allow_unsafe`` aside, never recorded); for a calculator of a loaded ``Potential``, its
    ``checkpoint`` is the file the potential was loaded from (None for one built in memory,
    which cannot be made again from a record).  The model's name is ``calc.name``
    (``forcecalc-spinconv``).

    Properties: ``energy`` and ``free_energy`` (eV, adsorption-referenced for OC20 models: see
    the module docstring), ``forces`` (eV/Å) and, for energy-centric SpinConv with
    ``forces="conservative"`` only (the default of our checkpoints, not of OCP's), ``stress``
    (eV/Å^3, Voigt order; for a cell of three independent vectors, as ASE's EMT: a slab's
    per volume of its whole cell, vacuum included).  For a cell periodic in all three
    directions the stress is computed with the forces, as ASE's EMT does, so that asking for
    it afterwards (MD loggers, NPT) costs nothing; for a slab only when asked for.  A model
    output that is not finite raises :class:`~ase.calculators.calculator.CalculationFailed`.

    On the CPU, run ASE's ``BFGS`` with numpy's BLAS held to one thread
    (``threadpoolctl.threadpool_limits(1, user_api="blas")``): its threads, busy after the
    Hessian's diagonalization, otherwise slow the next forward pass down (3x on 2 cores).
    """

    implemented_properties: ClassVar[list[str]] = ["energy", "free_energy", "forces", "stress"]
    model_name: ClassVar[str | None] = None

    def __init__(
        self,
        checkpoint: str | Potential,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        rotations: str | np.ndarray | torch.Tensor | None = None,
        forces: str | None = None,
        max_neighbors: int | None = None,
        skin: float = 0.0,
        cuda_graph: bool = False,
        compile_mode: str | None = None,
        allow_unsafe: bool = False,
        label: str | None = None,
        directory: str = ".",
        atoms: Any = None,
    ) -> None:
        # attached to ``atoms`` only once it is complete: a failed set-up leaves ``atoms.calc``
        super().__init__(label=label, directory=directory)
        options: dict[str, Any] = {}
        if rotations is not None:
            options["rotations"] = (
                rotations
                if isinstance(rotations, str)
                else torch.as_tensor(rotations, dtype=torch.float64)
            )
        if forces is not None:
            options["forces"] = forces
        potential = as_potential(
            checkpoint, device=device, dtype=dtype, allow_unsafe=allow_unsafe, **options
        )
        if forces is not None and not potential.energy_gradient:
            raise ValueError(
                f"forces={forces!r} applies to energy-centric SpinConv models only; this "
                f"{potential.name} model predicts its forces directly"
            )
        if self.model_name is not None and potential.name != self.model_name:
            raise ValueError(
                f"{type(self).__name__} needs a {self.model_name} checkpoint, but "
                f"{checkpoint!s} holds a {potential.name} model; use "
                f"forcecalc.load_calculator() to pick the calculator from the checkpoint"
            )
        if not isinstance(cuda_graph, bool | np.bool_):  # bool("no") would be True
            raise TypeError(f"cuda_graph must be True or False, got {cuda_graph!r}")
        if max_neighbors is not None:
            potential = _with_max_neighbors(potential, max_neighbors)
        checked_skin(skin)
        self.potential = potential
        self.implemented_properties = ["energy", "free_energy", "forces"] + (
            ["stress"] if potential.defines_stress else []
        )
        self.skin = float(skin)
        # what todict() reports (ASE writes it into trajectories and databases): the arguments
        # that make this calculator again, ASE's convention (Calc(**calc.todict())); a loaded
        # Potential's checkpoint is the file it was loaded from (None: built in memory)
        self.parameters.update(
            checkpoint=(
                str(checkpoint)
                if isinstance(checkpoint, str | os.PathLike)
                else potential.info.path
            ),
            device=str(potential.device),
            dtype=str(potential.dtype).removeprefix("torch."),
            max_neighbors=potential.max_neighbors,
            skin=self.skin,
            forces=potential.model.forces if potential.energy_gradient else None,
            # given matrices as nested lists: a trajectory or database records the run's
            rotations=(
                rotations
                if isinstance(rotations, str) or rotations is None
                else options["rotations"].tolist()
            ),
            cuda_graph=bool(cuda_graph),
            compile_mode=compile_mode,
        )
        self.replay: GraphReplay | None = None
        if cuda_graph:
            if not potential.fixed_shapes:
                raise ValueError(
                    f"cuda_graph needs a fixed-shape forward, which this {potential.name} model "
                    "does not have"
                )
            function = potential.fixed_shape_forward
            if compile_mode is not None:
                function = compiled_function(function, compile_mode)
            self.replay = GraphReplay(function, potential.device)
        elif compile_mode is not None:
            self.potential = compiled_blocks(potential, compile_mode)
        self._graph: tuple[np.ndarray, ...] | None = None
        self._near: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.graph_builds = 0
        # the fixed-shape inputs of the last call, with the graph build they came from
        self._inputs: tuple[int, dict[str, torch.Tensor]] | None = None
        if atoms is not None:
            atoms.calc = self

    def set(self, **kwargs: Any) -> dict[str, Any]:
        """Refuse to change options: they are fixed when the calculator is made (its
        ``parameters`` only describe them, for ``todict()``); setting a value it already has
        is allowed and changes nothing.

        Raises:
            ValueError: naming the options that would change, and how to get them.
        """
        changed = sorted(
            name
            for name, value in kwargs.items()
            if name not in self.parameters or not equal(value, self.parameters[name])
        )
        if changed:
            raise ValueError(
                f"{type(self).__name__} options are fixed when it is made ({', '.join(changed)} "
                "would change): make a new calculator with them, e.g. load_calculator(...)"
            )
        return {}

    def _get_name(self) -> str:
        """ASE's ``calc.name`` (a database row's ``calculator``): ``forcecalc-<model>``."""
        return f"forcecalc-{self.potential.name}"

    def __repr__(self) -> str:
        p = self.parameters
        return (
            f"{type(self).__name__}({p['checkpoint']!r}, model={self.potential.name!r}, "
            f"device={p['device']!r}, dtype={p['dtype']!r})"
        )

    def get_property(
        self, name: str, atoms: Atoms | None = None, allow_calculation: bool = True
    ) -> Any:
        if name == "stress" and not self.potential.defines_stress:
            raise PropertyNotImplementedError(
                f"stress of this {self.potential.name} model needs forces='conservative' (its "
                "compat forces, OCP's, differentiate the energy through the distance features "
                "only, and a stress so made is not the strain derivative of the energy)"
                if self.potential.energy_gradient
                else f"stress is not defined by this {self.potential.name} model: its forces "
                "are predicted directly, not as an energy gradient; use an energy-centric "
                "SpinConv checkpoint (e.g. 'spinconv-ec') for stress"
            )
        return super().get_property(name, atoms, allow_calculation)

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: list[str] | tuple[str, ...] = ("energy",),
        system_changes: list[str] = all_changes,
    ) -> None:
        if atoms is None and self.atoms is None:
            raise ValueError(
                "no atoms to compute: attach the calculator (atoms.calc = calc) and ask the "
                "atoms (atoms.get_potential_energy()), or pass them (calc.get_forces(atoms))"
            )
        super().calculate(atoms, properties, system_changes)
        # the fixed-shape inputs are built on the CPU; the batch checks the atoms first (a
        # cell of NaN is named there, before its volume is computed)
        device = self.potential.device if self.replay is None else torch.device("cpu")
        batch = self._batch(self.atoms, device)
        volume = bool(has_volume(self.atoms.cell.array)[0])
        if "stress" in properties and not volume:
            raise PropertyNotImplementedError(
                "stress needs a cell of three independent vectors, as ASE's EMT (for a slab "
                f"or a molecule: a cell with its vacuum); this one is {self.atoms.cell.tolist()}"
            )
        # with the forces for bulk, as ASE's EMT: ASE asks for one property at a time, and
        # stress asked for after the forces (MD loggers, NPT) would otherwise cost a second
        # evaluation; a slab's (or a boxed molecule's) only when asked for (8% of a step)
        want_stress = self.potential.defines_stress and (
            stress_with_forces(self.atoms.pbc, [volume])[0] or (volume and "stress" in properties)
        )
        self.potential.check_numbers(batch.numbers)
        if self.replay is not None:
            out = self._replayed(batch)
            if not want_stress:  # the fixed-shape forward of an energy-centric model gives it
                out.pop("stress", None)
        else:
            with torch.set_grad_enabled(self.potential.energy_gradient):
                out = self.potential(batch, compute_stress=want_stress)
        self._store(out)

    def _replayed(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The fixed-shape forward replayed on ``batch``: while the neighbor list is reused
        (``skin``), the inputs of its last build with the new positions (one small copy to
        the device, no host work on the graph); built again from the batch when the list was
        rebuilt, or when the forward reports more kept edges than room (ties at the cut), each
        build at least as large as the last (one signature, so one capture, while atoms move
        about as they do)."""
        assert self.replay is not None
        previous = None if self._inputs is None else self._inputs[1]
        if self._inputs is None or self._inputs[0] != self.graph_builds:
            inputs = self.potential.fixed_shape_inputs(batch, previous)
        else:
            inputs = self.potential.moved(self._inputs[1], batch)
        out = self.replay(inputs)
        if bool(out["overflow"]):
            inputs = self.potential.fixed_shape_inputs(batch, inputs)
            out = self.replay(inputs)
        if "cut" in out and bool(out["cut"]):
            warn_max_neighbor_cut(self.potential.max_neighbors, self.potential.cutoff)
        self._inputs = (self.graph_builds, inputs)
        return out

    def _store(self, out: dict[str, torch.Tensor]) -> None:
        energy = float(out["energy"][0].detach().cpu())
        results = {
            "energy": energy,
            "free_energy": energy,
            "forces": out["forces"].detach().cpu().double().numpy(),
        }
        if "stress" in out:
            stress = out["stress"][0].detach().cpu().double().numpy()
            results["stress"] = stress[VOIGT]
        bad = [name for name, value in results.items() if not np.isfinite(value).all()]
        if bad:
            raise NonFiniteOutput(
                f"the {self.potential.name} model returned non-finite {', '.join(bad)} (NaN or "
                f"inf) for {self.atoms.get_chemical_formula()}: its weights or normalizers are "
                "not finite, or the structure is far outside what it was trained on",
                results,
            )
        self.results = results

    def _batch(self, atoms: Atoms, device: torch.device) -> Batch:
        """The atoms as a one-system batch on ``device`` (positions and cell in float64), with
        edges built or reused (see ``skin``)."""
        arrays = atoms_to_arrays([atoms])
        positions, numbers, cell, pbc = arrays[:4]
        if not self._graph_is_valid(positions, numbers, cell, pbc):
            graph = radius_graph(
                torch.as_tensor(positions),
                torch.as_tensor(cell),
                torch.as_tensor(pbc),
                torch.zeros(len(positions), dtype=torch.int64),
                self.potential.cutoff + self.skin,
                name=lambda _: f"the structure ({atoms.get_chemical_formula()})",
            )
            self._graph = (positions, numbers, cell, pbc, graph.edge_index, graph.shifts)
            self._near = _near_pairs(positions, cell, graph.edge_index, graph.shifts, self.skin)
            self.graph_builds += 1
        edge_index, shifts = self._graph[4], self._graph[5]
        batch = Batch.from_arrays(*arrays).with_edges(edge_index, shifts)
        # positions and cell stay float64: the models cast what they compute in their dtype,
        # and SpinConv's frame geometry is float64 from the exact positions
        return batch.to(device=device, dtype=torch.float64)

    def _graph_is_valid(
        self, positions: np.ndarray, numbers: np.ndarray, cell: np.ndarray, pbc: np.ndarray
    ) -> bool:
        if self._graph is None or self.skin == 0:
            return False
        old_positions, old_numbers, old_cell, old_pbc = self._graph[:4]
        if (
            old_positions.shape != positions.shape
            or not np.array_equal(old_numbers, numbers)
            or not np.array_equal(old_cell, cell)
            or not np.array_equal(old_pbc, pbc)
        ):
            return False
        moved = np.linalg.norm(positions - old_positions, axis=1).max()
        if not moved <= 0.5 * self.skin:
            return False
        # two atoms that moved less can still meet: the builder then names them
        source, target, offsets = self._near
        vectors = positions[source] - positions[target] + offsets
        return not bool(((vectors * vectors).sum(axis=1) <= MIN_DISTANCE_SQ).any())


def stress_with_forces(pbc: np.ndarray, volume: np.ndarray) -> np.ndarray:
    """``[S]`` bool: the systems (``pbc`` ``[S, 3]`` or ``[3]``; ``volume`` ``[S]``, whether
    their cells have three independent vectors: :func:`has_volume`) whose stress is computed
    with their energy and forces, where the model defines one: those periodic along all three
    axes with a volume (bulk), as ASE's EMT does; by the calculators and by the batched
    relaxation alike (a slab's, per volume of its whole cell, only when a calculator is asked
    for it)."""
    return np.asarray(pbc, dtype=bool).reshape(-1, 3).all(axis=1) & np.asarray(volume, dtype=bool)


def _near_pairs(
    positions: np.ndarray,
    cell: np.ndarray,
    edge_index: torch.Tensor,
    shifts: torch.Tensor,
    skin: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(source [m], target [m], shift offsets [m, 3])`` of the edges shorter than ``skin +
    0.01 Å`` (of one structure: ``cell`` ``[1, 3, 3]``): the only pairs that can come within
    0.01 Å of each other while no atom has moved more than ``skin / 2``."""
    source, target = edge_index.numpy()
    offsets = shifts.numpy() @ cell[0]
    vectors = positions[source] - positions[target] + offsets
    near = (vectors * vectors).sum(axis=1) < (skin + MIN_DISTANCE_SQ**0.5) ** 2
    return source[near], target[near], offsets[near]


def _with_max_neighbors(potential: Potential, max_neighbors: int) -> Potential:
    """``potential`` with another max-neighbor rule, sharing its weights: the model is a
    shallow copy, so ``potential`` itself (perhaps shared by other calculators) is unchanged."""
    if isinstance(max_neighbors, bool) or int(max_neighbors) != max_neighbors or max_neighbors < 1:
        raise ValueError(f"max_neighbors must be an integer >= 1, got {max_neighbors!r}")
    if potential.max_neighbors is None:
        raise ValueError(f"the {potential.name} model has no max-neighbor rule to override")
    model = copy.copy(potential.model)
    model.max_neighbors = int(max_neighbors)
    return Potential(model, potential.info)


class SpinConvCalculator(ForceCalculator):
    """ASE calculator for SpinConv checkpoints (refuses other models); see ForceCalculator."""

    model_name = "spinconv"


class ForceNetCalculator(ForceCalculator):
    """ASE calculator for ForceNet checkpoints (refuses other models); see ForceCalculator.
    ForceNet predicts forces directly: no stress."""

    implemented_properties: ClassVar[list[str]] = ["energy", "free_energy", "forces"]
    model_name = "forcenet"


def load_calculator(checkpoint: str | Potential, **kwargs: Any) -> ForceCalculator:
    """An ASE calculator for whatever model ``checkpoint`` holds (see :class:`ForceCalculator`)."""
    return ForceCalculator(checkpoint, **kwargs)
