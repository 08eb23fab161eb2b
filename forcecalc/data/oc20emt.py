"""OC20-EMT: an OC20-shaped adsorbate + catalyst-slab data set labelled by ASE's EMT.

OC20 cannot be downloaded here, so this module builds a data set of the same shape with the
elements ASE's EMT supports: slabs of Al, Cu, Ag, Au, Ni, Pd, Pt (pure, and binary alloys with
ordered L1_2 / L1_0 or random substitution) cut along (111), (100), (110) and (211), with 3-4
layers and 15 Å of vacuum, carrying one of 25 adsorbates made of H, C, N, O at a random top,
bridge or hollow site, with a random orientation and height.

Per system (one slab + adsorbate placement) the frames are, as in OC20's S2EF, rattled and MD
subsets:

- ``relax``: every step of an EMT LBFGS relaxation (fmax 0.05 eV/Å, at most 300 steps) from the
  initial placement; ``step`` is the optimizer step (0 = initial structure);
- ``rattled``: a relaxation frame with Gaussian noise on the free atoms; ``step`` is the
  relaxation step it was taken from;
- ``md``: frames of a short Langevin run (300-1000 K) started from the relaxed structure;
  ``step`` is the MD step (1 fs each).

OC20 conventions: pbc True on all three axes, tags 0 (subsurface, fixed), 1 (surface, free),
2 (adsorbate), ``FixAtoms`` on tag 0; forces are the unconstrained EMT forces of every atom.

Energy: every stored ``energy`` (each frame, and the systems' ``relaxed_energy``) is OC20's
adsorption-energy convention,

    energy = E_EMT(frame) - E_EMT(relaxed clean slab) - sum over adsorbate atoms of mu_X,

where the clean slab is the same slab (same atoms, cell, FixAtoms) relaxed alone, and the
gas-phase references are mu_H = E(H2)/2, mu_O = E(H2O) - E(H2), mu_C = E(CO) - mu_O,
mu_N = E(N2)/2, each molecule EMT-relaxed in vacuum. The systems table keeps ``e_slab`` and
``e_ref`` (the sum of mu), so ``energy + e_slab + e_ref`` is the raw EMT energy.

Splits, fixed by the seed: ``train``, ``val_id``, ``test_id`` (in-domain adsorbates and bulks),
``test_ood_ads`` (5 adsorbates never in train), ``test_ood_cat`` (alloys of 4 element pairs never
in train, in any composition, ordering or facet), ``test_ood_both``. Every system is generated
from its own random stream ``SeedSequence(seed, spawn_key=(1, index))``, so a data set depends
only on ``(size, seed)``, not on the number of worker processes.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import TypeVar

import numpy as np
from ase import Atoms
from ase.build import bulk as ase_bulk
from ase.build import surface
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.data import covalent_radii
from ase.md.langevin import Langevin
from ase.optimize import LBFGS
from ase.units import fs, kB
from scipy.optimize import minimize_scalar
from scipy.sparse.csgraph import connected_components
from scipy.spatial.transform import Rotation
from tqdm import tqdm

from forcecalc.atomic import commit_file, existing_ancestor, try_lock
from forcecalc.data.store import DatasetWriter, FrameBatch

_Result = TypeVar("_Result")

#: Bumped whenever the same ``(size, seed)`` would produce different data.
GENERATOR_VERSION = "1.0"

METALS = ("Ag", "Al", "Au", "Cu", "Ni", "Pd", "Pt")
FACETS = ("(111)", "(100)", "(110)", "(211)")
SPLITS = ("train", "val_id", "test_id", "test_ood_ads", "test_ood_cat", "test_ood_both")
#: Frame kinds, stored as their index in this tuple.
FRAME_KINDS = ("relax", "rattled", "md")
SITES = ("top", "bridge", "hollow")
#: Alloy stoichiometries (count of the alphabetically first element, of the second) per
#: 4-site cubic cell, and their ordered structure.
STOICHIOMETRIES = {"A3B": (3, 1, "L12"), "AB": (2, 2, "L10"), "AB3": (1, 3, "L12")}

#: Adsorbates: symbols and positions (Å), the binding atom first at the origin, the rest
#: pointing away from the surface (+z) before the random orientation.
ADSORBATES: dict[str, tuple[str, tuple[tuple[float, float, float], ...]]] = {
    "O": ("O", ((0, 0, 0),)),
    "H": ("H", ((0, 0, 0),)),
    "N": ("N", ((0, 0, 0),)),
    "C": ("C", ((0, 0, 0),)),
    "OH": ("OH", ((0, 0, 0), (0, 0, 0.97))),
    "H2O": ("OH2", ((0, 0, 0), (0.76, 0, 0.59), (-0.76, 0, 0.59))),
    "CO": ("CO", ((0, 0, 0), (0, 0, 1.15))),
    "COH": ("COH", ((0, 0, 0), (0, 0, 1.33), (0.89, 0, 1.67))),
    "CHO": ("CHO", ((0, 0, 0), (-0.94, 0, 0.54), (0.60, 0, 1.06))),
    "CO2": ("CO2", ((0, 0, 0), (1.10, 0, 0.45), (-1.10, 0, 0.45))),
    "NO": ("NO", ((0, 0, 0), (0, 0, 1.16))),
    "N2": ("N2", ((0, 0, 0), (0, 0, 1.12))),
    "NH": ("NH", ((0, 0, 0), (0, 0, 1.03))),
    "NH2": ("NH2", ((0, 0, 0), (0.82, 0, 0.58), (-0.82, 0, 0.58))),
    "NH3": ("NH3", ((0, 0, 0), (0.94, 0, 0.38), (-0.47, 0.81, 0.38), (-0.47, -0.81, 0.38))),
    "CH": ("CH", ((0, 0, 0), (0, 0, 1.09))),
    "CH2": ("CH2", ((0, 0, 0), (0.89, 0, 0.63), (-0.89, 0, 0.63))),
    "CH3": ("CH3", ((0, 0, 0), (1.03, 0, 0.36), (-0.51, 0.89, 0.36), (-0.51, -0.89, 0.36))),
    "OCH3": (
        "OCH3",
        ((0, 0, 0), (0, 0, 1.42), (1.03, 0, 1.78), (-0.51, 0.89, 1.78), (-0.51, -0.89, 1.78)),
    ),
    "CH2OH": (
        "COHH2",
        ((0, 0, 0), (0, 0, 1.43), (0.90, 0, 1.75), (-0.90, 0.50, 0.35), (-0.90, -0.50, 0.35)),
    ),
    "COOH": ("COOH", ((0, 0, 0), (-1.05, 0, 0.65), (1.10, 0, 0.70), (1.10, 0, 1.68))),
    "NOH": ("NOH", ((0, 0, 0), (0, 0, 1.38), (0.92, 0, 1.70))),
    "NNH": ("N2H", ((0, 0, 0), (0, 0, 1.20), (0.90, 0, 1.60))),
    "OOH": ("O2H", ((0, 0, 0), (0, 0, 1.45), (0.93, 0, 1.75))),
    "CHOH": ("CHOH", ((0, 0, 0), (-0.95, 0, 0.55), (0.75, 0, 1.15), (1.70, 0, 0.95))),
}

#: Atomic planes per stacking repeat of ``ase.build.surface`` on the 4-site cubic cell, and
#: atomic planes per "layer" (a (211) layer is one 3-row terrace, as in ``ase.build.fcc211``).
_PLANES_PER_REPEAT = {"(111)": 1, "(100)": 2, "(110)": 2, "(211)": 2}
_PLANES_PER_LAYER = {"(111)": 1, "(100)": 1, "(110)": 1, "(211)": 3}
_MILLER = {"(111)": (1, 1, 1), "(100)": (1, 0, 0), "(110)": (1, 1, 0), "(211)": (2, 1, 1)}
#: In-plane repeats of the surface cell tried per facet (atoms per layer: 111: 4, 100: 2,
#: 110: 2, 211: 6 before repeating).
_REPEATS = {
    "(111)": ((2, 1), (2, 2)),
    "(100)": ((2, 2), (3, 2), (3, 3)),
    "(110)": ((2, 2), (2, 3), (3, 3)),
    "(211)": ((1, 2), (1, 3)),
}
#: Depth (in lattice constants) below the topmost atom within which atoms count as surface
#: atoms for site finding: the top plane, plus the second (110) or second and third (211).
_SITE_DEPTH = {"(111)": 0.3, "(100)": 0.3, "(110)": 0.45, "(211)": 0.45}
#: Binding-atom height ranges above the site (Å) before the overlap check.
_HEIGHTS = {"top": (1.6, 2.2), "bridge": (1.3, 1.9), "hollow": (1.0, 1.7)}
_VACUUM = 15.0  # Å of empty space between the slab top and the next periodic image
_MAX_TILT = np.deg2rad(60.0)
_MIN_DISTANCE_FACTOR = 0.8  # x sum of covalent radii, adsorbate-slab, at placement
_RELAX_FMAX = 0.05
_N_OOD_ADSORBATES = 5
_N_OOD_PAIRS = 4


@dataclass(frozen=True)
class SizeConfig:
    """What a size preset generates.

    Attributes:
        systems: number of systems per split (keys of :data:`SPLITS`).
        layers: slab layer counts drawn from.
        max_slab_atoms: largest slab drawn: in-plane repeats of :data:`_REPEATS` giving more
            atoms are not drawn. Where no repeat of a facet fits between the two bounds, the
            facet's smallest repeat is used (``tiny``: 18 is below every slab, so its slabs
            have 24 or 36 atoms).
        min_slab_atoms: smallest slab drawn, when a facet offers one that large (the
            repeats give at least 24 atoms, so the default 20 does not bind: ``small`` to
            ``large`` draw slabs of 24, 32, 36, 48 and 54 atoms).
        relax_steps: most LBFGS steps per relaxation (OC20: 300 here).
        n_rattled: rattled frames per system.
        n_md: MD frames per system.
        md_interval: MD steps between stored MD frames.
    """

    systems: dict[str, int]
    layers: tuple[int, ...] = (3, 4)
    max_slab_atoms: int = 60
    min_slab_atoms: int = 20
    relax_steps: int = 300
    n_rattled: int = 10
    n_md: int = 20
    md_interval: int = 5


SIZES: dict[str, SizeConfig] = {
    "tiny": SizeConfig(
        systems={s: (4 if s == "train" else 1) for s in SPLITS},
        layers=(3,),
        max_slab_atoms=18,
        min_slab_atoms=0,
        relax_steps=25,
        n_rattled=2,
        n_md=3,
        md_interval=2,
    ),
    "small": SizeConfig(
        systems={
            "train": 200,
            "val_id": 25,
            "test_id": 25,
            "test_ood_ads": 25,
            "test_ood_cat": 25,
            "test_ood_both": 25,
        },
    ),
    "medium": SizeConfig(
        systems={
            "train": 3350,
            "val_id": 150,
            "test_id": 150,
            "test_ood_ads": 150,
            "test_ood_cat": 150,
            "test_ood_both": 150,
        },
    ),
    # Its IS2RS test set (the four test splits, 1,000 systems) is what the batched-relaxation
    # benchmark relaxes (:func:`is2rs_inputs`); generating all of its frames takes hours.
    "large": SizeConfig(
        systems={
            "train": 10_000,
            "val_id": 250,
            "test_id": 250,
            "test_ood_ads": 250,
            "test_ood_cat": 250,
            "test_ood_both": 250,
        },
    ),
}
#: OC20's IS2RS / IS2RE test splits.
TEST_SPLITS = ("test_id", "test_ood_ads", "test_ood_cat", "test_ood_both")


@dataclass(frozen=True)
class SplitPlan:
    """Which adsorbates and bulks each split draws from; fixed by the seed.

    Attributes:
        ood_adsorbates: adsorbates of ``test_ood_ads`` / ``test_ood_both`` (never in train).
        id_adsorbates: all other adsorbates.
        ood_pairs: element pairs whose alloys make ``test_ood_cat`` / ``test_ood_both``.
        id_pairs: all other element pairs (pure metals are always in-domain).
    """

    ood_adsorbates: tuple[str, ...]
    id_adsorbates: tuple[str, ...]
    ood_pairs: tuple[tuple[str, str], ...]
    id_pairs: tuple[tuple[str, str], ...]

    def pools(self, split: str) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...], bool]:
        """Adsorbates, alloy element pairs and whether pure metals are allowed for ``split``."""
        ood_ads = split in ("test_ood_ads", "test_ood_both")
        ood_cat = split in ("test_ood_cat", "test_ood_both")
        adsorbates = self.ood_adsorbates if ood_ads else self.id_adsorbates
        pairs = self.ood_pairs if ood_cat else self.id_pairs
        return adsorbates, pairs, not ood_cat


def check_seed(seed: int) -> None:
    """A ValueError unless ``seed`` is a non-negative integer (what ``SeedSequence`` takes)."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"the seed must be a non-negative integer, got {seed!r}")


