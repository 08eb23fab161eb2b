"""The in-flight batch: systems that enter and leave, their neighbor lists, one force call.

:class:`SystemSet` holds the systems being relaxed or integrated as flat tensors (atoms of a
system contiguous, systems in the order they entered), with float64 positions (the optimizer's
master copy, as ASE keeps them) and a neighbor list per system built at ``cutoff + skin`` and
reused until one of the system's atoms has moved more than ``skin / 2`` since the build (or
two of its atoms have come within 0.01 Å of each other, which the build refuses).
Systems leave with :meth:`SystemSet.keep` and enter with :meth:`SystemSet.extend`; per-system
state of an optimizer or integrator follows the same two operations.

:class:`Evaluator` turns the set into one batched forward pass (or several, when the batch
does not fit: see :mod:`forcecalc.relax.memory`) and returns float64 energies and forces.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from forcecalc.calculator import stress_with_forces
from forcecalc.graph import Batch, radius_graph
from forcecalc.graph.batch import check_atoms, fixed_mask
from forcecalc.graph.neighbors import MIN_DISTANCE_SQ, edge_vectors, has_volume
from forcecalc.relax.memory import MemoryModel, is_out_of_memory, release_cached_memory

if TYPE_CHECKING:
    from ase import Atoms


def segment_max(values: Tensor, index: Tensor, n_segments: int) -> Tensor:
    """``[n_segments]`` maxima of ``values`` ``[n]`` grouped by ``index`` (``-inf`` if empty)."""
    out = values.new_full((n_segments,), float("-inf"))
    return out.scatter_reduce_(0, index, values, "amax")


def supported_constraints(atoms: Atoms, index: int) -> None:
    """Raise ``ValueError`` if ``atoms`` has a constraint other than ``FixAtoms``."""
    from ase.constraints import FixAtoms

    others = [type(c).__name__ for c in atoms.constraints if not isinstance(c, FixAtoms)]
    if others:
        raise ValueError(
            f"structure {index} ({atoms.get_chemical_formula()}) has constraints "
            f"{', '.join(others)}; the batched engine honors FixAtoms only (use ASE's "
            "optimizers with forcecalc's calculator for other constraints)"
        )


class SystemSet:
    """The systems in flight, flattened, with per-system neighbor lists.

    Attributes (``S`` systems, ``N`` atoms, ``E`` edges):
        ids: input index of each system (host list, length ``S``).
        natoms_list: atoms per system (host list).
        edge_counts: edges per system (host list, for the memory budget).
        positions: ``[N, 3]`` float64 positions (Å).
        numbers, tags: ``[N]`` int64.
        fixed: ``[N]`` bool, atoms held by ``FixAtoms``.
        masses: ``[N]`` float64 (amu).
        system_idx: ``[N]`` int64 system of each atom.
        natoms: ``[S]`` int64.
        cell: ``[S, 3, 3]`` float64; pbc: ``[S, 3]`` bool.
        constrained: ``[S]`` bool, system has a FixAtoms constraint.
        edge_index: ``[2, E]`` (source, target) in set-wide atom indices; shifts ``[E, 3]``;
            edge_system ``[E]`` system of each edge (edges are not sorted by system).
        reference: ``[N, 3]`` positions at each system's last neighbor-list build.
        builds: neighbor-list builds per system (host list; the first build counts).
        bulk: whether each system's stress is computed with its forces, where the model
            defines one (host list; :func:`forcecalc.calculator.stress_with_forces`).
        warn_contacts: whether builds warn of atoms closer than any bond (off for the memory
            model's compressed samples).
    """

    def __init__(
        self, cutoff: float, skin: float, device: torch.device, warn_contacts: bool = True
    ) -> None:
        if skin < 0:
            raise ValueError(f"skin must be >= 0, got {skin}")
        self.cutoff = float(cutoff)
        self.skin = float(skin)
        self.warn_contacts = warn_contacts
        self.device = device
        f64, i64 = torch.float64, torch.int64
        self.ids: list[int] = []
        self.natoms_list: list[int] = []
        self.edge_counts: list[int] = []
        self.builds: list[int] = []
        self.bulk: list[bool] = []
        self.positions = torch.zeros(0, 3, dtype=f64, device=device)
        self.numbers = torch.zeros(0, dtype=i64, device=device)
        self.tags = torch.zeros(0, dtype=i64, device=device)
        self.fixed = torch.zeros(0, dtype=torch.bool, device=device)
        self.masses = torch.zeros(0, dtype=f64, device=device)
        self.system_idx = torch.zeros(0, dtype=i64, device=device)
        self.natoms = torch.zeros(0, dtype=i64, device=device)
        self.cell = torch.zeros(0, 3, 3, dtype=f64, device=device)
        self.pbc = torch.zeros(0, 3, dtype=torch.bool, device=device)
        self.constrained = torch.zeros(0, dtype=torch.bool, device=device)
        self.edge_index = torch.zeros(2, 0, dtype=i64, device=device)
        self.shifts = torch.zeros(0, 3, dtype=i64, device=device)
        self.edge_system = torch.zeros(0, dtype=i64, device=device)
        self.reference = torch.zeros(0, 3, dtype=f64, device=device)

    @property
    def n_systems(self) -> int:
        return len(self.ids)

    @property
    def n_atoms(self) -> int:
        return self.positions.shape[0]

    @property
    def graph_cutoff(self) -> float:
        """Radius of the stored neighbor lists: ``cutoff + skin``."""
        return self.cutoff + self.skin

    def atom_offsets(self) -> list[int]:
        """Host list of ``S + 1`` atom offsets of the systems."""
        return np.concatenate([[0], np.cumsum(self.natoms_list, dtype=np.int64)]).tolist()

    def extend(self, structures: Sequence, ids: Sequence[int]) -> None:
        """Append systems (``ase.Atoms``) with input indices ``ids``; builds their graphs."""
        if not structures:
            return
        device = self.device
        n_old, s_old = self.n_atoms, self.n_systems
        natoms = [len(a) for a in structures]
        fixed = np.concatenate([fixed_mask(a) for a in structures])

        def cat(old: Tensor, new: np.ndarray, dtype: torch.dtype) -> Tensor:
            return torch.cat([old, torch.as_tensor(new, dtype=dtype, device=device)])

        f64, i64 = torch.float64, torch.int64
        positions = np.concatenate([a.positions for a in structures])
        cell = np.stack([a.cell.array for a in structures])
        pbc = np.stack([a.pbc for a in structures])
        new_positions = torch.as_tensor(positions, dtype=f64, device=device)
        self.positions = torch.cat([self.positions, new_positions])
        self.reference = torch.cat([self.reference, new_positions])
        self.numbers = cat(self.numbers, np.concatenate([a.numbers for a in structures]), i64)
        self.tags = cat(self.tags, np.concatenate([a.get_tags() for a in structures]), i64)
        self.fixed = cat(self.fixed, fixed, torch.bool)
        self.masses = cat(self.masses, np.concatenate([a.get_masses() for a in structures]), f64)
        self.cell = cat(self.cell, cell, f64)
        self.pbc = cat(self.pbc, pbc, torch.bool)
        self.constrained = cat(
            self.constrained, np.array([len(a.constraints) > 0 for a in structures]), torch.bool
        )
        new_natoms = torch.as_tensor(natoms, dtype=i64, device=device)
        self.natoms = torch.cat([self.natoms, new_natoms])
        new_idx = torch.repeat_interleave(torch.arange(len(natoms), device=device), new_natoms)
        self.system_idx = torch.cat([self.system_idx, new_idx + s_old])
        self.ids.extend(int(i) for i in ids)
        self.natoms_list.extend(natoms)
        self.builds.extend([0] * len(natoms))
        self.bulk.extend(stress_with_forces(pbc, has_volume(cell)).tolist())
        self.edge_counts.extend([0] * len(natoms))
        atoms = torch.arange(n_old, self.n_atoms, device=device)
        self._rebuild(atoms, torch.arange(s_old, self.n_systems, device=device))

    def keep(self, keep: Tensor) -> Tensor:
        """Drop the systems where ``keep`` ``[S]`` (bool) is False.

        Returns:
            ``[N_old]`` bool mask of the atoms kept (to filter per-atom state alike).
        """
        keep_host = keep.tolist()
        atom_keep = keep[self.system_idx]
        new_system = torch.cumsum(keep.to(torch.int64), 0) - 1
        new_atom = torch.cumsum(atom_keep.to(torch.int64), 0) - 1
        edge_keep = keep[self.edge_system]
        self.edge_index = new_atom[self.edge_index[:, edge_keep]]
        self.shifts = self.shifts[edge_keep]
        self.edge_system = new_system[self.edge_system[edge_keep]]
        self.system_idx = new_system[self.system_idx[atom_keep]]
        for name in ("positions", "reference", "numbers", "tags", "fixed", "masses"):
            setattr(self, name, getattr(self, name)[atom_keep])
        for name in ("natoms", "cell", "pbc", "constrained"):
            setattr(self, name, getattr(self, name)[keep])
        for name in ("ids", "natoms_list", "edge_counts", "builds", "bulk"):
            values = getattr(self, name)
            setattr(self, name, [v for v, k in zip(values, keep_host, strict=True) if k])
        return atom_keep

    def refresh_neighbors(self) -> int:
        """Rebuild the graph of every system with an atom moved more than ``skin / 2`` since
        its last build (moved at all when ``skin == 0``), or with two atoms of a kept edge
        within 0.01 Å of each other (atoms that moved less can meet: the graph builder then
        names them).  Returns how many were rebuilt."""
        if self.n_systems == 0:
            return 0
        moved = ((self.positions - self.reference) ** 2).sum(dim=1)
        farthest = segment_max(moved, self.system_idx, self.n_systems)
        # "not within": a system whose positions stopped being finite is stale too, so the
        # graph builder sees them and refuses (NaN compares false); without a skin, every
        # system with an atom moved at all (one just built is not built again)
        stale = ~(farthest <= (0.5 * self.skin) ** 2)
        if self.skin > 0:
            vectors = edge_vectors(
                self.positions, self.cell, self.system_idx, self.edge_index, self.shifts
            )
            overlap = ((vectors * vectors).sum(dim=1) <= MIN_DISTANCE_SQ).to(torch.float64)
            stale |= segment_max(overlap, self.edge_system, self.n_systems) > 0
        systems = torch.nonzero(stale).flatten()
        if systems.numel() == 0:
            return 0
        atoms = torch.nonzero(stale[self.system_idx]).flatten()
        self._rebuild(atoms, systems)
        return int(systems.numel())

    def _rebuild(self, atoms: Tensor, systems: Tensor) -> None:
        """New graphs for ``systems`` (sorted indices) whose atoms are ``atoms`` (sorted)."""
        local_system = torch.zeros(self.n_systems, dtype=torch.int64, device=self.device)
        local_system[systems] = torch.arange(len(systems), device=self.device)
        try:
            graph = radius_graph(
                self.positions[atoms],
                self.cell[systems],
                self.pbc[systems],
                local_system[self.system_idx[atoms]],
                self.graph_cutoff,
                name=lambda k: self.name(int(systems[k])),
                warn_contacts=self.warn_contacts,
            )
        except ValueError as error:
            self._name_the_system(systems.tolist(), error)
            raise
        stale = torch.zeros(self.n_systems, dtype=torch.bool, device=self.device)
        stale[systems] = True
        old = ~stale[self.edge_system]
        new_edges = atoms[graph.edge_index]
        self.edge_index = torch.cat([self.edge_index[:, old], new_edges], dim=1)
        self.shifts = torch.cat([self.shifts[old], graph.shifts])
        self.edge_system = torch.cat([self.edge_system[old], self.system_idx[new_edges[1]]])
        self.reference[atoms] = self.positions[atoms]
        counts = torch.bincount(self.edge_system, minlength=self.n_systems).tolist()
        self.edge_counts = counts
        for s in systems.tolist():
            self.builds[s] += 1

    def _name_the_system(self, systems: list[int], error: ValueError) -> None:
        """Raise ``error`` again naming the first of ``systems`` whose graph cannot be built
        (overlapping atoms, positions that are not finite) by its input index and formula,
        with its own atom indices (the graph builder counts atoms over the whole call)."""
        problems = self.graph_problems(systems)
        if problems:
            s, problem = next(iter(problems.items()))
            raise ValueError(f"{self.name(s)}: {problem}") from error

    def graph_problems(self, systems: Iterable[int]) -> dict[int, str]:
        """``{system: the graph builder's error}`` for those of ``systems`` whose graph cannot
        be built alone (overlapping atoms, positions that are not finite): one neighbor search
        per system, for the path after an error."""
        offsets = self.atom_offsets()
        problems = {}
        for s in systems:
            a0, a1 = offsets[s], offsets[s + 1]
            try:
                radius_graph(
                    self.positions[a0:a1],
                    self.cell[s : s + 1],
                    self.pbc[s : s + 1],
                    torch.zeros(a1 - a0, dtype=torch.int64, device=self.device),
                    self.graph_cutoff,
                )
            except ValueError as own:
                problems[s] = str(own)
        return problems

    def name(self, system: int) -> str:
        """``system`` as messages name it: its input index and chemical formula."""
        from ase import Atoms

        offsets = self.atom_offsets()
        numbers = self.numbers[offsets[system] : offsets[system + 1]].tolist()
        return f"structure {self.ids[system]} ({Atoms(numbers=numbers).get_chemical_formula()})"

    def batch(self, start: int, stop: int) -> Batch:
        """Systems ``start..stop-1`` as a :class:`~forcecalc.graph.Batch`, positions and cell
        in float64 whatever the model's dtype (as the calculators pass them: the models cast
        what they compute, and SpinConv's frames come from the exact geometry)."""
        offsets = self.atom_offsets()
        a0, a1 = offsets[start], offsets[stop]
        if start == 0 and stop == self.n_systems:
            edge_index, shifts = self.edge_index, self.shifts
        else:
            mask = (self.edge_system >= start) & (self.edge_system < stop)
            edge_index, shifts = self.edge_index[:, mask] - a0, self.shifts[mask]
        return Batch(
            positions=self.positions[a0:a1],
            numbers=self.numbers[a0:a1],
            cell=self.cell[start:stop],
            pbc=self.pbc[start:stop],
            system_idx=self.system_idx[a0:a1] - start,
            natoms=self.natoms[start:stop],
            tags=self.tags[a0:a1],
            fixed=self.fixed[a0:a1],
            edge_index=edge_index,
            shifts=shifts,
        )

    def non_finite(self, values: Tensor) -> Tensor:
        """``[S]`` bool: whether a system has a row of ``values`` ``[N, 3]`` (per atom) that is
        not finite (NaN or inf)."""
        not_finite = (~torch.isfinite(values).all(dim=1)).to(values.dtype)
        return segment_max(not_finite, self.system_idx, self.n_systems) > 0

    def constrained_forces(self, forces: Tensor) -> Tensor:
        """``forces`` ``[N, 3]`` with FixAtoms applied (zero on fixed atoms), as ASE's
        ``atoms.get_forces()`` returns them."""
        return torch.where(self.fixed[:, None], torch.zeros_like(forces), forces)

    def max_force(self, forces: Tensor) -> Tensor:
        """``[S]`` largest per-atom force norm of each system (ASE's ``fmax`` criterion)."""
        return segment_max(torch.linalg.norm(forces, dim=1), self.system_idx, self.n_systems)


def check_structures(
    structures: Sequence, potential: nn.Module, engine: bool = True, overlaps: bool = False
) -> None:
    """Validate every structure before anything runs (ValueError naming the structure);
    ``engine``: also that its constraints are those the batched engine honors (whose plan
    checks overlapping atoms itself, as it counts every structure's edges); ``overlaps``:
    also that no two atoms overlap (a neighbor search per structure)."""
    for index, atoms in enumerate(structures):
        check_atoms(atoms, index)
        if engine:
            supported_constraints(atoms, index)
        if overlaps:
            _check_no_overlap(atoms, index)
    check = getattr(potential, "check_elements", None)
    if check is not None:
        check(structures)


def _check_no_overlap(atoms: Atoms, index: int) -> None:
    """A ValueError naming structure ``index`` if two of its atoms (or an atom and a periodic
    image) are closer than 0.01 Å (the graph builder names the atoms)."""
    try:
        radius_graph(
            torch.as_tensor(atoms.positions, dtype=torch.float64),
            torch.as_tensor(atoms.cell.array, dtype=torch.float64).unsqueeze(0),
            torch.as_tensor(atoms.pbc).unsqueeze(0),
            torch.zeros(len(atoms), dtype=torch.int64),
            0.0101,
        )
    except ValueError as error:
        raise ValueError(f"structure {index} ({atoms.get_chemical_formula()}): {error}") from None


class Evaluator:
    """Batched energies and forces of a :class:`SystemSet`, splitting on out-of-memory.

    Args:
        potential: ``potential(batch) -> {"energy": [S], "forces": [N, 3]}`` (a
            :class:`~forcecalc.checkpoint.Potential` or any module with ``dtype`` and
            ``energy_gradient``; with ``defines_stress``, also
            ``potential(batch, compute_stress=True)["stress"]`` ``[S, 3, 3]``).
        memory: the memory model; its ``budget`` caps the cost of one forward pass.  After an
            out-of-memory error the failed chunk is split in two (by cost), the cap drops to half
            its cost, and the evaluation goes on; a single system that does not fit alone gets
            NaN energy and forces, and its input index goes into ``failures`` with why.

    Attributes:
        cap: the current cost cap (bytes; lowered by out-of-memory errors).
        forward_calls: forward passes run (successful or not).
        oom_splits: out-of-memory errors recovered from.
        failures: ``{input index: message}`` of the systems too large to evaluate alone (the
            caller ends them and pops their entries).
    """

    def __init__(self, potential: nn.Module, memory: MemoryModel) -> None:
        self.potential = potential
        self.memory = memory
        self.cap = float(memory.budget)
        self.grad = bool(getattr(potential, "energy_gradient", False))
        self.forward_calls = 0
        self.oom_splits = 0
        self.failures: dict[int, str] = {}

    def system_costs(self, systems: SystemSet) -> list[float]:
        """Host list ``[S]`` of the predicted bytes of each system alone (without the
        fixed part)."""
        model = self.memory
        return [
            model.bytes_per_atom * a + model.bytes_per_edge * e
            for a, e in zip(systems.natoms_list, systems.edge_counts, strict=True)
        ]

    def __call__(self, systems: SystemSet) -> tuple[Tensor, Tensor]:
        """Refresh stale neighbor lists, then evaluate every system.

        Returns:
            ``energy`` ``[S]`` (eV) and ``forces`` ``[N, 3]`` (eV/Å), float64, unconstrained.
        """
        energy, forces, _ = self.outputs(systems, stress=False)
        return energy, forces

    def outputs(self, systems: SystemSet, stress: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """:meth:`__call__`'s energies and forces and, with ``stress`` where the model defines
        one, the stress of the bulk systems (``systems.bulk``), computed with them as the
        calculators compute it.

        Returns:
            ``energy`` ``[S]`` (eV), ``forces`` ``[N, 3]`` (eV/Å) and ``stress`` ``[S, 3, 3]``
            (eV/Å^3; NaN for the systems that are not bulk, or None without any), float64.
        """
        defined = bool(getattr(self.potential, "defines_stress", False))
        stress = stress and defined and any(systems.bulk)  # None without a bulk system
        systems.refresh_neighbors()
        costs = self.system_costs(systems)
        pending = deque(self._chunks(costs, 0, systems.n_systems))
        energies: dict[int, Tensor] = {}
        forces: dict[int, Tensor] = {}
        stresses: dict[int, Tensor | None] = {}
        while pending:
            start, stop = pending.popleft()
            try:
                self.forward_calls += 1
                energy, force, chunk_stress = self._forward(systems, start, stop, stress)
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                release_cached_memory(systems.device)
                if stop - start == 1:  # nothing left to split: this one ends, unevaluated
                    self.failures[systems.ids[start]] = (
                        f"out of memory for {systems.name(start)} alone "
                        f"({systems.natoms_list[start]} atoms, "
                        f"{systems.edge_counts[start]} edges within "
                        f"{systems.graph_cutoff:g} Å): {str(error).splitlines()[0][:200]}"
                    )
                    shape = (systems.natoms_list[start], 3)
                    energies[start] = systems.positions.new_full((1,), torch.nan)
                    forces[start] = systems.positions.new_full(shape, torch.nan)
                    stresses[start] = systems.positions.new_full((1, 3, 3), torch.nan)
                    continue
                self.oom_splits += 1
                chunk_cost = self.memory.bytes_fixed + sum(costs[start:stop])
                self.cap = min(self.cap, 0.5 * chunk_cost)
                middle = self._split_point(costs, start, stop)
                pending.extendleft([(middle, stop), (start, middle)])
                continue
            energies[start], forces[start], stresses[start] = energy, force, chunk_stress
        order = sorted(energies)
        return (
            torch.cat([energies[k] for k in order]),
            torch.cat([forces[k] for k in order]),
            torch.cat([stresses[k] for k in order]) if stress else None,
        )

    def fits(self, n_atoms: int, n_edges: int) -> bool:
        """Whether a batch of this size is within the current cap."""
        return self.memory.cost(n_atoms, n_edges) <= self.cap

    def _forward(
        self, systems: SystemSet, start: int, stop: int, stress: bool
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Energies ``[s]``, forces ``[n, 3]`` and, with ``stress``, the stress ``[s, 3, 3]``
        of the bulk systems (NaN for the others) of systems ``start..stop-1``, float64."""
        batch = systems.batch(start, stop)
        bulk = systems.bulk[start:stop]
        with torch.set_grad_enabled(self.grad):
            out = (
                self.potential(batch, compute_stress=True)
                if stress and any(bulk)
                else self.potential(batch)
            )
        energy = out["energy"].detach().to(torch.float64)
        forces = out["forces"].detach().to(torch.float64)
        if not stress:
            return energy, forces, None
        nan = energy.new_full((stop - start, 3, 3), torch.nan)
        if not any(bulk):
            return energy, forces, nan
        mask = torch.as_tensor(bulk, device=energy.device)[:, None, None]
        return energy, forces, torch.where(mask, out["stress"].detach().to(torch.float64), nan)

    def _chunks(self, costs: list[float], start: int, stop: int) -> list[tuple[int, int]]:
        """Contiguous runs of systems whose cost stays within the cap (at least one each)."""
        chunks, first, total = [], start, self.memory.bytes_fixed
        for s in range(start, stop):
            if s > first and total + costs[s] > self.cap:
                chunks.append((first, s))
                first, total = s, self.memory.bytes_fixed
            total += costs[s]
        if stop > first:
            chunks.append((first, stop))
        return chunks

    @staticmethod
    def _split_point(costs: list[float], start: int, stop: int) -> int:
        """The system index splitting ``start..stop-1`` into two halves of similar cost."""
        half = 0.5 * sum(costs[start:stop])
        running = 0.0
        for s in range(start, stop - 1):
            running += costs[s]
            if running >= half:
                return s + 1
        return stop - 1


def admit(
    systems: SystemSet,
    evaluate: Evaluator,
    structures: Sequence,
    queue: list[int],
    max_systems: int | None,
    edge_counts: dict[int, int],
) -> int:
    """Move queued structures into the set while the count and memory caps allow.

    Args:
        systems: the set in flight.
        evaluate: its evaluator (the memory check uses its current cap, finite for
            ``batch_size="auto"`` and after an out-of-memory error).
        structures: all inputs.
        queue: input indices still waiting, *reversed* (the next one last); admitted ones are
            popped.
        max_systems: most systems in flight (None: no count limit).
        edge_counts: the edge counts of the waiting structures (:func:`count_all_edges`;
            those admitted are popped).

    Returns:
        How many were admitted (at least one if the set was empty and the queue was not).
    """
    n_atoms, n_edges, chosen = systems.n_atoms, sum(systems.edge_counts), []
    while queue:
        if max_systems is not None and systems.n_systems + len(chosen) >= max_systems:
            break
        index = queue[-1]
        atoms, edges = len(structures[index]), edge_counts[index]
        if math.isfinite(evaluate.cap):
            if (systems.n_systems or chosen) and not evaluate.fits(
                n_atoms + atoms, n_edges + edges
            ):
                break
            n_atoms, n_edges = n_atoms + atoms, n_edges + edges
        del edge_counts[index]
        chosen.append(queue.pop())
    systems.extend([structures[i] for i in chosen], chosen)
    return len(chosen)


def count_all_edges(structures: Sequence, cutoff: float) -> dict[int, int]:
    """``{input index: directed edges within cutoff}`` of every structure (a ``ValueError``
    naming the first whose atoms overlap, closer than 0.01 Å)."""
    from forcecalc.graph import neighbor_list

    return {
        index: len(
            neighbor_list(atoms, cutoff, f"structure {index} ({atoms.get_chemical_formula()})")[0]
        )
        for index, atoms in enumerate(structures)
    }
