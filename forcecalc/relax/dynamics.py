"""``md``: molecular dynamics of many independent systems at once.

Two integrators, each reproducing the ASE class of the same name on every system separately
(ASE 3.23-3.29):

``"verlet"``
    ``ase.md.verlet.VelocityVerlet`` (NVE): half kick, drift, forces, half kick, with ASE's
    handling of FixAtoms (fixed atoms stay put; for a system with constraints the momenta after
    the drift are recomputed from the actual displacement, the first half of RATTLE).
``"langevin"``
    ``ase.md.langevin.Langevin`` (NVT, the propagator of Vanden-Eijnden & Ciccotti 2006, eq.
    23): the same coefficients ``c1..c5``, friction and temperature conventions, the same use of
    two standard-normal draws ``xi, eta`` of shape ``[n_atoms, 3]`` per system and step, and
    optionally ASE's (deprecated) ``fixcm`` centre-of-mass correction.

Random numbers of Langevin (``rng``):

``"numpy"``
    system ``i`` of the input draws from ``numpy.random.default_rng(seed + i)`` exactly as
    ASE's ``Langevin(..., rng=numpy.random.default_rng(seed + i))`` draws (``xi`` then ``eta``
    each step), so each trajectory equals ASE's to rounding.  The draws happen on the host
    (one transfer per step).
``"torch"`` (default)
    one ``torch.Generator`` on the device, seeded with ``seed``, draws ``xi`` and ``eta`` for
    the whole batch: the same distribution (and so the same ensemble statistics) with no host
    round trip, but the numbers depend on how the systems were batched.

Units follow forcecalc's CLI: ``timestep`` in fs, ``friction`` in 1/fs (ASE's
``Langevin(timestep=timestep * units.fs, friction=friction / units.fs)``), temperatures in K.
Initial momenta are the structures' own (``atoms.get_momenta()``; set them e.g. with
``MaxwellBoltzmannDistribution``); those of fixed atoms are zeroed as ASE's ``set_momenta`` does.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from numbers import Integral
from typing import Any

import numpy as np
import torch
from ase import Atoms, units
from torch import Tensor, nn

from forcecalc.graph.gather import RowIndex
from forcecalc.relax.engine import Evaluator, SystemSet, admit
from forcecalc.relax.memory import MemoryModel
from forcecalc.relax.relaxation import plan_run
from forcecalc.warning import warn


class VelocityVerlet:
    """ASE's ``VelocityVerlet`` per system; state: momenta ``[N, 3]`` (amu Å / ASE time).

    Args:
        timestep: fs.
    """

    def __init__(self, timestep: float) -> None:
        self.dt = timestep * units.fs
        self.momenta: Tensor | None = None

    def start(self, systems: SystemSet, momenta: Tensor) -> None:
        """Initial momenta ``[N, 3]`` (zeroed on fixed atoms)."""
        self.momenta = _unfixed(momenta, systems)

    def drift(self, systems: SystemSet, forces: Tensor) -> Tensor:
        """Half kick and drift with the forces ``[N, 3]`` (FixAtoms applied); returns the new
        positions ``[N, 3]``."""
        dt, masses = self.dt, systems.masses[:, None]
        momenta = self.momenta + 0.5 * dt * forces
        old = systems.positions
        new = torch.where(systems.fixed[:, None], old, old + dt * momenta / masses)
        recomputed = (new - old) * masses / dt
        self.momenta = torch.where(
            systems.constrained[systems.system_idx, None], recomputed, momenta
        )
        return new

    def kick(self, systems: SystemSet, forces: Tensor) -> None:
        """Second half kick with the new forces (momenta of fixed atoms set to zero)."""
        self.momenta = _unfixed(self.momenta + 0.5 * self.dt * forces, systems)

    def keep(self, system_keep: Tensor, atom_keep: Tensor) -> None:
        """Keep the state of the systems where ``system_keep`` ``[S]`` (bool) is True, whose
        atoms are those where ``atom_keep`` ``[N]`` is."""
        self.momenta = self.momenta[atom_keep]


class Langevin:
    """ASE's ``Langevin`` per system; state: momenta ``[N, 3]`` and the step's random kick.

    Args:
        timestep: fs.
        temperature_K: bath temperature (K).
        friction: 1/fs.
        fixcm: ASE's deprecated centre-of-mass correction of the random forces (ASE's default
            is True; ours False, as ASE recommends).
        draw: ``draw(n_atoms_of_each_system) -> (xi, eta)``, two ``[N, 3]`` float64 standard
            normal tensors on the device.
    """

    def __init__(
        self,
        timestep: float,
        temperature_K: float,
        friction: float,
        fixcm: bool,
        draw: Any,
    ) -> None:
        self.dt = timestep * units.fs
        self.temperature = units.kB * temperature_K
        self.friction = friction / units.fs
        self.fixcm = fixcm
        self.draw = draw
        self.momenta: Tensor | None = None
        self.velocity: Tensor | None = None  # of the step between drift and kick
        self.rnd_vel: Tensor | None = None

    def start(self, systems: SystemSet, momenta: Tensor) -> None:
        """Initial momenta ``[N, 3]``; computes ASE's coefficients per atom."""
        self.momenta = _unfixed(momenta, systems)
        dt, fr, masses = self.dt, self.friction, systems.masses[:, None]
        sigma = torch.sqrt(2 * self.temperature * fr / masses)
        self.c1 = dt / 2.0 - dt * dt * fr / 8.0
        self.c2 = dt * fr / 2 - dt * dt * fr * fr / 8.0
        self.c3 = math.sqrt(dt) * sigma / 2.0 - dt**1.5 * fr * sigma / 8.0
        self.c5 = dt**1.5 * sigma / (2 * math.sqrt(3))
        self.c4 = fr / 2.0 * self.c5

    def drift(self, systems: SystemSet, forces: Tensor) -> Tensor:
        """First half step of the velocities and the full position step; returns positions."""
        masses = systems.masses[:, None]
        velocity = self.momenta / masses
        xi, eta = self.draw(systems.natoms_list)
        rnd_pos = self.c5 * eta
        rnd_vel = self.c3 * xi - self.c4 * eta
        if self.fixcm:
            idx, n_sys = systems.system_idx, systems.n_systems
            natoms = systems.natoms.to(torch.float64)[idx, None]
            factor = torch.sqrt(natoms / (natoms - 1.0))
            per_system = RowIndex(idx, n_sys)
            rnd_pos = rnd_pos - per_system.sum_by_row(rnd_pos)[idx] / natoms
            rnd_vel = rnd_vel - per_system.sum_by_row(rnd_vel * masses)[idx] / (masses * natoms)
            rnd_pos = rnd_pos * factor
            rnd_vel = rnd_vel * factor
        velocity = velocity + (self.c1 * forces / masses - self.c2 * velocity + rnd_vel)
        old = systems.positions
        new = torch.where(systems.fixed[:, None], old, old + self.dt * velocity + rnd_pos)
        self.velocity = (new - old - rnd_pos) / self.dt
        self.rnd_vel = rnd_vel
        return new

    def kick(self, systems: SystemSet, forces: Tensor) -> None:
        """Second half step of the velocities with the new forces."""
        masses = systems.masses[:, None]
        velocity = self.velocity + (
            self.c1 * forces / masses - self.c2 * self.velocity + self.rnd_vel
        )
        self.momenta = _unfixed(velocity * masses, systems)

    def keep(self, system_keep: Tensor, atom_keep: Tensor) -> None:
        """Keep the state of the systems where ``system_keep`` ``[S]`` (bool) is True, whose
        atoms are those where ``atom_keep`` ``[N]`` is (between a :meth:`drift` and its
        :meth:`kick`, or before the first), and their random streams."""
        for name in ("momenta", "c3", "c4", "c5", "velocity", "rnd_vel"):
            value = getattr(self, name)  # velocity: None before the first drift
            if value is not None:
                setattr(self, name, value[atom_keep])
        self.draw.keep(system_keep.tolist())