def plan_splits(seed: int) -> SplitPlan:
    """The held-out adsorbates and element pairs for ``seed``.

    In-domain adsorbates always cover H, C, N and O; the held-out sets are redrawn until so.

    Raises:
        ValueError: ``seed`` is not a non-negative integer.
    """
    check_seed(seed)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    names = tuple(ADSORBATES)
    while True:
        held = set(rng.choice(len(names), _N_OOD_ADSORBATES, replace=False).tolist())
        id_ads = tuple(n for i, n in enumerate(names) if i not in held)
        if {"H", "C", "N", "O"} <= {s for n in id_ads for s in Atoms(ADSORBATES[n][0]).symbols}:
            break
    pairs = tuple(itertools.combinations(METALS, 2))
    held_pairs = set(rng.choice(len(pairs), _N_OOD_PAIRS, replace=False).tolist())
    return SplitPlan(
        ood_adsorbates=tuple(n for i, n in enumerate(names) if i in held),
        id_adsorbates=id_ads,
        ood_pairs=tuple(p for i, p in enumerate(pairs) if i in held_pairs),
        id_pairs=tuple(p for i, p in enumerate(pairs) if i not in held_pairs),
    )


@cache
def emt_lattice_constants() -> dict[str, float]:
    """EMT's equilibrium fcc lattice constant (Å) of each metal."""

    def energy(a: float, symbol: str) -> float:
        atoms = ase_bulk(symbol, "fcc", a=a)
        atoms.calc = EMT()
        return float(atoms.get_potential_energy())

    return {
        m: float(
            minimize_scalar(
                energy, bounds=(3.0, 4.6), args=(m,), method="bounded", options={"xatol": 1e-6}
            ).x
        )
        for m in METALS
    }


