"""FIRE, LBFGS and BFGS with per-system state, vectorized over an in-flight batch.

Each optimizer takes one step for every system of a :class:`~forcecalc.relax.engine.SystemSet`
at once and reproduces the ASE optimizer of the same name (``ase.optimize.FIRE``, ``LBFGS``,
``BFGS``, ASE 3.23-3.29) on each system separately: same parameters with the same defaults,
same update order, float64 arithmetic; the positions after each step equal ASE's to rounding
(sums over a system's atoms run in another order than numpy's).  Systems do not interact:
every scalar of ASE's algorithm (FIRE's ``dt``/``a``/``Nsteps``, LBFGS' history, BFGS'
Hessian, the maxstep scaling) is kept per system.

State layout (``S`` systems, ``N`` atoms): per-atom tensors have ``N`` rows, per-system tensors
``S`` rows; :meth:`BatchedOptimizer.add` appends the initial state of new systems and
:meth:`BatchedOptimizer.keep` drops systems, mirroring the :class:`SystemSet` operations.

Forces passed to :meth:`BatchedOptimizer.step` must already have FixAtoms applied (zero on
fixed atoms); the returned displacement is zero on fixed atoms, as ASE's ``FixAtoms`` keeps
them in place.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from numbers import Real
from typing import Any, ClassVar

import torch
from torch import Tensor

from forcecalc.graph.gather import RowIndex
from forcecalc.relax.engine import SystemSet, segment_max
from forcecalc.warning import warn

#: ASE's default maximum step (Å) of every optimizer.
DEFAULT_MAXSTEP = 0.2

#: Per-atom and per-system state tensors, by name.
_State = tuple[dict[str, Tensor], dict[str, Tensor]]


class BatchedOptimizer(ABC):
    """Per-system optimizer state over an in-flight batch (see the module docstring)."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self.atom_state: dict[str, Tensor] = {}
        self.system_state: dict[str, Tensor] = {}

    @abstractmethod
    def initial_state(self, natoms: Tensor, device: torch.device) -> _State:
        """Per-atom and per-system state of new systems with ``natoms`` ``[S_new]`` atoms."""

    @abstractmethod
    def step(self, systems: SystemSet, forces: Tensor) -> Tensor:
        """One step of every system.

        Args:
            systems: the set (positions ``[N, 3]`` float64 are the current ones).
            forces: ``[N, 3]`` float64 forces with FixAtoms applied.

        Returns:
            ``[N, 3]`` displacement to add to the positions (zero on fixed atoms).
        """

    def add(self, natoms: Tensor) -> None:
        """Append the initial state of new systems (``natoms`` ``[S_new]`` on the device)."""
        atom_new, system_new = self.initial_state(natoms, natoms.device)
        self.atom_state = _concat(self.atom_state, atom_new)
        self.system_state = _concat(self.system_state, system_new)

    def keep(self, system_keep: Tensor, atom_keep: Tensor) -> None:
        """Keep the systems where ``system_keep`` ``[S]`` is True (atoms ``atom_keep``
        ``[N]``)."""
        self.atom_state = {k: v[atom_keep] for k, v in self.atom_state.items()}
        self.system_state = {k: v[system_keep] for k, v in self.system_state.items()}


def _concat(old: dict[str, Tensor], new: dict[str, Tensor]) -> dict[str, Tensor]:
    """Concatenate state along dim 0, zero-padding trailing dims to the larger shape."""
    if not old:
        return new
    out = {}
    for key, value in new.items():
        previous = old[key]
        shape = [max(a, b) for a, b in zip(previous.shape[1:], value.shape[1:], strict=True)]
        out[key] = torch.cat([_pad(previous, shape), _pad(value, shape)])
    return out


def _pad(value: Tensor, shape: list[int]) -> Tensor:
    if list(value.shape[1:]) == shape:
        return value
    padded = value.new_zeros((value.shape[0], *shape))
    padded[(slice(None), *(slice(0, n) for n in value.shape[1:]))] = value
    return padded


def _per_atom(values: Tensor, systems: SystemSet) -> Tensor:
    """``[S]`` → ``[N, 1]`` broadcast of a per-system value to its atoms."""
    return values[systems.system_idx].unsqueeze(1)