def _unfixed(values: Tensor, systems: SystemSet) -> Tensor:
    return torch.where(systems.fixed[:, None], torch.zeros_like(values), values)


class NumpyDraws:
    """ASE's random numbers: one ``numpy.random.default_rng(seed + i)`` per input system ``i``.

    Call :meth:`select` with the input indices of the systems in flight before drawing.
    """

    def __init__(self, seed: int, device: torch.device) -> None:
        self.seed, self.device = seed, device
        self.generators: list[np.random.Generator] = []

    def select(self, ids: Sequence[int]) -> None:
        """Use the generators of input systems ``ids`` (in batch order)."""
        self.generators = [np.random.default_rng(self.seed + i) for i in ids]

    def keep(self, keep: Sequence[bool]) -> None:
        """Go on with the generators of the systems where ``keep`` is True."""
        self.generators = [rng for rng, kept in zip(self.generators, keep, strict=True) if kept]

    def __call__(self, natoms: Sequence[int]) -> tuple[Tensor, Tensor]:
        xi, eta = [], []
        for rng, n in zip(self.generators, natoms, strict=True):
            xi.append(rng.standard_normal(size=(n, 3)))
            eta.append(rng.standard_normal(size=(n, 3)))
        both = torch.as_tensor(np.stack([np.concatenate(xi), np.concatenate(eta)]))
        both = both.to(self.device, non_blocking=True)
        return both[0], both[1]