@cache
def gas_references() -> dict[str, float]:
    """EMT gas-phase reference energies mu_X (eV) of H, O, C, N (see the module docstring)."""
    molecules = {
        "H2": ("H2", ((0, 0, 0), (0, 0, 0.74))),
        "H2O": ("OH2", ((0, 0, 0), (0.76, 0, 0.59), (-0.76, 0, 0.59))),
        "CO": ("CO", ((0, 0, 0), (0, 0, 1.13))),
        "N2": ("N2", ((0, 0, 0), (0, 0, 1.10))),
    }
    e = {}
    for name, (symbols, positions) in molecules.items():
        atoms = Atoms(symbols, positions=positions)
        atoms.center(vacuum=6.0)
        atoms.calc = EMT()
        LBFGS(atoms, logfile=None).run(fmax=1e-4, steps=1000)
        e[name] = float(atoms.get_potential_energy())
    mu_o = e["H2O"] - e["H2"]
    return {"H": e["H2"] / 2, "O": mu_o, "C": e["CO"] - mu_o, "N": e["N2"] / 2}


@dataclass(frozen=True)
class Bulk:
    """A bulk material: pure metal or binary alloy on the fcc lattice.

    Attributes:
        elements: one metal, or two in alphabetical order.
        stoichiometry: ``""`` for pure metals, else a key of :data:`STOICHIOMETRIES`.
        ordering: ``""`` (pure), ``"L12"`` / ``"L10"`` (ordered) or ``"random"``.
    """

    elements: tuple[str, ...]
    stoichiometry: str = ""
    ordering: str = ""

    @property
    def name(self) -> str:
        """E.g. ``"Cu"``, ``"Cu3Pt:L12"``, ``"CuPt:random"``."""
        if len(self.elements) == 1:
            return self.elements[0]
        n_a, n_b, _ = STOICHIOMETRIES[self.stoichiometry]
        a, b = self.elements
        if n_a == n_b:
            formula = f"{a}{b}"
        elif n_a > n_b:
            formula = f"{a}{n_a // n_b}{b}"
        else:
            formula = f"{a}{b}{n_b // n_a}"
        return f"{formula}:{self.ordering}"

    def lattice_constant(self, lattice: Mapping[str, float]) -> float:
        """Vegard's law over the pure metals' lattice constants ``lattice`` (Å)."""
        a = lattice
        if len(self.elements) == 1:
            return a[self.elements[0]]
        n_a, n_b, _ = STOICHIOMETRIES[self.stoichiometry]
        return (n_a * a[self.elements[0]] + n_b * a[self.elements[1]]) / (n_a + n_b)

    def cubic_cell(self, lattice: Mapping[str, float]) -> Atoms:
        """The 4-site conventional cubic cell; ordered alloys carry their ordering.

        Random alloys come back pure in their first element (substituted after the slab is cut).
        """
        a = self.lattice_constant(lattice)
        sites = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]) * a
        first = self.elements[0]
        symbols = [first] * 4
        if self.ordering in ("L12", "L10"):
            second = self.elements[1]
            n_a, _, _ = STOICHIOMETRIES[self.stoichiometry]
            if self.ordering == "L10":  # alternating (001) planes
                symbols = [first, second, second, first]
            elif n_a == 3:  # A3B: B on the cube corners
                symbols = [second, first, first, first]
            else:  # AB3: A on the cube corners
                symbols = [first, second, second, second]
        return Atoms(symbols, positions=sites, cell=np.eye(3) * a, pbc=True)


