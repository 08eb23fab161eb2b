"""``relax``: many structures relaxed at once, with in-flight batching.

Every structure gets its own optimizer state (no coupling between systems); each step runs one
batched forward pass for all systems in flight.  A system leaves the batch as soon as it has
converged (ASE's criterion: the largest per-atom force norm, FixAtoms applied, below
``fmax``) or used its ``steps``, and the next queued structure takes its place.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from forcecalc.calculator import VOIGT
from forcecalc.graph.neighbors import checked_skin
from forcecalc.models.spinconv import no_max_neighbor_cut_warnings
from forcecalc.relax.engine import (
    Evaluator,
    SystemSet,
    admit,
    check_structures,
    count_all_edges,
)
from forcecalc.relax.memory import (
    CPU_MEMORY_MODEL,
    MemoryModel,
    cached_memory_model,
    cpu_peak_bytes,
    cpu_peak_measurable,
    cuda_peak_bytes,
    measure_memory_model,
    measurement_limit,
    memory_budget,
    remember_memory_model,
)
from forcecalc.relax.optimizers import BatchedOptimizer, make_optimizer

if TYPE_CHECKING:
    from ase import Atoms

#: Default neighbor-list skin (Å) by device type.  On the CPU a neighbor list costs far less
#: than the forward pass, while the extra edges of a skin slow the model down: no skin.  On
#: CUDA the list of a whole batch is rebuilt only every few steps (a relaxation step moves an
#: atom by at most 0.2 Å).
DEFAULT_SKIN = {"cpu": 0.0, "cuda": 0.5}


#: ``info["relax_error"]`` of a structure whose model output (energy, forces) was not finite,
#: by the batched engine and ``forcecalc relax`` one by one alike.
MODEL_NOT_FINITE = "the model's energy or forces are not finite (NaN or inf)"


def default_skin(device: torch.device) -> float:
    """The default skin on ``device`` (:data:`DEFAULT_SKIN`; 0.5 Å on other accelerators)."""
    return DEFAULT_SKIN.get(device.type, 0.5)


def resolve_potential(
    model: str | os.PathLike | nn.Module,
    device: str | torch.device | None,
    dtype: str | torch.dtype | None,
    **model_options: Any,
) -> nn.Module:
    """A loaded potential: the checkpoint ``model`` names, loaded on ``device`` in ``dtype``
    (float32 unless said otherwise) with ``model_options`` (``allow_unsafe`` and the options
    of :func:`~forcecalc.checkpoint.load_checkpoint`); a loaded
    :class:`~forcecalc.checkpoint.Potential` itself (a ``device`` or ``dtype`` other than its
    own is a ``ValueError``); any other module with a ``cutoff`` (Å) itself, as it is (one
    without is a ``TypeError``).  Model options with a loaded model are a ``ValueError``
    naming them."""
    from forcecalc.checkpoint import (
        Potential,
        as_potential,
        check_option_names,
        refuse_loading_options,
    )

    if isinstance(model, nn.Module) and not isinstance(model, Potential):
        check_option_names(model_options)
        refuse_loading_options(model_options)
        if not hasattr(model, "cutoff"):
            raise TypeError(
                f"the model, a {type(model).__name__}, is no forcecalc Potential and has no "
                "cutoff (Å): a module passed as a model needs a Potential's interface "
                "(cutoff, forward(batch) -> {'energy', 'forces'})"
            )
        return model
    return as_potential(model, device=device, dtype=dtype, **model_options)


def potential_device(potential: nn.Module) -> torch.device:
    """The device a potential runs on (its ``device`` attribute, else its parameters')."""
    device = getattr(potential, "device", None)
    if device is not None:
        return torch.device(device)
    parameter = next(potential.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def plan_batches(
    potential: nn.Module,
    structures: Sequence,
    batch_size: str | int,
    skin: float,
    memory: MemoryModel | None = None,
) -> tuple[Evaluator, int | None]:
    """The evaluator (with its memory model) and the most systems in flight.

    Args:
        potential: the loaded model.
        structures: the inputs (the up to 8 largest are used to measure the memory model, on
            CUDA and on a Linux CPU).
        batch_size: ``"auto"`` (as many systems as the memory model allows) or a count.
        skin: neighbor-list skin (the edges the model receives are built at cutoff + skin).
        memory: a memory model to use instead of the measured/default one (its budget is
            kept; ``"auto"`` only).

    Returns:
        ``(evaluator, max_systems)`` with ``max_systems`` None for ``"auto"``.
    """
    device = potential_device(potential)
    if batch_size == "auto":
        if memory is None:
            memory = _auto_memory_model(potential, structures, skin, device)
        return Evaluator(potential, memory), None
    if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be 'auto' or an int >= 1, got {batch_size!r}")
    batch_size = int(batch_size)
    model = memory or cached_memory_model(potential, device) or CPU_MEMORY_MODEL
    return Evaluator(potential, model.with_budget(float("inf"))), batch_size


@dataclass
class RunPlan:
    """What a batched run needs, resolved from the user's arguments."""

    structures: list
    potential: nn.Module
    device: torch.device
    skin: float
    evaluate: Evaluator
    max_systems: int | None
    edge_counts: dict[int, int]


def plan_run(
    structures: Sequence | Any,
    model: str | nn.Module,
    device: str | torch.device | None,
    dtype: str | torch.dtype | None,
    skin: float | None,
    batch_size: str | int,
    memory: MemoryModel | None,
    model_options: dict[str, Any],
) -> RunPlan | None:
    """Load the model (with ``model_options``: see :func:`resolve_potential`), check the
    structures, choose the skin and the batching (None: no structures). ``structures`` may be
    one ``Atoms`` or a sequence of them.

    Every structure's edges are counted here, before any work (the memory budget admits
    structures by their counts): a structure whose atoms overlap is a ``ValueError`` naming
    it now, not when it would enter the batch, after the work on those before it.
    """
    structures = [structures] if hasattr(structures, "get_positions") else list(structures)
    potential = resolve_potential(model, device, dtype, **model_options)
    check_structures(structures, potential)
    if not structures:
        return None
    device_ = potential_device(potential)
    skin = default_skin(device_) if skin is None else checked_skin(skin)
    edge_counts = count_all_edges(structures, float(potential.cutoff) + skin)
    evaluate, max_systems = plan_batches(potential, structures, batch_size, skin, memory)
    return RunPlan(structures, potential, device_, skin, evaluate, max_systems, edge_counts)


#: Scale of the compressed copy of the samples among the memory-model measurements (denser:
#: about twice the edges per atom, so that the fit tells the cost of an edge from that of an
#: atom; with the samples alone the two grow in one ratio).
DENSE_SAMPLE_SCALE = 0.8


def memory_sample_batches(
    potential: nn.Module, structures: Sequence, skin: float, device: torch.device
) -> list:
    """The batches the memory model is measured on: the (up to 8) largest structures, by
    atoms, in batches of 1, 2, 4 and 8, and the largest of them again with every length
    scaled by :data:`DENSE_SAMPLE_SCALE` (more edges per atom).  Graphs at the model's cutoff
    + ``skin``, on ``device`` in the model's dtype.  The largest, because the peaks of tiny
    structures (gas-phase atoms, small molecules, often first in a screening) are below what
    a measurement resolves, and the fit would admit everything after them.  Beyond the first
    two, batches that :data:`CPU_MEMORY_MODEL` puts past :func:`measurement_limit` are left
    out (a measuring pass on a CPU must not meet the out-of-memory killer)."""
    largest = sorted(range(len(structures)), key=lambda k: -len(structures[k]))[:8]
    samples = [structures[k] for k in sorted(largest)]
    sizes = sorted({1, 2, 4, len(samples)} & set(range(1, len(samples) + 1)))
    if len(sizes) < 2:
        samples, sizes = samples * 2, [1, 2]
    dense = []
    for atoms in samples[: sizes[-1]]:
        atoms = atoms.copy()  # scaled about the origin (also without a cell)
        atoms.set_positions(atoms.positions * DENSE_SAMPLE_SCALE, apply_constraint=False)
        atoms.set_cell(atoms.cell[:] * DENSE_SAMPLE_SCALE)
        dense.append(atoms)
    batches = []
    limit = measurement_limit(device)
    for chosen in [samples[:size] for size in sizes] + [dense]:
        # compressed copies: closer contacts than the user's structures have, not theirs
        systems = SystemSet(float(potential.cutoff), skin, device, warn_contacts=False)
        systems.extend(chosen, list(range(len(chosen))))
        batch = systems.batch(0, systems.n_systems)
        # beyond the first two, none a conservative estimate puts past the memory at hand
        if len(batches) < 2 or CPU_MEMORY_MODEL.cost(batch.n_atoms, batch.n_edges) <= limit:
            batches.append(batch)
    return batches


def _auto_memory_model(
    potential: nn.Module, structures: Sequence, skin: float, device: torch.device
) -> MemoryModel:
    """The memory model of ``potential`` on ``device`` with the device's budget: measured on
    ``structures`` (or earlier, on structures at least half as large as the largest here);
    the fixed :data:`CPU_MEMORY_MODEL` where a CPU cannot measure, or where a measurement
    resolved no cost per atom or edge (structures too small to tell: then not kept)."""
    cuda = device.type == "cuda"
    largest = max((len(atoms) for atoms in structures), default=0)
    model = cached_memory_model(potential, device, largest)
    if model is None and not cuda and not cpu_peak_measurable():
        return CPU_MEMORY_MODEL
    if model is None:
        grad = bool(getattr(potential, "energy_gradient", False))
        measure = cuda_peak_bytes if cuda else cpu_peak_bytes
        batches = memory_sample_batches(potential, structures, skin, device)
        # the measuring passes warn of nothing: the compressed copies are no structures of the
        # user's (a max-neighbor cut in one is none of theirs; their graphs warn of no close
        # contact), and the user's own are evaluated, and warned of, by the run itself
        with no_max_neighbor_cut_warnings():
            model = measure_memory_model(potential, batches, grad, measure)
        if model.bytes_per_atom <= 0 and model.bytes_per_edge <= 0:
            return CPU_MEMORY_MODEL.with_budget(memory_budget(device))
        remember_memory_model(potential, device, model, largest)
    return model.with_budget(memory_budget(device))


def relax(
    structures: Sequence,
    model: str | os.PathLike | nn.Module,
    optimizer: str = "fire",
    fmax: float = 0.05,
    steps: int = 300,
    batch_size: str | int = "auto",
    skin: float | None = None,
    trajectory: bool = False,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    optimizer_options: dict[str, Any] | None = None,
    progress: bool = False,
    memory: MemoryModel | None = None,
    **model_options: Any,
) -> list:
    """Relax many structures at once on the model's device, each as ASE's optimizer would.

    Each structure is relaxed by its own copy of the optimizer (ASE's FIRE, LBFGS or BFGS with
    ASE's defaults: see :mod:`forcecalc.relax.optimizers`), to the positions ASE reaches with
    forcecalc's calculator, to float tolerance.  FixAtoms is honored (fixed atoms never move);
    other constraints are refused.  Converged structures leave the batch and queued ones take
    their place; on an out-of-memory error the batch is split and nothing is lost (a structure
    too large to evaluate even alone ends unrelaxed, with ``info["relax_error"]`` saying so).

    Args:
        structures: ``ase.Atoms`` (not modified); one ``Atoms`` is taken as a list of one.
        model: a checkpoint name or path, or a loaded :class:`~forcecalc.checkpoint.Potential`
            (or any module with its interface: ``cutoff``, ``dtype``, ``forward(batch)``).
        optimizer: ``"fire"``, ``"lbfgs"`` or ``"bfgs"`` (any case).
        fmax: convergence threshold (eV/Å) on the largest per-atom force norm.
        steps: most optimizer steps per structure (ASE's ``run(steps=...)``).
        batch_size: ``"auto"`` (fill the device's memory budget: see
            :mod:`forcecalc.relax.memory`) or the most structures in flight.
        skin: neighbor lists are built at ``cutoff + skin`` (Å) and rebuilt per system when one
            of its atoms moved more than ``skin / 2`` (0: rebuilt every step; None: 0 on the
            CPU, 0.5 on CUDA, see :data:`DEFAULT_SKIN`).  Results do not depend on it.
        trajectory: keep every step of each structure in ``atoms.info["trajectory"]`` (a list
            of ``ase.Atoms`` with energies and forces, the initial structure first; pop it
            before writing extxyz).
        device, dtype: where and in which precision to load a checkpoint (default CUDA when
            available, float32); with a loaded Potential, its own (another one is an error).
        optimizer_options: ASE-named options of the optimizer (e.g. ``{"maxstep": 0.1}``).
        progress: show a progress bar of finished structures.
        memory: a memory model to budget with (``"auto"``; default measured or fixed).
        **model_options: for loading a checkpoint, as :func:`~forcecalc.predict.predict`'s:
            ``allow_unsafe`` and the model's options of
            :func:`~forcecalc.checkpoint.load_checkpoint` (e.g. ``forces="conservative"``);
            with a loaded model, an error.

    Returns:
        The relaxed structures in input order: copies of the inputs with the final positions,
        a ``SinglePointCalculator`` with the final ``energy``/``free_energy``, (raw)
        ``forces`` and, for a structure periodic along all three axes whose model defines a
        stress (``spinconv-ec``), its ``stress`` (eV/Å^3, Voigt order), computed with them as
        the calculators do (:func:`~forcecalc.calculator.stress_with_forces`; trajectory
        frames too), ``info["relax_steps"]`` (steps taken), ``info["relax_converged"]`` and
        ``info["relax_initial_energy"]`` (eV, before the first step); a structure whose
        model output (energy, forces) or optimizer step was not finite (e.g. LBFGS where the
        forces vanish) ends there, unconverged, with ``info["relax_error"]`` saying which
        (with the model's NaN outputs, and, with ``trajectory``, the frames recorded before:
        none if its first evaluation failed); so does one whose atoms a step brought within
        0.01 Å of each other (energy and forces NaN: the graph cannot be built).
    """
    from tqdm.auto import tqdm

    if isinstance(fmax, bool) or not isinstance(fmax, Real) or not fmax >= 0:  # 0: all steps
        raise ValueError(f"fmax must be a number >= 0 (eV/Å), got {fmax!r}")
    if isinstance(steps, bool) or not isinstance(steps, Real) or not steps >= 0:
        raise ValueError(f"steps must be a number >= 0, got {steps!r}")
    opt = make_optimizer(optimizer, optimizer_options)
    plan = plan_run(structures, model, device, dtype, skin, batch_size, memory, model_options)
    if plan is None:
        return []
    total = len(plan.structures)
    with tqdm(total=total, disable=not progress, desc="relax", unit="structure") as bar:
        return _Relaxation(plan, opt, trajectory, bar.update).run(fmax, steps)


class _Relaxation:
    """One batched relaxation: the systems in flight with their optimizer, and per system (in
    the set's order) its steps taken and first energy; the queue of input indices not yet
    admitted; the results and trajectories by input index.

    Every method that ends systems (:meth:`_retire`) keeps the per-system lists aligned with
    the set and the optimizer.
    """

    def __init__(
        self,
        plan: RunPlan,
        opt: BatchedOptimizer,
        trajectory: bool,
        finished: Callable[[int], object],
    ) -> None:
        self.plan, self.opt, self.trajectory, self.finished = plan, opt, trajectory, finished
        self.systems = SystemSet(float(plan.potential.cutoff), plan.skin, plan.device)
        self.results: list[Any] = [None] * len(plan.structures)
        self.frames: dict[int, list] = {}
        self.taken: list[int] = []
        self.initial: list[float] = []
        self.queue = list(range(len(plan.structures)))[::-1]

    def run(self, fmax: float, steps: int) -> list:
        """Relax every structure; the results in input order."""
        systems = self.systems
        while self.queue or systems.n_systems:
            outputs = self._admit_and_evaluate()
            if outputs is None:
                continue
            energy, raw_forces, stress = self._end_not_finite(*outputs)
            if not systems.n_systems:
                continue
            forces = systems.constrained_forces(raw_forces)
            converged = systems.max_force(forces) < fmax
            out_of_steps = torch.as_tensor([n >= steps for n in self.taken], device=systems.device)
            done = converged | out_of_steps
            if self.trajectory:
                _record(systems, self.plan.structures, energy, raw_forces, stress, self.frames)
            if bool(done.any()):
                keep, atom_keep = self._retire(energy, raw_forces, stress, done, converged)
                forces, raw_forces, energy = forces[atom_keep], raw_forces[atom_keep], energy[keep]
                stress = None if stress is None else stress[keep]
            if systems.n_systems:
                self._step(energy, raw_forces, stress, forces)
        return self.results

    def _admit_and_evaluate(self) -> tuple[Tensor, Tensor, Tensor | None] | None:
        """Admit queued structures while they fit, then the energies ``[S]``, raw forces
        ``[N, 3]`` and stress ``[S, 3, 3]`` (NaN but for bulk systems; None without any: see
        :meth:`~forcecalc.relax.engine.Evaluator.outputs`) of every system in flight (None: a
        step's overlaps ended them all)."""
        plan, systems = self.plan, self.systems
        admitted = admit(
            systems, plan.evaluate, plan.structures, self.queue, plan.max_systems, plan.edge_counts
        )
        if admitted:
            self.opt.add(systems.natoms[-admitted:])
            self.taken.extend([0] * admitted)
            self.initial.extend([torch.nan] * admitted)  # their first energies, once evaluated
        try:
            outputs = plan.evaluate.outputs(systems, stress=True)
        except ValueError:
            if not self._end_overlapping():
                raise
            if not systems.n_systems:
                return None
            outputs = plan.evaluate.outputs(systems, stress=True)
        if admitted:  # still the last ones: an overlap ends only systems that took a step
            self.initial[len(self.initial) - admitted :] = outputs[0][-admitted:].tolist()
        return outputs

    def _end_not_finite(
        self, energy: Tensor, raw_forces: Tensor, stress: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """End the systems whose model output is not finite (a model that fails there, or a
        structure too large for the memory even alone); the others' energy, forces and
        stress."""
        broken = ~torch.isfinite(energy) | self.systems.non_finite(raw_forces)
        if not bool(broken.any()):
            return energy, raw_forces, stress
        ids, failures = self.systems.ids, self.plan.evaluate.failures
        keep, atom_keep = self._retire(
            energy, raw_forces, stress, broken, torch.zeros_like(broken), MODEL_NOT_FINITE
        )
        for index in set(ids) & set(failures):  # too large to evaluate alone
            self.results[index].info["relax_error"] = failures.pop(index)
        return energy[keep], raw_forces[atom_keep], None if stress is None else stress[keep]

    def _step(
        self, energy: Tensor, raw_forces: Tensor, stress: Tensor | None, forces: Tensor
    ) -> None:
        """One optimizer step of every system in flight (``forces`` with FixAtoms applied).
        A system whose step is not finite (e.g. LBFGS with zero forces, as ASE's) ends here,
        unconverged, with its last finite positions."""
        systems = self.systems
        step = self.opt.step(systems, forces)
        finite = ~systems.non_finite(step)
        if not bool(finite.all()):
            _, atom_keep = self._retire(
                energy,
                raw_forces,
                stress,
                ~finite,
                torch.zeros_like(finite),
                step_not_finite(self.opt.name),
            )
            step = step[atom_keep]
        systems.positions = systems.positions + step
        self.taken[:] = [n + 1 for n in self.taken]

    def _end_overlapping(self) -> bool:
        """End the systems whose graph cannot be built because a step brought two atoms
        within 0.01 Å of each other (no model output there: NaN); whether there were any.
        Systems that just entered, unevaluated, are never among them (checked up front)."""
        systems, device = self.systems, self.plan.device
        overlapping = systems.graph_problems(range(systems.n_systems))
        if not overlapping:
            return False
        ids, steps_taken = systems.ids, list(self.taken)
        energy = torch.full((systems.n_systems,), torch.nan, dtype=torch.float64, device=device)
        raw_forces = torch.full((systems.n_atoms, 3), torch.nan, dtype=torch.float64, device=device)
        ended = torch.zeros(systems.n_systems, dtype=torch.bool, device=device)
        ended[list(overlapping)] = True
        self._retire(energy, raw_forces, None, ended, torch.zeros_like(ended))
        for k, problem in overlapping.items():
            self.results[ids[k]].info["relax_error"] = atoms_met(steps_taken[k], problem)
        return True

    def _retire(
        self,
        energy: Tensor,
        raw_forces: Tensor,
        stress: Tensor | None,
        ended: Tensor,
        converged: Tensor,
        error: str | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Store the systems ``ended`` ``[S]`` in the results as ``ase.Atoms`` (``energy``
        ``[S]``, ``raw_forces`` ``[N, 3]``, ``stress`` ``[S, 3, 3]`` or None; with ``error``
        as their ``info["relax_error"]``, if given) and drop them from the set, the optimizer
        and the per-system lists; returns the kept systems' ``[S]`` and atoms' ``[N]``
        masks."""
        systems, structures = self.systems, self.plan.structures
        positions, force_list = _split(systems.positions, systems), _split(raw_forces, systems)
        energies, flags, ended_host = energy.cpu().tolist(), converged.tolist(), ended.tolist()
        stresses = _host_stress(stress, systems.n_systems)
        for k, index in enumerate(systems.ids):
            if not ended_host[k]:
                continue
            atoms = _snapshot(
                structures[index], positions[k], energies[k], force_list[k], stresses[k]
            )
            atoms.info["relax_steps"] = int(self.taken[k])
            atoms.info["relax_converged"] = bool(flags[k])
            atoms.info["relax_initial_energy"] = float(self.initial[k])
            if error is not None:
                atoms.info["relax_error"] = error
            if self.trajectory:
                atoms.info["trajectory"] = self.frames.pop(index, [])
            self.results[index] = atoms
        self.finished(sum(ended_host))
        keep = ~ended
        atom_keep = systems.keep(keep)
        self.opt.keep(keep, atom_keep)
        self.taken[:] = [n for n, gone in zip(self.taken, ended_host, strict=True) if not gone]
        self.initial[:] = [e for e, gone in zip(self.initial, ended_host, strict=True) if not gone]
        return keep, atom_keep


def _split(values: Tensor, systems: SystemSet) -> list[np.ndarray]:
    """``[N, ...]`` device tensor → one float64 numpy array per system."""
    host = values.detach().cpu().numpy()
    return np.split(host, np.cumsum(systems.natoms_list)[:-1])


def _host_stress(stress: Tensor | None, n_systems: int) -> list[np.ndarray | None]:
    """``[S, 3, 3]`` device stress (or None) → per system a ``[3, 3]`` array or None."""
    if stress is None:
        return [None] * n_systems
    return list(stress.cpu().numpy())


def _snapshot(
    atoms: Atoms,
    positions: np.ndarray,
    energy: float,
    forces: np.ndarray,
    stress: np.ndarray | None = None,
) -> Atoms:
    """A copy of ``atoms`` at ``positions`` ``[n, 3]`` with a ``SinglePointCalculator`` of
    ``energy``, ``forces`` ``[n, 3]`` and the ``[3, 3]`` ``stress`` where it is finite (a
    bulk system's, as the calculators give it: Voigt order)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    copy = atoms.copy()
    copy.info.pop("trajectory", None)  # an input's own (from an earlier run): not nested
    copy.positions = positions
    results = {"energy": energy, "free_energy": energy, "forces": forces}
    if stress is not None and np.isfinite(stress).all():
        results["stress"] = stress[VOIGT]
    copy.calc = SinglePointCalculator(copy, **results)
    return copy


def _record(
    systems: SystemSet,
    structures: Sequence,
    energy: Tensor,
    forces: Tensor,
    stress: Tensor | None,
    frames: dict[int, list],
) -> None:
    positions, force_list = _split(systems.positions, systems), _split(forces, systems)
    energies, stresses = energy.cpu().tolist(), _host_stress(stress, systems.n_systems)
    for k, index in enumerate(systems.ids):
        frame = _snapshot(structures[index], positions[k], energies[k], force_list[k], stresses[k])
        frames.setdefault(index, []).append(frame)


def step_not_finite(optimizer: str) -> str:
    """``info["relax_error"]`` of a structure whose ``optimizer`` step was not finite (ASE's
    LBFGS at zero forces), by the batched engine and ``forcecalc relax`` one by one alike."""
    return f"the {optimizer.lower()} step was not finite (NaN or inf)"


def atoms_met(step: int, problem: str) -> str:
    """``info["relax_error"]`` of a structure whose step ``step`` brought two atoms within
    0.01 Å of each other (the graph builder's ``problem``), by the batched engine and
    ``forcecalc relax`` one by one alike."""
    return (
        f"step {step} brought atoms within 0.01 Å of each other (no energy or forces there; "
        f"the positions are those of that step): {problem}"
    )