class TorchDraws:
    """Standard normals from one seeded ``torch.Generator`` on the device."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def select(self, ids: Sequence[int]) -> None:
        """No per-system streams (kept for the interface of :class:`NumpyDraws`)."""

    def keep(self, keep: Sequence[bool]) -> None:
        """No per-system streams (kept for the interface of :class:`NumpyDraws`)."""

    def __call__(self, natoms: Sequence[int]) -> tuple[Tensor, Tensor]:
        n = int(sum(natoms))
        kwargs = {"generator": self.generator, "device": self.device, "dtype": torch.float64}
        return torch.randn(n, 3, **kwargs), torch.randn(n, 3, **kwargs)


def md(
    structures: Sequence,
    model: str | os.PathLike | nn.Module,
    steps: int,
    timestep: float = 1.0,
    integrator: str = "verlet",
    temperature_K: float | None = None,
    friction: float = 0.01,
    fixcm: bool = False,
    seed: int = 0,
    rng: str = "torch",
    batch_size: str | int = "auto",
    skin: float | None = None,
    trajectory_interval: int = 0,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    progress: bool = False,
    memory: MemoryModel | None = None,
    **model_options: Any,
) -> list:
    """Run ``steps`` MD steps of every structure, many systems per forward pass.

    Args:
        structures: ``ase.Atoms`` with their initial momenta (not modified; one ``Atoms`` is
            taken as a list of one); FixAtoms is honored, other constraints are refused.
        model: a checkpoint name or path, or a loaded potential (see :func:`relax`).
        steps: MD steps per structure.
        timestep: fs (> 0, at most 100: :data:`MD_RANGES`).
        integrator: ``"verlet"`` (NVE) or ``"langevin"`` (NVT).
        temperature_K: Langevin bath temperature (required for ``"langevin"``; 0 to 1e6).
        friction: Langevin friction (1/fs; 0 to 100).
        fixcm: Langevin: ASE's deprecated centre-of-mass correction (see :class:`Langevin`).
        seed, rng: Langevin random numbers: ``"torch"`` or ``"numpy"`` (ASE's exact stream per
            system, ``default_rng(seed + input index)``); see the module docstring.
        batch_size: ``"auto"`` or the most systems per batch (systems run in batches one after
            the other, all for ``steps`` steps).
        skin: neighbor-list skin (Å; None: the device's default, see :func:`relax`); results
            do not depend on it.
        trajectory_interval: if > 0, keep a frame every that many steps (and step 0) in
            ``atoms.info["trajectory"]``, as ASE's ``dyn.attach(..., interval)`` would (a
            list of ``ase.Atoms``; pop it before writing extxyz, which cannot hold it).
        device, dtype: for loading a checkpoint (default float32; use ``"float64"`` for long
            NVE runs); with a loaded Potential, its own (another one is an error).
        progress: show a progress bar of the steps of each batch.
        memory: a memory model to budget with (``"auto"``).
        **model_options: for loading a checkpoint (see :func:`relax`), e.g.
            ``forces="conservative"`` for an OCP energy-centric checkpoint.

    Returns:
        The final structures in input order: positions and momenta after ``steps`` steps, a
        ``SinglePointCalculator`` with the final energy and (raw) forces, and
        ``info["md_steps"]``.  A structure whose positions stop being finite (the dynamics
        diverged), whose atoms come within 0.01 Å of each other, whose model energy or forces
        are not finite, or that is too large for the memory even alone leaves its batch at
        that step, with a warning naming it: it is returned as it was at the step before,
        with ``info["md_steps"]`` the steps it completed and ``info["md_error"]`` saying why;
        the others go on.
    """
    integrator = _checked_options(
        steps, timestep, integrator, temperature_K, friction, seed, rng, trajectory_interval
    )
    structures = [structures] if hasattr(structures, "get_positions") else list(structures)
    if integrator == "langevin" and fixcm:
        for index, atoms in enumerate(structures):  # before any work, not as its batch starts
            if isinstance(atoms, Atoms) and len(atoms) < 2:  # (plan_run names non-Atoms)
                raise ValueError(
                    f"structure {index} ({atoms.get_chemical_formula()}): fixcm=True needs at "
                    "least two atoms per system"
                )
    plan = plan_run(structures, model, device, dtype, skin, batch_size, memory, model_options)
    if plan is None:
        return []
    structures, potential, device_, skin = plan.structures, plan.potential, plan.device, plan.skin
    evaluate, max_systems, edge_counts = plan.evaluate, plan.max_systems, plan.edge_counts
    draws = (NumpyDraws if rng == "numpy" else TorchDraws)(seed, device_)
    results: list[Any] = [None] * len(structures)
    queue = list(range(len(structures)))[::-1]
    while queue:
        systems = SystemSet(float(potential.cutoff), skin, device_)
        admit(systems, evaluate, structures, queue, max_systems, edge_counts)
        if integrator == "verlet":
            dynamics: VelocityVerlet | Langevin = VelocityVerlet(timestep)
        else:
            dynamics = Langevin(timestep, temperature_K, friction, fixcm, draws)
            draws.select(systems.ids)
        momenta = np.concatenate([structures[i].get_momenta() for i in systems.ids])
        dynamics.start(systems, torch.as_tensor(momenta, dtype=torch.float64, device=device_))
        integration = _Integration(
            systems, dynamics, evaluate, structures, trajectory_interval, results
        )
        integration.run(steps, progress)
    return results


def _checked_options(
    steps: int,
    timestep: float,
    integrator: str,
    temperature_K: float | None,
    friction: float,
    seed: int,
    rng: str,
    trajectory_interval: int,
) -> str:
    """Raise ``ValueError`` naming the first of :func:`md`'s options that is out of range or
    inconsistent with the others; the integrator's name in lower case."""
    for name, value in (
        ("steps", steps),
        ("seed", seed),
        ("trajectory_interval", trajectory_interval),
    ):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    integrator = str(integrator).lower()
    if integrator not in ("verlet", "langevin"):
        raise ValueError(f"integrator must be 'verlet' or 'langevin', got {integrator!r}")
    if integrator == "langevin" and temperature_K is None:
        raise ValueError("Langevin dynamics needs temperature_K")
    if rng not in ("torch", "numpy"):
        raise ValueError(f"rng must be 'torch' or 'numpy', got {rng!r}")
    if integrator == "verlet" and temperature_K is not None:
        raise ValueError(
            "temperature_K applies to Langevin dynamics only; for NVE at a temperature, "
            "give the structures momenta first (ase.md.velocitydistribution)"
        )
    check_md_option("timestep", timestep)
    if temperature_K is not None:
        check_md_option("temperature_K", temperature_K)
    check_md_option("friction", friction)
    return integrator