@dataclass(frozen=True)
class SystemSpec:
    """Everything drawn for one system before any EMT call."""

    adsorbate: str
    bulk: Bulk
    facet: str
    layers: int
    repeat: tuple[int, int]
    termination: int
    site: str


@dataclass(frozen=True)
class SystemTask:
    """One unit of work for a worker process (picklable)."""

    index: int
    split: str
    seed: int
    config: SizeConfig
    plan: SplitPlan
    lattice: dict[str, float]
    references: dict[str, float]


@dataclass
class SystemResult:
    """One generated system: its frames (all with the same atoms) and its table row.

    Attributes:
        numbers: ``[n]`` atomic numbers.
        tags: ``[n]`` OC20 tags.
        fixed: ``[n]`` bool, FixAtoms mask.
        cell: ``[3, 3]`` lattice vectors (rows, Å).
        positions: ``[f, n, 3]`` positions of the frames (Å).
        forces: ``[f, n, 3]`` unconstrained EMT forces (eV/Å).
        energy: ``[f]`` adsorption-referenced energies (eV).
        kind: ``[f]`` index into :data:`FRAME_KINDS`.
        step: ``[f]`` step in the trajectory the frame comes from.
        row: the systems-table row (scalars; ``initial_frame`` / ``relaxed_frame`` are frame
            indices within this system, shifted by the writer's frame count when stored).
    """

    numbers: np.ndarray
    tags: np.ndarray
    fixed: np.ndarray
    cell: np.ndarray
    positions: np.ndarray
    forces: np.ndarray
    energy: np.ndarray
    kind: np.ndarray
    step: np.ndarray
    row: dict[str, float | int | str | bool]


def _draw_spec(rng: np.random.Generator, split: str, task: SystemTask) -> SystemSpec:
    """Draw adsorbate, bulk, facet, layers, in-plane repeat, termination and site type."""
    adsorbates, pairs, pure_allowed = task.plan.pools(split)
    adsorbate = adsorbates[rng.integers(len(adsorbates))]
    if pure_allowed and rng.random() < 0.25:
        bulk = Bulk((METALS[rng.integers(len(METALS))],))
    else:
        pair = pairs[rng.integers(len(pairs))]
        stoichiometry = tuple(STOICHIOMETRIES)[rng.integers(len(STOICHIOMETRIES))]
        ordered = rng.random() < 0.5
        ordering = STOICHIOMETRIES[stoichiometry][2] if ordered else "random"
        bulk = Bulk(pair, stoichiometry, ordering)
    facet = FACETS[rng.integers(len(FACETS))]
    layers = int(task.config.layers[rng.integers(len(task.config.layers))])
    per_layer = {"(111)": 4, "(100)": 2, "(110)": 2, "(211)": 6}[facet]
    sizes = _REPEATS[facet]
    fitting = [
        r
        for r in sizes
        if task.config.min_slab_atoms
        <= r[0] * r[1] * per_layer * layers
        <= task.config.max_slab_atoms
    ]
    if not fitting:  # no repeat between the bounds (tiny): the smallest repeat of the facet
        fitting = [min(sizes, key=lambda r: r[0] * r[1])]
    repeat = fitting[rng.integers(len(fitting))]
    termination = int(rng.integers(2))
    site = SITES[rng.integers(len(SITES))]
    return SystemSpec(adsorbate, bulk, facet, layers, tuple(repeat), termination, site)