def _check_positive(**options: object) -> None:
    """A ValueError naming the first of ``options`` that is not a finite number > 0 (a
    negative ``maxstep`` or ``dt`` turns every step uphill without an error)."""
    for name, value in options.items():
        if (
            isinstance(value, bool)
            or not isinstance(value, Real)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _unfixed(step: Tensor, systems: SystemSet) -> Tensor:
    return torch.where(systems.fixed[:, None], torch.zeros_like(step), step)


class FIRE(BatchedOptimizer):
    """ASE's ``FIRE`` per system (defaults as ASE's; ``maxstep`` is ASE's maxmove).

    Args:
        dt: initial time step.
        maxstep: largest step (Å), applied to the norm of the whole system's step.
        dtmax: largest time step.
        Nmin: steps with ``v·F > 0`` before ``dt`` grows.
        finc, fdec: ``dt`` growth and cut factors.
        astart: mixing parameter after a reset.
        fa: decay factor of the mixing parameter.
        a: initial mixing parameter.
    """

    name = "fire"

    def __init__(
        self,
        dt: float = 0.1,
        maxstep: float = DEFAULT_MAXSTEP,
        dtmax: float = 1.0,
        Nmin: int = 5,
        finc: float = 1.1,
        fdec: float = 0.5,
        astart: float = 0.1,
        fa: float = 0.99,
        a: float = 0.1,
    ) -> None:
        super().__init__()
        _check_positive(dt=dt, maxstep=maxstep, dtmax=dtmax, finc=finc, fdec=fdec)
        self.dt, self.maxstep, self.dtmax, self.Nmin = dt, maxstep, dtmax, Nmin
        self.finc, self.fdec, self.astart, self.fa, self.a = finc, fdec, astart, fa, a

    def initial_state(self, natoms: Tensor, device: torch.device) -> _State:
        n, s = int(natoms.sum()), len(natoms)
        f64 = torch.float64
        atom = {"velocity": torch.zeros(n, 3, dtype=f64, device=device)}
        system = {
            "dt": torch.full((s,), self.dt, dtype=f64, device=device),
            "a": torch.full((s,), self.a, dtype=f64, device=device),
            "n_positive": torch.zeros(s, dtype=torch.int64, device=device),
            "started": torch.zeros(s, dtype=torch.bool, device=device),
        }
        return atom, system

    def step(self, systems: SystemSet, forces: Tensor) -> Tensor:
        state = self.system_state
        idx, n_sys = systems.system_idx, systems.n_systems
        per_system = RowIndex(idx, n_sys)  # sums over each system's atoms, built once per step
        velocity = self.atom_state["velocity"]
        dt, a, n_positive, started = state["dt"], state["a"], state["n_positive"], state["started"]

        vf = per_system.sum_by_row((forces * velocity).sum(dim=1))
        grad2 = per_system.sum_by_row((forces * forces).sum(dim=1))
        vel2 = per_system.sum_by_row((velocity * velocity).sum(dim=1))
        uphill_free = started & (vf > 0.0)
        reset = started & ~(vf > 0.0)

        safe_grad2 = torch.where(grad2 > 0, grad2, torch.ones_like(grad2))
        mixed = (1.0 - _per_atom(a, systems)) * velocity + _per_atom(
            a, systems
        ) * forces / _per_atom(safe_grad2.sqrt(), systems) * _per_atom(vel2.sqrt(), systems)
        velocity = torch.where(_per_atom(uphill_free, systems), mixed, velocity)
        velocity = torch.where(_per_atom(reset, systems), torch.zeros_like(velocity), velocity)

        grow = uphill_free & (n_positive > self.Nmin)
        dt = torch.where(grow, torch.clamp(dt * self.finc, max=self.dtmax), dt)
        a = torch.where(grow, a * self.fa, a)
        n_positive = torch.where(uphill_free, n_positive + 1, n_positive)
        a = torch.where(reset, torch.full_like(a, self.astart), a)
        dt = torch.where(reset, dt * self.fdec, dt)
        n_positive = torch.where(reset, torch.zeros_like(n_positive), n_positive)

        velocity = velocity + _per_atom(dt, systems) * forces
        dr = _per_atom(dt, systems) * velocity
        norm = per_system.sum_by_row((dr * dr).sum(dim=1)).sqrt()
        too_long = norm > self.maxstep
        safe_norm = torch.where(too_long, norm, torch.ones_like(norm))
        dr = torch.where(
            _per_atom(too_long, systems), self.maxstep * dr / _per_atom(safe_norm, systems), dr
        )
        self.atom_state = {"velocity": velocity}
        self.system_state = {
            "dt": dt,
            "a": a,
            "n_positive": n_positive,
            "started": torch.ones_like(started),
        }
        return _unfixed(dr, systems)


class LBFGS(BatchedOptimizer):
    """ASE's ``LBFGS`` (no line search) per system.

    Args:
        maxstep: largest per-atom step (Å); the whole step is scaled so its longest atom step
            is ``maxstep`` (ASE raises above 1 Å, so do we).
        memory: number of (s, y) pairs kept.
        damping: factor on the step.
        alpha: initial Hessian guess (eV/Å²); the inverse Hessian starts as ``1/alpha``.
    """

    name = "lbfgs"

    def __init__(
        self,
        maxstep: float = DEFAULT_MAXSTEP,
        memory: int = 100,
        damping: float = 1.0,
        alpha: float = 70.0,
    ) -> None:
        super().__init__()
        _check_positive(maxstep=maxstep, damping=damping, alpha=alpha)
        if maxstep > 1.0:
            raise ValueError(
                f"You are using a much too large value for the maximum step size: "
                f"{maxstep:.1f} Angstrom"
            )
        if memory < 1:
            raise ValueError(f"memory must be >= 1, got {memory}")
        self.maxstep, self.memory, self.damping, self.alpha = maxstep, memory, damping, alpha
        self.iterations: list[int] = []

    def initial_state(self, natoms: Tensor, device: torch.device) -> _State:
        n, s, m = int(natoms.sum()), len(natoms), self.memory
        f64 = torch.float64
        atom = {
            # history, newest pair first: s_k = x_k - x_{k-1}, y_k = g_k - g_{k-1}
            "s": torch.zeros(n, m, 3, dtype=f64, device=device),
            "y": torch.zeros(n, m, 3, dtype=f64, device=device),
            "r0": torch.zeros(n, 3, dtype=f64, device=device),
            "f0": torch.zeros(n, 3, dtype=f64, device=device),
        }
        system = {
            "rho": torch.zeros(s, m, dtype=f64, device=device),
            "iteration": torch.zeros(s, dtype=torch.int64, device=device),
        }
        self.iterations.extend([0] * s)
        return atom, system

    def keep(self, system_keep: Tensor, atom_keep: Tensor) -> None:
        super().keep(system_keep, atom_keep)
        flags = system_keep.tolist()
        self.iterations = [i for i, k in zip(self.iterations, flags, strict=True) if k]

    def step(self, systems: SystemSet, forces: Tensor) -> Tensor:
        idx, n_sys = systems.system_idx, systems.n_systems
        per_system = RowIndex(idx, n_sys)  # sums over each system's atoms, built once per step
        positions = systems.positions
        atom, state = self.atom_state, self.system_state
        s_hist, y_hist, rho = atom["s"], atom["y"], state["rho"]
        gradient = -forces

        # update(): add the newest (s, y) pair for systems past their first step
        updating = state["iteration"] > 0
        s_new = positions - atom["r0"]
        y_new = gradient - (-atom["f0"])
        ys = per_system.sum_by_row((y_new * s_new).sum(dim=1))
        rho_new = 1.0 / torch.where(updating, ys, torch.ones_like(ys))
        atom_updating = updating[idx][:, None, None]
        s_hist = torch.where(atom_updating, torch.cat([s_new[:, None], s_hist[:, :-1]], 1), s_hist)
        y_hist = torch.where(atom_updating, torch.cat([y_new[:, None], y_hist[:, :-1]], 1), y_hist)
        rho = torch.where(updating[:, None], torch.cat([rho_new[:, None], rho[:, :-1]], 1), rho)

        # compute_step(): the two-loop recursion over each system's stored pairs (unused
        # slots are zero and contribute nothing)
        n_pairs = min(self.memory, max(self.iterations, default=0))
        q = gradient.clone()
        alphas = []
        for j in range(n_pairs):
            a_j = rho[:, j] * per_system.sum_by_row((s_hist[:, j] * q).sum(dim=1))
            q = q - a_j[idx, None] * y_hist[:, j]
            alphas.append(a_j)
        z = q * (1.0 / self.alpha)
        for j in reversed(range(n_pairs)):
            b = rho[:, j] * per_system.sum_by_row((y_hist[:, j] * z).sum(dim=1))
            z = z + s_hist[:, j] * (alphas[j] - b)[idx, None]
        p = -z

        # determine_step(): scale so that the longest atom step is at most maxstep
        longest = segment_max(torch.linalg.norm(p, dim=1), idx, n_sys)
        too_long = longest >= self.maxstep
        scale = torch.where(too_long, self.maxstep / longest, torch.ones_like(longest))
        dr = torch.where(too_long[idx, None], p * scale[idx, None], p) * self.damping

        self.atom_state = {"s": s_hist, "y": y_hist, "r0": positions, "f0": forces}
        self.system_state = {"rho": rho, "iteration": state["iteration"] + 1}
        self.iterations = [i + 1 for i in self.iterations]
        return _unfixed(dr, systems)


class BFGS(BatchedOptimizer):
    """ASE's ``BFGS`` per system: a dense ``3n x 3n`` Hessian per system.

    Each system's Hessian is kept at its own size (a list, not a padded stack: a 256-atom
    structure in flight does not make forty 4-atom ones carry ``768 x 768`` matrices); a step
    updates and diagonalizes them in one batched ``eigh`` per group of systems of equal size.

    Args:
        maxstep: largest per-atom step (Å); the whole step is scaled so its longest atom step
            is ``maxstep`` (ASE warns above 1 Å, so do we).
        alpha: initial Hessian (eV/Å²).
    """

    name = "bfgs"

    def __init__(self, maxstep: float = DEFAULT_MAXSTEP, alpha: float = 70.0) -> None:
        super().__init__()
        _check_positive(maxstep=maxstep, alpha=alpha)
        if maxstep > 1.0:
            warn(f"You are using a *very* large value for the maximum step size: {maxstep:.1f} Å")
        self.maxstep, self.alpha = maxstep, alpha
        #: ``[3 n_s, 3 n_s]`` float64 Hessian of each system, in the set's order.
        self.hessians: list[Tensor] = []
        # the size groups of the set's systems, by their sizes (see _size_groups)
        self._groups: tuple[tuple[int, ...], list[tuple[int, list[int], Tensor, Tensor]]] | None = (
            None
        )

    def initial_state(self, natoms: Tensor, device: torch.device) -> _State:
        n, s = int(natoms.sum()), len(natoms)
        f64 = torch.float64
        atom = {
            "r0": torch.zeros(n, 3, dtype=f64, device=device),
            "f0": torch.zeros(n, 3, dtype=f64, device=device),
        }
        return atom, {"started": torch.zeros(s, dtype=torch.bool, device=device)}

    def add(self, natoms: Tensor) -> None:
        super().add(natoms)
        self.hessians += [
            torch.eye(3 * n, dtype=torch.float64, device=natoms.device) * self.alpha
            for n in natoms.tolist()
        ]

    def keep(self, system_keep: Tensor, atom_keep: Tensor) -> None:
        super().keep(system_keep, atom_keep)
        kept = system_keep.tolist()
        self.hessians = [h for h, k in zip(self.hessians, kept, strict=True) if k]

    def _size_groups(self, systems: SystemSet) -> list[tuple[int, list[int], Tensor, Tensor]]:
        """The systems grouped by size: ``(n_atoms, members, members [G] and their atoms
        [G * n_atoms] as device tensors)``, made again only when the set's sizes changed
        (systems left or joined), not at every step (each made index is a host-to-device
        copy)."""
        key = tuple(systems.natoms_list)
        if self._groups is None or self._groups[0] != key:
            starts = systems.atom_offsets()
            members: dict[int, list[int]] = {}
            for k, n in enumerate(key):
                members.setdefault(n, []).append(k)
            device = systems.positions.device
            groups = [
                (
                    n,
                    chosen,
                    torch.tensor(chosen, device=device),
                    torch.tensor(
                        [a for k in chosen for a in range(starts[k], starts[k] + n)],
                        device=device,
                    ),
                )
                for n, chosen in members.items()
            ]
            self._groups = (key, groups)
        return self._groups[1]

    def step(self, systems: SystemSet, forces: Tensor) -> Tensor:
        positions = systems.positions
        atom, started = self.atom_state, self.system_state["started"]
        dr = torch.zeros_like(positions)
        for n, members, chosen, rows in self._size_groups(systems):
            shape = (len(members), 3 * n)  # the group's coordinates, one row per system
            hessian = torch.stack([self.hessians[k] for k in members])
            gradient = -forces.index_select(0, rows).reshape(shape)
            # update(): skipped on the first step and when the configuration did not change
            dpos = (positions - atom["r0"]).index_select(0, rows).reshape(shape)
            dgrad = gradient + atom["f0"].index_select(0, rows).reshape(shape)
            updating = started[chosen] & (dpos.abs().amax(dim=1) >= 1e-7)
            a = (dpos * dgrad).sum(dim=1)
            dg = (hessian @ dpos.unsqueeze(2)).squeeze(2)
            b = (dpos * dg).sum(dim=1)
            safe_a = torch.where(updating, a, torch.ones_like(a))
            safe_b = torch.where(updating, b, torch.ones_like(b))
            change = (
                dgrad.unsqueeze(2) * dgrad.unsqueeze(1) / safe_a[:, None, None]
                - dg.unsqueeze(2) * dg.unsqueeze(1) / safe_b[:, None, None]
            )
            hessian = torch.where(updating[:, None, None], hessian + change, hessian)
            for k, h in zip(members, hessian.unbind(0), strict=True):
                self.hessians[k] = h
            # compute_step(): -V (g V / |omega|).  A Hessian the update made non-finite (a
            # gradient that did not change along the step: an atom alone, whose direct force
            # does not depend on its position) would fail the whole group's eigh; it gets a
            # NaN step instead, which ends that system alone (as ASE's BFGS fails on it).
            finite = torch.isfinite(hessian).all(dim=2).all(dim=1)
            eye = torch.eye(3 * n, dtype=hessian.dtype, device=hessian.device)
            omega, eigenvectors = torch.linalg.eigh(
                torch.where(finite[:, None, None], hessian, eye)
            )
            coefficients = (gradient.unsqueeze(1) @ eigenvectors).squeeze(1) / omega.abs()
            step = -(eigenvectors @ coefficients.unsqueeze(2)).squeeze(2)
            step = torch.where(finite[:, None], step, torch.nan)
            dr.index_copy_(0, rows, step.reshape(-1, 3))

        # determine_step(): scale so that the longest atom step is at most maxstep
        idx, n_sys = systems.system_idx, systems.n_systems
        longest = segment_max(torch.linalg.norm(dr, dim=1), idx, n_sys)
        too_long = longest >= self.maxstep
        scale = torch.where(too_long, self.maxstep / longest, torch.ones_like(longest))
        dr = torch.where(too_long[idx, None], dr * scale[idx, None], dr)

        self.atom_state = {"r0": positions, "f0": forces}
        self.system_state = {"started": torch.ones_like(started)}
        return _unfixed(dr, systems)


OPTIMIZERS: dict[str, type[BatchedOptimizer]] = {"fire": FIRE, "lbfgs": LBFGS, "bfgs": BFGS}


def make_optimizer(name: str, options: dict[str, Any] | None = None) -> BatchedOptimizer:
    """The optimizer ``name`` (``"fire"``, ``"lbfgs"``, ``"bfgs"``; any case) with ASE-named
    ``options`` (e.g. ``{"maxstep": 0.1}``)."""
    key = str(name).lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    cls = OPTIMIZERS[key]
    try:
        return cls(**(options or {}))
    except (TypeError, ValueError) as error:
        raise ValueError(f"invalid options for {cls.__name__}: {error}") from None


__all__ = ["BFGS", "FIRE", "LBFGS", "OPTIMIZERS", "BatchedOptimizer", "make_optimizer"]