#: The ranges of :func:`md`'s physical options, which ``forcecalc md`` checks too: ``name ->
#: (unit, whether 0 is allowed, the largest value)``.  The ceilings lie far beyond any
#: atomistic MD (a 100 fs step resolves no bond vibration; a friction of 100/fs damps the
#: momenta within 0.01 fs) and keep every coefficient of the integrators finite (ASE's
#: Langevin takes ``timestep**1.5``, which overflows a float from about 3e206 fs).
MD_RANGES: dict[str, tuple[str, bool, float]] = {
    "timestep": ("fs", False, 100.0),
    "temperature_K": ("K", True, 1e6),
    "friction": ("1/fs", True, 100.0),
}


def check_md_option(name: str, value: float, label: str | None = None) -> None:
    """A ``ValueError`` naming ``label`` (default ``name``) unless ``value`` lies in the range
    of :func:`md`'s option ``name`` (:data:`MD_RANGES`): NaN and inf never do."""
    unit, zero_allowed, ceiling = MD_RANGES[name]
    if not ((value >= 0 if zero_allowed else value > 0) and value <= ceiling):
        lowest = ">= 0" if zero_allowed else "> 0"
        raise ValueError(f"{label or name} must be {lowest} and <= {ceiling:g} {unit}, got {value}")