def build_slab(spec: SystemSpec, lattice: Mapping[str, float], rng: np.random.Generator) -> Atoms:
    """The clean slab of ``spec``: tags 0/1, FixAtoms on tag 0, pbc on all axes.

    The bottom two layers are fixed (tag 0), the others are free surface layers (tag 1). The
    cell's c axis is normal to the surface, leaving 15 Å of vacuum between periodic images.
    Random alloys get the whole number of second-element atoms nearest the bulk ratio
    (rounded half to even: a 54-atom AB3 slab gets 14 A and 40 B); ordered alloys get the
    composition of the planes cut, which need not be the bulk's.
    """
    facet = spec.facet
    ppl = _PLANES_PER_LAYER[facet]
    n_planes = spec.layers * ppl
    # Two spare repeats: ase.build.surface may split its end planes across the boundary.
    n_rep = -(-(n_planes + spec.termination) // _PLANES_PER_REPEAT[facet]) + 2
    raw = surface(spec.bulk.cubic_cell(lattice), _MILLER[facet], n_rep, vacuum=5.0, periodic=True)
    z = raw.positions[:, 2]
    order = np.argsort(-z, kind="stable")
    plane_of_sorted = np.concatenate([[0], np.cumsum(-np.diff(z[order]) > 0.3)])
    plane = np.empty(len(z), dtype=int)
    plane[order] = plane_of_sorted  # 0 = topmost plane
    counts = np.bincount(plane)
    complete = np.flatnonzero(counts == counts.max())  # contiguous: partial planes at the ends
    plane -= complete[0]  # 0 = topmost complete plane
    keep = (plane >= spec.termination) & (plane < spec.termination + n_planes)
    slab = raw[keep]
    layer = (plane[keep] - spec.termination) // ppl  # 0 = top layer
    slab.set_tags(np.where(layer >= spec.layers - 2, 0, 1))
    # Rebuild the cell: in-plane vectors from the surface, c normal to it with the vacuum.
    ab = slab.cell[:2].copy()
    zs = slab.positions[:, 2]
    thickness = zs.max() - zs.min()
    slab.positions[:, 2] += _VACUUM / 2 - zs.min()
    slab.set_cell([ab[0], ab[1], [0.0, 0.0, thickness + _VACUUM]])
    slab.pbc = True
    slab.wrap()
    slab = slab.repeat((*spec.repeat, 1))
    if spec.bulk.ordering == "random":
        n_a, n_b, _ = STOICHIOMETRIES[spec.bulk.stoichiometry]
        n_second = round(len(slab) * n_b / (n_a + n_b))
        chosen = rng.permutation(len(slab))[:n_second]
        symbols = np.array(slab.get_chemical_symbols(), dtype=object)
        symbols[chosen] = spec.bulk.elements[1]
        slab.set_chemical_symbols(symbols.tolist())
    slab.set_constraint(FixAtoms(mask=slab.get_tags() == 0))
    return slab


def _in_plane_images(cell: np.ndarray) -> np.ndarray:
    """``[9, 3]`` translations by -1, 0, 1 of the first two lattice vectors."""
    shifts = np.array(list(itertools.product((-1, 0, 1), repeat=2)), dtype=float)
    return shifts @ cell[:2]


def find_sites(slab: Atoms, facet: str, a: float) -> dict[str, list[np.ndarray]]:
    """Candidate adsorption sites (Cartesian, Å) of a slab, by type, each site once.

    Top sites sit on surface atoms, bridge sites between neighbouring surface atoms, hollow
    sites at the centroid of three mutually neighbouring surface atoms or at the centre of a
    square of four ((100)); neighbours are within 1.2 nearest-neighbour distances, minimum
    image in-plane.
    """
    pos = slab.positions
    slab_mask = slab.get_tags() < 2
    z_top = pos[slab_mask, 2].max()
    surf = np.flatnonzero(slab_mask & (pos[:, 2] >= z_top - _SITE_DEPTH[facet] * a))
    cell = np.asarray(slab.cell)
    images = _in_plane_images(cell)
    cutoff = 1.2 * a / np.sqrt(2)
    neighbors: dict[int, list[tuple[int, np.ndarray]]] = {int(i): [] for i in surf}
    for i, j in itertools.permutations(surf, 2):
        d = pos[j] - pos[i] + images
        neighbors[int(i)].extend((int(j), v) for v in d[np.linalg.norm(d, axis=1) < cutoff])

    def unique(points: list[np.ndarray]) -> list[np.ndarray]:
        """``points`` without periodic duplicates (in-plane fractional coordinates to 1e-3)."""
        out: dict[tuple[float, float, float], np.ndarray] = {}
        for p in points:
            f = np.round(np.linalg.solve(cell.T, p)[:2] % 1.0, 3) % 1.0
            out.setdefault((float(f[0]), float(f[1]), round(float(p[2]), 1)), p)
        return list(out.values())

    bridge, hollow = [], []
    for i, nbrs in neighbors.items():
        bridge.extend(pos[i] + v / 2 for j, v in nbrs if j > i)
        for (_, v), (_, w) in itertools.combinations(nbrs, 2):
            if np.linalg.norm(v - w) < cutoff:  # triangle
                hollow.append(pos[i] + (v + w) / 3)
            elif abs(v @ w) < 0.25 * np.linalg.norm(v) * np.linalg.norm(w):  # square corner
                hollow.append(pos[i] + (v + w) / 2)
    return {"top": [pos[i].copy() for i in surf], "bridge": bridge, "hollow": unique(hollow)}


def place_adsorbate(
    slab: Atoms, spec: SystemSpec, a: float, rng: np.random.Generator
) -> tuple[Atoms, str]:
    """Adsorbate + slab: binding atom above a random site, random orientation and height.

    The orientation is a random spin about the surface normal, a tilt of up to 60° about a
    random in-plane axis and another random spin; the adsorbate is then lifted in 0.1 Å steps
    until every adsorbate-slab distance is at least 0.8 x the sum of covalent radii.

    Returns:
        The combined atoms (adsorbate tagged 2, FixAtoms kept) and the site type used (a hollow
        or bridge with no candidate on this surface falls back to bridge, then top).
    """
    sites = find_sites(slab, spec.facet, a)
    site = spec.site
    while not sites[site]:
        site = SITES[SITES.index(site) - 1]
    anchor = sites[site][rng.integers(len(sites[site]))]
    symbols, positions = ADSORBATES[spec.adsorbate]
    axis_angle = rng.uniform(0, 2 * np.pi)
    axis = np.array([np.cos(axis_angle), np.sin(axis_angle), 0.0])
    rotation = (
        Rotation.from_rotvec([0, 0, rng.uniform(0, 2 * np.pi)])
        * Rotation.from_rotvec(axis * rng.uniform(0, _MAX_TILT))
        * Rotation.from_rotvec([0, 0, rng.uniform(0, 2 * np.pi)])
    )
    ads_pos = rotation.apply(np.asarray(positions, dtype=float))
    ads_pos += anchor + np.array([0.0, 0.0, rng.uniform(*_HEIGHTS[site])])
    ads = Atoms(symbols, positions=ads_pos)
    ads.set_tags(2)
    system = slab.copy()
    system.extend(ads)
    system.set_constraint(FixAtoms(mask=system.get_tags() == 0))
    n_slab = len(slab)
    radii = covalent_radii[system.numbers]
    min_d = _MIN_DISTANCE_FACTOR * (radii[n_slab:, None] + radii[None, :n_slab])
    for _ in range(40):
        d = system.get_distances
        dist = np.stack([d(i, range(n_slab), mic=True) for i in range(n_slab, len(system))])
        if (dist >= min_d).all():
            break
        system.positions[n_slab:, 2] += 0.1
    return system, site


def _relax(atoms: Atoms, steps: int) -> tuple[list[tuple[np.ndarray, float, np.ndarray]], bool]:
    """LBFGS to fmax 0.05 eV/Å; every visited structure as (positions, energy, raw forces)."""
    frames = []
    converged = False
    optimizer = LBFGS(atoms, logfile=None)
    for converged in optimizer.irun(fmax=_RELAX_FMAX, steps=steps):  # noqa: B007
        frames.append(
            (
                atoms.positions.copy(),
                float(atoms.get_potential_energy()),
                atoms.get_forces(apply_constraint=False).copy(),
            )
        )
    return frames, bool(converged)


def _anomalies(initial: Atoms, relaxed: Atoms) -> int:
    """OC20-style anomaly bits of a relaxation (0 = none).

    1: desorbed (no adsorbate atom within 1.5 x covalent radii of a slab atom);
    2: dissociated (the adsorbate's bond graph, 1.25 x covalent radii, fell apart);
    4: slab atom moved by more than 1 Å (reconstruction).
    """
    tags = relaxed.get_tags()
    ads = np.flatnonzero(tags == 2)
    slab = np.flatnonzero(tags < 2)
    radii = covalent_radii[relaxed.numbers]
    bits = 0
    d_as = np.stack([relaxed.get_distances(i, slab, mic=True) for i in ads])
    if (d_as > 1.5 * (radii[ads, None] + radii[None, slab])).all():
        bits |= 1

    def n_components(atoms: Atoms) -> int:
        d = atoms.get_all_distances(mic=True)[np.ix_(ads, ads)]
        bonded = d < 1.25 * (radii[ads, None] + radii[None, ads])
        return int(connected_components(bonded, directed=False)[0])

    if n_components(relaxed) > n_components(initial):
        bits |= 2
    moved = relaxed.positions[slab] - initial.positions[slab]
    if np.linalg.norm(moved, axis=1).max() > 1.0:
        bits |= 4
    return bits


def _placed_system(
    task: SystemTask,
) -> tuple[np.random.Generator, SystemSpec, float, Atoms, str]:
    """System ``task.index`` before its adsorbate relaxation: the random stream (advanced past
    the draws made so far), the spec, the EMT energy of the relaxed clean slab, the initial
    adsorbate + slab structure (the IS2RS input) and the site type used."""
    rng = np.random.default_rng(np.random.SeedSequence(task.seed, spawn_key=(1, task.index)))
    spec = _draw_spec(rng, task.split, task)
    slab = build_slab(spec, task.lattice, rng)
    slab.calc = EMT()
    slab_frames, _ = _relax(slab, task.config.relax_steps)
    system, site = place_adsorbate(slab, spec, spec.bulk.lattice_constant(task.lattice), rng)
    return rng, spec, slab_frames[-1][1], system, site


def initial_structure(task: SystemTask) -> Atoms:
    """The IS2RS input of system ``task.index`` (equal to the initial frame that
    :func:`generate_system` stores), without the adsorbate relaxation, rattling and MD: one
    clean-slab EMT relaxation instead of the whole system.  ``info`` holds ``sid``, ``split``,
    ``adsorbate``, ``bulk``, ``facet`` and ``site``."""
    _, spec, _, system, site = _placed_system(task)
    system.info.update(
        sid=task.index,
        split=task.split,
        adsorbate=spec.adsorbate,
        bulk=spec.bulk.name,
        facet=spec.facet,
        site=site,
    )
    return system


def generate_system(task: SystemTask) -> SystemResult:
    """Generate system ``task.index``: clean-slab relaxation, adsorbate relaxation trajectory,
    rattled frames and Langevin MD frames, all labelled by EMT (see the module docstring)."""
    rng, spec, e_slab, system, site = _placed_system(task)
    cfg = task.config
    e_ref = float(sum(task.references[s] for s in system.symbols[system.get_tags() == 2]))
    system.calc = EMT()
    initial = system.copy()
    relax_frames, converged = _relax(system, cfg.relax_steps)
    free = system.get_tags() != 0

    positions = [f[0] for f in relax_frames]
    energies = [f[1] for f in relax_frames]
    forces = [f[2] for f in relax_frames]
    kinds = [0] * len(relax_frames)
    steps = list(range(len(relax_frames)))

    for _ in range(cfg.n_rattled):
        source = int(rng.integers(len(relax_frames)))
        sigma = rng.uniform(0.02, 0.15)
        rattled = relax_frames[source][0].copy()
        rattled[free] += rng.normal(0.0, sigma, size=(int(free.sum()), 3))
        system.positions = rattled
        positions.append(rattled)
        energies.append(float(system.get_potential_energy()))
        forces.append(system.get_forces(apply_constraint=False).copy())
        kinds.append(1)
        steps.append(source)

    temperature = float(rng.uniform(300.0, 1000.0))
    system.positions = relax_frames[-1][0].copy()
    sigma = np.sqrt(system.get_masses() * kB * temperature)  # Maxwell-Boltzmann momenta
    system.set_momenta(rng.standard_normal((len(system), 3)) * sigma[:, None])  # fixed: 0
    dyn = Langevin(
        system, 1.0 * fs, temperature_K=temperature, friction=0.02 / fs, fixcm=False, rng=rng
    )
    for k in range(1, cfg.n_md + 1):
        dyn.run(cfg.md_interval)
        positions.append(system.positions.copy())
        energies.append(float(system.get_potential_energy()))
        forces.append(system.get_forces(apply_constraint=False).copy())
        kinds.append(2)
        steps.append(k * cfg.md_interval)

    relaxed = initial.copy()
    relaxed.positions = relax_frames[-1][0]
    row: dict[str, float | int | str | bool] = {
        "sid": task.index,
        "adsorbate": spec.adsorbate,
        "bulk": spec.bulk.name,
        "facet": spec.facet,
        "site": site,
        "layers": spec.layers,
        "repeat": f"{spec.repeat[0]}x{spec.repeat[1]}",
        "termination": spec.termination,
        "e_slab": e_slab,
        "e_ref": e_ref,
        "initial_frame": 0,
        "relaxed_frame": len(relax_frames) - 1,
        "relaxed_energy": energies[len(relax_frames) - 1] - e_slab - e_ref,
        "converged": converged,
        "n_relax_steps": len(relax_frames) - 1,
        "anomaly": _anomalies(initial, relaxed),
        "md_temperature": temperature,
    }
    return SystemResult(
        numbers=system.numbers.astype(np.uint8),
        tags=system.get_tags().astype(np.uint8),
        fixed=~free,
        cell=np.asarray(system.cell, dtype=np.float64),
        positions=np.stack(positions),
        forces=np.stack(forces).astype(np.float32),
        energy=np.asarray(energies) - e_slab - e_ref,
        kind=np.asarray(kinds, dtype=np.uint8),
        step=np.asarray(steps, dtype=np.int32),
        row=row,
    )


def result_to_batch(result: SystemResult, system_row: int) -> FrameBatch:
    """The frames of ``result`` as a :class:`~forcecalc.data.store.FrameBatch`."""
    f, n = result.positions.shape[:2]
    return FrameBatch(
        positions=result.positions.reshape(f * n, 3),
        numbers=np.tile(result.numbers, f),
        forces=result.forces.reshape(f * n, 3),
        tags=np.tile(result.tags, f),
        fixed=np.tile(result.fixed, f),
        natoms=np.full(f, n, dtype=np.int64),
        energy=result.energy,
        cell=np.broadcast_to(result.cell, (f, 3, 3)).copy(),
        pbc=np.ones((f, 3), dtype=bool),
        system=np.full(f, system_row, dtype=np.int64),
        step=result.step,
        kind=result.kind,
    )


def _tasks(size: str, seed: int) -> list[SystemTask]:
    """All systems of all splits, in split order; ``index`` is global across splits."""
    if size not in SIZES:
        raise ValueError(f"unknown OC20-EMT size {size!r}; sizes are {sorted(SIZES)}")
    config = SIZES[size]
    plan = plan_splits(seed)
    lattice = emt_lattice_constants()
    references = gas_references()
    tasks = []
    for split in SPLITS:
        for _ in range(config.systems[split]):
            tasks.append(SystemTask(len(tasks), split, seed, config, plan, lattice, references))
    return tasks


def _run_tasks(
    tasks: Sequence[SystemTask],
    workers: int,
    work: Callable[[SystemTask], _Result] = generate_system,
) -> Iterator[_Result]:
    """``work`` of each task in task order, computed here (``workers <= 1``) or by spawned
    processes."""
    if workers <= 1:
        yield from map(work, tasks)
        return
    single_thread = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    saved = {k: os.environ.get(k) for k in single_thread}
    os.environ.update(single_thread)  # inherited by the spawned workers
    try:
        pool = multiprocessing.get_context("spawn").Pool(workers)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    with pool:
        yield from pool.imap(work, tasks, chunksize=1)


def is2rs_inputs(
    size: str,
    seed: int = 0,
    splits: Sequence[str] = TEST_SPLITS,
    workers: int = 1,
    progress: bool = False,
) -> list[Atoms]:
    """The initial structures (IS2RS inputs) of the systems of ``splits`` of data set
    ``(size, seed)``, in data-set order, equal to the initial frames :func:`generate` stores
    for them, made without generating the frames (one clean-slab EMT relaxation per system;
    see :func:`initial_structure`)."""
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; splits are {list(SPLITS)}")
    tasks = [t for t in _tasks(size, seed) if t.split in splits]
    bar = tqdm(total=len(tasks), unit="system", disable=not progress, desc=f"is2rs {size}")
    structures = []
    results = _run_tasks(tasks, workers, initial_structure)
    try:
        for atoms in results:
            structures.append(atoms)
            bar.update(1)
    finally:
        results.close()
        bar.close()
    return structures


def dataset_attrs(size: str, seed: int) -> dict[str, str | int]:
    """Metadata written on every split file (JSON strings for the structured parts)."""
    plan = plan_splits(seed)
    return {
        "generator": "forcecalc.data.oc20emt",
        "generator_version": GENERATOR_VERSION,
        "size": size,
        "seed": seed,
        "config": json.dumps(asdict(SIZES[size]), sort_keys=True),
        "plan": json.dumps(asdict(plan), sort_keys=True),
        "gas_references": json.dumps(gas_references(), sort_keys=True),
        "lattice_constants": json.dumps(emt_lattice_constants(), sort_keys=True),
        "frame_kinds": json.dumps(list(FRAME_KINDS)),
        "energy": (
            "E_EMT(frame) - E_EMT(relaxed clean slab) - sum_adsorbate mu_X; "
            "mu_H = E(H2)/2, mu_O = E(H2O) - E(H2), mu_C = E(CO) - mu_O, mu_N = E(N2)/2"
        ),
    }


#: Name parts of the hidden folder, inside the output folder, that a generation writes its
#: split files into before moving them into place.
_STAGING_PREFIX = ".oc20emt."
_STAGING_SUFFIX = ".tmp"


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (``flock`` on the folder itself, released when the
    process ends, however it ends), or a ValueError if another generation holds it; no lock
    where the system or the file system has no ``flock``."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        if try_lock(handle) is False:
            raise ValueError(
                f"another generation is writing into {folder}: wait for it to end or choose "
                "another output folder"
            )
        yield
    finally:
        os.close(handle)


def _remove_leftovers(out: Path) -> None:
    """Remove what killed generations into ``out`` left there: hidden staging folders
    (``.oc20emt.*.tmp``) and the temporary split files (``.<split>.h5.*.tmp``) of versions
    that wrote them straight into ``out``."""
    for path in out.glob(f"{_STAGING_PREFIX}*{_STAGING_SUFFIX}"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
    for split in SPLITS:
        for path in out.glob(f".{split}.h5.*.tmp"):
            if path.is_file():
                path.unlink(missing_ok=True)


def _write_splits(
    tasks: Sequence[SystemTask],
    folder: Path,
    attrs: Mapping[str, str | int],
    workers: int,
    bar: tqdm,
) -> dict[str, Path]:
    """Generate ``tasks`` (all systems of all splits, in split order) into
    ``<folder>/<split>.h5``, one file per split; returns each split's file."""
    remaining = {s: sum(t.split == s for t in tasks) for s in SPLITS}
    paths: dict[str, Path] = {}
    writer: DatasetWriter | None = None
    frames = 0
    results = _run_tasks(tasks, workers)
    try:
        for task, result in zip(tasks, results, strict=True):
            if writer is None:
                writer = DatasetWriter(folder / f"{task.split}.h5", {**attrs, "split": task.split})
            row = dict(result.row)
            row["initial_frame"] = int(row["initial_frame"]) + writer.n_frames
            row["relaxed_frame"] = int(row["relaxed_frame"]) + writer.n_frames
            writer.append(
                result_to_batch(result, writer.n_systems), {k: [v] for k, v in row.items()}
            )
            frames += len(result.energy)
            bar.update(1)
            bar.set_postfix(frames=frames, refresh=False)
            remaining[task.split] -= 1
            if remaining[task.split] == 0:
                paths[task.split] = writer.close()
                writer = None
    finally:
        results.close()  # stops the worker pool early on an error
        if writer is not None:
            writer.abort()
    return paths


def _publish(staged: Mapping[str, Path], out: Path) -> dict[str, Path]:
    """Move the complete split files ``staged`` into ``out``, after removing every split file
    of the previous data set there: an interruption in between leaves some of the new files
    and none of the old, never a mix. Returns each split's file in ``out``."""
    for split in SPLITS:
        (out / f"{split}.h5").unlink(missing_ok=True)
    paths = {}
    for split, path in staged.items():
        paths[split] = out / path.name
        commit_file(path, paths[split])
    return paths


def generate(
    size: str,
    out: str | os.PathLike[str],
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, Path]:
    """Generate the OC20-EMT data set ``size`` into one HDF5 file per split in ``out``.

    The split files are written into a hidden folder inside ``out`` (``.oc20emt.*.tmp``)
    and moved into place only once all of them are complete: the old split files of ``out``
    (a previous data set) are removed, then the new ones moved in. An interrupted run
    therefore leaves the previous data set untouched (the hidden folder is removed on an
    exception or Ctrl-C; after a kill, the next generation into ``out`` removes it), or, if
    interrupted in the instant of the move, only new split files, some missing; never files
    of two data sets. Other files in ``out`` are left alone. Two generations into one folder
    at once are refused.

    Args:
        size: a key of :data:`SIZES` (``"tiny"``, ``"small"``, ``"medium"``, ``"large"``).
        out: output folder (created); files are ``<out>/<split>.h5``.
        seed: the data set's seed, a non-negative integer; results depend only on
            ``(size, seed)``.
        workers: processes generating systems (1: in this process).
        progress: show a tqdm progress bar.

    Returns:
        The path of each split's file.

    Raises:
        ValueError: an unknown size, a negative seed, ``out`` or a split file's path is not
            a file/folder as needed, or another generation is writing into ``out``; all
            but the last are found before anything is created.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: the data set is a folder of split files")
    ancestor = existing_ancestor(out)
    if not ancestor.is_dir():
        raise ValueError(f"cannot make --out {out}: {ancestor} is a file, not a folder")
    folders = [str(out / f"{s}.h5") for s in SPLITS if (out / f"{s}.h5").is_dir()]
    if folders:
        raise ValueError(f"cannot write the split files: {', '.join(folders)} are folders")
    tasks = _tasks(size, seed)
    attrs = dataset_attrs(size, seed)
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with _exclusive(out):
            _remove_leftovers(out)
            staging = Path(tempfile.mkdtemp(_STAGING_SUFFIX, _STAGING_PREFIX, out))
            desc = f"oc20emt {size}"
            try:
                with tqdm(total=len(tasks), unit="system", disable=not progress, desc=desc) as bar:
                    staged = _write_splits(tasks, staging, attrs, workers, bar)
                return _publish(staged, out)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        if made:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