class _Integration:
    """One batch of systems integrated together: the set and its dynamics, each system's
    trajectory frames (in the set's order), and where the final structures go (``results``,
    by input index).  :meth:`_stop`, which ends systems, keeps the frames aligned with the set
    and the dynamics."""

    def __init__(
        self,
        systems: SystemSet,
        dynamics: VelocityVerlet | Langevin,
        evaluate: Evaluator,
        structures: Sequence,
        trajectory_interval: int,
        results: list,
    ) -> None:
        self.systems, self.dynamics, self.evaluate = systems, dynamics, evaluate
        self.structures, self.interval, self.results = structures, trajectory_interval, results
        self.frames: list[list] = [[] for _ in systems.ids]

    def run(self, steps: int, progress: bool) -> None:
        """Run ``steps`` steps; each system's final structure goes to ``results[input
        index]``.  A system whose graph cannot be built after a step (positions not finite,
        overlapping atoms), whose model output is not finite, or that is too large for the
        memory even alone leaves the batch there, as it was at the step before, with a warning
        and ``info["md_error"]``; the others go on.  ``progress``: a progress bar of the
        steps."""
        from tqdm.auto import tqdm

        systems = self.systems
        energy, raw = self.evaluate(systems)
        state = (systems.positions, self.dynamics.momenta, energy, raw)
        energy, raw = self._end_not_finite(0, state, (energy, raw))
        self._record(0, energy, raw)
        for step in tqdm(range(1, steps + 1), disable=not progress, desc="md", unit="step"):
            if not systems.n_systems:
                return
            outputs = self._step(step, energy, raw)
            if outputs is None:
                return
            energy, raw = outputs
            self._record(step, energy, raw)
        finals = _snapshots(
            systems, self.structures, systems.positions, self.dynamics.momenta, energy, raw
        )
        for k, index in enumerate(systems.ids):
            finals[k].info["md_steps"] = steps
            if self.interval > 0:
                finals[k].info["trajectory"] = self.frames[k]
            self.results[index] = finals[k]

    def _step(self, step: int, energy: Tensor, raw: Tensor) -> tuple[Tensor, Tensor] | None:
        """Step ``step`` from the energies ``[S]`` and raw forces ``[N, 3]`` of the step
        before: drift, evaluate (ending the systems whose graph cannot be built, or whose
        outputs are not finite), kick; the energies and raw forces of those left (None: none
        are)."""
        systems, dynamics = self.systems, self.dynamics
        last = (systems.positions, dynamics.momenta, energy, raw)
        systems.positions = dynamics.drift(systems, systems.constrained_forces(raw))
        try:
            energy, raw = self.evaluate(systems)
        except ValueError as error:
            atom_system = systems.system_idx
            keep = self._stop(_stopped_systems(systems, step, error), step - 1, last)
            if not systems.n_systems:
                return None
            atom_keep = keep[atom_system]  # the others' state before the step
            last = (last[0][atom_keep], last[1][atom_keep], last[2][keep], last[3][atom_keep])
            energy, raw = self.evaluate(systems)
        energy, raw = self._end_not_finite(step, last, (energy, raw))
        if not systems.n_systems:
            return None
        dynamics.kick(systems, systems.constrained_forces(raw))
        return energy, raw

    def _record(self, step: int, energy: Tensor, raw: Tensor) -> None:
        """A trajectory frame of every system, on the steps that keep one."""
        if self.interval > 0 and step % self.interval == 0:
            _record(self.systems, self.structures, self.dynamics.momenta, energy, raw, self.frames)

    def _stop(self, stopped: dict[int, str], done: int, state: tuple[Tensor, ...]) -> Tensor:
        """End the systems ``stopped`` (``{system: why}``) as they were in ``state``
        (positions, momenta, energy, forces after ``done`` steps), with a warning each;
        returns the mask ``[S_old]`` of those kept."""
        systems = self.systems
        finals = _snapshots(systems, self.structures, *state)
        for k, why in stopped.items():
            warn(
                f"{systems.name(k)}: {why}; returned as it was at step {done}, with "
                "info['md_error'] (the other structures go on)"
            )
            finals[k].info.update(md_steps=done, md_error=why)
            if self.interval > 0:
                finals[k].info["trajectory"] = self.frames[k]
            self.results[systems.ids[k]] = finals[k]
        keep = [k not in stopped for k in range(systems.n_systems)]
        self.frames = [f for f, kept in zip(self.frames, keep, strict=True) if kept]
        system_keep = torch.as_tensor(keep, device=systems.device)
        self.dynamics.keep(system_keep, systems.keep(system_keep))
        return system_keep

    def _end_not_finite(
        self, step: int, state: tuple[Tensor, ...], outputs: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """End the systems whose ``outputs`` (energy ``[S]``, forces ``[N, 3]``) of ``step``
        are not finite (a model that fails there, or a system too large for the memory even
        alone) as they were in ``state``; the others' outputs.  One host sync."""
        systems = self.systems
        energy, forces = outputs
        bad = ~torch.isfinite(energy) | systems.non_finite(forces)
        if not bool(bad.any()):
            return outputs
        stopped = {}
        for k in torch.nonzero(bad).flatten().tolist():
            why = self.evaluate.failures.pop(
                systems.ids[k], "the model's energy or forces are not finite"
            )
            stopped[k] = f"MD stopped at step {step}: {why}"
        atom_system = systems.system_idx
        keep = self._stop(stopped, max(step - 1, 0), state)
        return energy[keep], forces[keep[atom_system]]


def _stopped_systems(systems: SystemSet, step: int, error: ValueError) -> dict[int, str]:
    """``{system: why}`` for the systems whose graph could not be built after the drift of
    ``step`` (the cause of the graph builder's ``error``, re-raised if none is found): positions
    that are not finite (the dynamics diverged) or overlapping atoms."""
    problems = systems.graph_problems(range(systems.n_systems))
    if not problems:
        raise error
    offsets = systems.atom_offsets()
    finite = torch.isfinite(systems.positions).all(dim=1).tolist()
    stopped = {}
    for k, problem in problems.items():
        if all(finite[offsets[k] : offsets[k + 1]]):
            stopped[k] = f"MD stopped at step {step}: {problem}"
        else:
            stopped[k] = (
                f"MD diverged at step {step}: positions are not finite (a time step too large "
                "for the forces, or an unphysical start)"
            )
    return stopped


def _snapshots(
    systems: SystemSet,
    structures: Sequence,
    positions: Tensor,
    momenta: Tensor,
    energy: Tensor,
    forces: Tensor,
) -> list:
    """The systems as ``ase.Atoms`` with ``positions``, ``momenta`` ``[N, 3]``, ``energy``
    ``[S]`` and ``forces`` ``[N, 3]``."""
    from ase.calculators.singlepoint import SinglePointCalculator

    split = np.cumsum(systems.natoms_list)[:-1]
    positions = np.split(positions.cpu().numpy(), split)
    momenta = np.split(momenta.cpu().numpy(), split)
    force_list = np.split(forces.cpu().numpy(), split)
    energies = energy.cpu().tolist()
    out = []
    for k, index in enumerate(systems.ids):
        atoms = structures[index].copy()
        atoms.info.pop("trajectory", None)  # an input's own (from an earlier run): not nested
        atoms.positions = positions[k]
        atoms.set_momenta(momenta[k], apply_constraint=False)
        atoms.calc = SinglePointCalculator(
            atoms, energy=energies[k], free_energy=energies[k], forces=force_list[k]
        )
        out.append(atoms)
    return out


def _record(
    systems: SystemSet,
    structures: Sequence,
    momenta: Tensor,
    energy: Tensor,
    forces: Tensor,
    frames: list[list],
) -> None:
    """Append each system's frame at its current positions (see :func:`_snapshots`) to its
    list in ``frames``."""
    snapshots = _snapshots(systems, structures, systems.positions, momenta, energy, forces)
    for k, atoms in enumerate(snapshots):
        frames[k].append(atoms)
