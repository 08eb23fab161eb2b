"""Training data: one lazy, random-access interface over every source, splits, and collation.

A *frame source* is a ``Sequence`` of ``ase.Atoms``, each carrying its DFT energy and forces
(a ``SinglePointCalculator``), its ``FixAtoms`` constraint and its OC20 tags.  Sources:

* our HDF5 files (``.h5``/``.hdf5``, through :func:`forcecalc.data.open_dataset`);
* ASE databases (``.db``), read row by row;
* extended XYZ files (``.xyz``/``.extxyz``): frame offsets indexed once, frames parsed on access;
* ASE trajectories (``.traj``), read frame by frame;
* any other file ASE reads (VASP ``OUTCAR``, ``vasprun.xml``, ...), read whole on first access;
* a list of ``Atoms``.

:class:`Collater` turns a list of frames into a :class:`TrainBatch`: the graph
(:class:`~forcecalc.graph.Batch`) plus the target tensors.  :class:`BatchPlan` decides which
frames form each step's batch, for one or several processes, so that a run split over ``W``
processes sees exactly the frames a single process with a ``W`` times larger batch sees, and so
that a resumed run continues from the same position.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from forcecalc.data.store import (
    check_energy_is_a_number,
    label_energy,
    non_finite,
    not_finite_message,
)
from forcecalc.graph import Batch
from forcecalc.graph.batch import check_atoms

if TYPE_CHECKING:
    from ase import Atoms
    from ase.db.core import Database

    from forcecalc.data.store import Dataset

#: What a frame's labels depend on: changed after they were computed, they are stale.
_GEOMETRY = ("positions", "numbers", "cell", "pbc")
#: What ASE's readers raise on a file they cannot parse (XYZError is an OSError).
_PARSE_ERRORS = (OSError, ValueError, KeyError, IndexError, RuntimeError)
HDF5_SUFFIXES = (".h5", ".hdf5")
EXTXYZ_SUFFIXES = (".xyz", ".extxyz")


class ExtxyzFrames(Sequence):
    """Lazy random access to the frames of an (extended) XYZ file.

    The byte offset of every frame is found once by reading the atom-count lines; a frame is
    parsed (by ASE) only when it is accessed.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._offsets = self._index()

    def _index(self) -> list[int]:
        offsets = []
        with open(self.path, "rb") as stream:
            while True:
                start = stream.tell()
                line = stream.readline()
                if not line:
                    break
                if not line.strip():
                    continue
                try:
                    n_atoms = int(line.split()[0])
                except ValueError:
                    raise ValueError(
                        f"{self.path}: expected an atom count at byte {start}, got {line[:40]!r}"
                    ) from None
                offsets.append(start)
                for _ in range(n_atoms + 1):
                    if not stream.readline():
                        raise ValueError(f"{self.path}: frame {len(offsets) - 1} is truncated")
        return offsets

    def __len__(self) -> int:
        return len(self._offsets)

    def labelled_elements(self) -> np.ndarray:
        """The elements of every frame, ``[n_pairs, 2]`` (frame, atomic number) pairs, after
        checking from each frame's comment line (no frame is parsed) that ASE will read an
        energy and forces for it.

        Raises:
            ValueError: a frame without energy or forces, with an energy that is no number,
                an energy or forces that are not finite, or with an unknown element (the
                message names the file and the frame's index in it).
        """
        from ase.data import atomic_numbers
        from ase.io.extxyz import key_val_str_to_dict, parse_properties

        found: list[tuple[int, int]] = []
        with open(self.path, "rb") as stream:
            for index, start in enumerate(self._offsets):
                stream.seek(start)
                n_atoms = int(stream.readline().split()[0])
                info = key_val_str_to_dict(stream.readline().decode().strip())
                properties, names = parse_properties(info.get("Properties", "species:S:1:pos:R:3"))[
                    :2
                ]
                columns, column = {}, 0
                for name in names:
                    ase_name, width = properties[name]
                    columns[ase_name] = (column, width)
                    column += width
                energy = label_energy(info)
                forces = columns.get("forces", (0, 0))
                missing = _missing_labels(energy is not None, forces[1] == 3)
                if missing:
                    raise ValueError(_unlabelled(f"{self.path}: frame {index}", missing))
                check_energy_is_a_number(energy, f"{self.path}: frame {index}")
                species = columns.get("symbols", columns.get("numbers"))
                if species is None:
                    raise ValueError(f"{self.path}: frame {index} has no species column")
                values, force_texts = set(), []
                for _ in range(n_atoms):
                    fields = stream.readline().split()
                    values.add(fields[species[0]])
                    force_texts += fields[forces[0] : forces[0] + 3]
                bad = [
                    name
                    for name, texts in (("energy", [energy]), ("forces", force_texts))
                    if non_finite(texts)
                ]
                if bad:
                    raise ValueError(not_finite_message(f"{self.path}: frame {index}", bad))
                for value in values:
                    text = value.decode()
                    number = int(text) if text.isdigit() else atomic_numbers.get(text.capitalize())
                    if number is None:
                        raise ValueError(
                            f"{self.path}: frame {index} has an unknown element {text!r}"
                        )
                    found.append((index, number))
        return _element_pairs(found)

    def __getitem__(self, index: int) -> Atoms:  # type: ignore[override]
        from ase.io import read

        start = self._offsets[index]
        end = self._offsets[index + 1] if index + 1 < len(self._offsets) else None
        with open(self.path, "rb") as stream:
            stream.seek(start)
            text = stream.read(-1 if end is None else end - start).decode()
        try:
            return read(io.StringIO(text), format="extxyz")
        except _PARSE_ERRORS as error:
            raise ValueError(
                f"{self.path}: frame {index} cannot be read: {type(error).__name__}: {error}"
            ) from error


class AseDbFrames(Sequence):
    """Lazy random access to the rows of an ASE database (one connection per process)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._connection = None
        self._pid: int | None = None
        self._ids = [row.id for row in self._db().select(include_data=False)]

    def _db(self) -> Database:
        if self._connection is None or self._pid != os.getpid():
            from ase.db import connect

            self._connection = connect(self.path)
            self._pid = os.getpid()
        return self._connection

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_connection": None, "_pid": None}

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, index: int) -> Atoms:  # type: ignore[override]
        return self._db().get(id=self._ids[index]).toatoms()

    def labelled_elements(self) -> np.ndarray:
        """The elements of every row, ``[n_pairs, 2]`` (frame, atomic number) pairs, after
        checking from the rows' columns (no ``Atoms`` built) that each has a finite energy
        and forces.

        Raises:
            ValueError: a row without energy or forces, with an energy that is no number, or
                with an energy or forces that are not finite (the message names the file, the
                frame's index in it and the row's id).
        """
        found: list[tuple[int, int]] = []
        for index, row in enumerate(self._db().select(include_data=False)):
            energy, forces = label_energy(row), row.get("forces")
            missing = _missing_labels(energy is not None, forces is not None)
            where = f"{self.path}: frame {index} (row id {row.id}, {row.formula})"
            if missing:
                raise ValueError(_unlabelled(where, missing))
            check_energy_is_a_number(energy, where)
            bad = [
                name
                for name, values in (("energy", [energy]), ("forces", np.ravel(forces)))
                if non_finite(values)
            ]
            if bad:
                raise ValueError(not_finite_message(where, bad))
            found += [(index, int(z)) for z in np.unique(row.numbers)]
        return _element_pairs(found)


class TrajectoryFrames(Sequence):
    """Lazy random access to an ASE ``.traj`` file (opened per access, fork-safe)."""

    def __init__(self, path: str | os.PathLike) -> None:
        from ase.io import Trajectory

        self.path = Path(path)
        with Trajectory(self.path) as trajectory:
            self._length = len(trajectory)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Atoms:  # type: ignore[override]
        from ase.io import Trajectory

        with Trajectory(self.path) as trajectory:
            return trajectory[index]

    def __iter__(self) -> Iterator:
        from ase.io import Trajectory

        with Trajectory(self.path) as trajectory:
            yield from trajectory


class AseFileFrames(Sequence):
    """Any file ASE reads (``OUTCAR``, ``vasprun.xml``, ...): read whole on first access."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._frames: list | None = None

    def _load(self) -> list:
        if self._frames is None:
            from ase.io import read

            try:
                frames = read(self.path, index=":")
            except _PARSE_ERRORS as error:
                raise ValueError(
                    f"cannot read {self.path}: {type(error).__name__}: {error}"
                ) from error
            self._frames = frames if isinstance(frames, list) else [frames]
        return self._frames

    def __len__(self) -> int:
        return len(self._load())

    def __getitem__(self, index: int) -> Atoms:  # type: ignore[override]
        return self._load()[index]


class ConcatFrames(Sequence):
    """Several sources as one sequence; :meth:`locate` says which source a frame comes from,
    ``names`` what each source is called in messages."""

    def __init__(self, sources: Sequence[Sequence], names: Sequence[str] | None = None) -> None:
        self.sources = list(sources)
        #: what each source is called in messages (its path)
        self.names = [str(n) for n in names] if names is not None else ["<frames>"] * len(sources)
        self._bounds = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self._bounds[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """``(source number, index within it)`` of frame ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"frame {index} out of range (0..{len(self) - 1})")
        source = int(np.searchsorted(self._bounds, index, side="right")) - 1
        return source, index - int(self._bounds[source])

    def __getitem__(self, index: int) -> Atoms:  # type: ignore[override]
        source, local = self.locate(int(index))
        return self.sources[source][local]


class SubsetFrames(Sequence):
    """The frames ``indices`` of ``frames``."""

    def __init__(self, frames: Sequence, indices: Sequence[int]) -> None:
        self.frames = frames
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Atoms:  # type: ignore[override]
        return self.frames[int(self.indices[index])]


def open_source(source: str | os.PathLike | Sequence) -> Sequence:
    """One frame source: a path (format from its suffix) or a sequence of ``Atoms``.

    Raises:
        FileNotFoundError: the path does not exist.
    """
    if not isinstance(source, (str, os.PathLike)):
        return source
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"training data {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in HDF5_SUFFIXES:
        from forcecalc.data import open_dataset

        return open_dataset(path)
    if suffix == ".db":
        return AseDbFrames(path)
    if suffix in EXTXYZ_SUFFIXES:
        return ExtxyzFrames(path)
    if suffix == ".traj":
        return TrajectoryFrames(path)
    return AseFileFrames(path)


def open_frames(sources: Sequence[str | os.PathLike] | Sequence) -> ConcatFrames:
    """Several sources (paths, or one list of ``Atoms``) as one :class:`ConcatFrames`."""
    if len(sources) and hasattr(sources[0], "positions"):
        return ConcatFrames([sources])
    return ConcatFrames([open_source(s) for s in sources], [str(s) for s in sources])


def labelled_elements(frames: Sequence) -> dict[str, np.ndarray]:
    """Check that every frame of ``frames`` has the energy and forces training needs, and
    return the elements of each frame, per source (a :class:`ConcatFrames`' ``names``, else
    ``"<frames>"``): ``[n_pairs, 2]`` int64 (frame index in ``frames``, atomic number).

    Reads only what the check needs where the format allows: the comment lines of an
    extended XYZ file, the energy and force arrays of our HDF5 files, the columns of an ASE
    database; other sources are read frame by frame.

    Raises:
        ValueError: a frame without energy or forces, or with forces of the wrong shape; the
            message names the source (file) and the frame's index within it.
    """
    if isinstance(frames, ConcatFrames):
        pairs = list(zip(frames.names, frames.sources, strict=True))
    else:
        pairs = [("<frames>", frames)]
    found: dict[str, np.ndarray] = {}
    first = 0
    for name, source in pairs:
        if isinstance(source, (ExtxyzFrames, AseDbFrames)):
            elements = source.labelled_elements()
        elif hasattr(source, "atom_array") and hasattr(source, "offsets"):
            elements = _dataset_elements(source, name)
        else:
            listed: list[tuple[int, int]] = []
            for index, atoms in enumerate(source):
                frame_targets(atoms, index, source=name)
                listed += [(index, int(z)) for z in np.unique(atoms.numbers)]
            elements = _element_pairs(listed)
        elements = elements + np.array([first, 0])  # to indices in ``frames``
        found[name] = np.concatenate([found[name], elements]) if name in found else elements
        first += len(source)
    return found


def elements_of(
    elements: dict[str, np.ndarray], frames: Sequence[int] | None = None
) -> dict[str, set[int]]:
    """The atomic numbers per source of :func:`labelled_elements`' table ``elements``, over
    the frames ``frames`` (indices; all by default)."""
    return {
        name: {
            int(z)
            for z in np.unique(
                pairs[:, 1] if frames is None else pairs[np.isin(pairs[:, 0], frames), 1]
            )
        }
        for name, pairs in elements.items()
    }


def labelled_numbers(frames: Sequence) -> dict[str, set[int]]:
    """:func:`labelled_elements`' check, and the atomic numbers found, per source."""
    return elements_of(labelled_elements(frames))


def _element_pairs(pairs: list[tuple[int, int]]) -> np.ndarray:
    """``pairs`` of (frame, atomic number) as a ``[n_pairs, 2]`` int64 array."""
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def _dataset_elements(dataset: Dataset, name: str, chunk: int = 1 << 20) -> np.ndarray:
    """:meth:`ExtxyzFrames.labelled_elements` of a :class:`forcecalc.data.Dataset` (energy or
    any force not finite: unlabelled, as the reader treats them), read ``chunk`` atoms at a
    time."""
    for label, missing in zip(("energy", "forces"), dataset.missing_labels(chunk), strict=True):
        if missing.any():
            frame = int(np.flatnonzero(missing)[0])
            raise ValueError(_unlabelled(f"{name}: frame {frame}", [label]))
    offsets = np.asarray(dataset.offsets, dtype=np.int64)
    found = []
    for start in range(0, int(offsets[-1]), chunk):
        numbers = dataset.atom_array("numbers", start, start + chunk).astype(np.int64)
        frame = np.searchsorted(offsets, np.arange(start, start + len(numbers)), side="right") - 1
        keys = np.unique(frame * 256 + numbers)
        found.append(np.stack([keys // 256, keys % 256], axis=1))
    return np.unique(np.concatenate(found), axis=0) if found else _element_pairs([])


def _missing_labels(has_energy: bool, has_forces: bool) -> list[str]:
    """The labels training needs that a frame lacks: ``"energy"``, ``"forces"``, in order."""
    return [name for name, has in (("energy", has_energy), ("forces", has_forces)) if not has]


def _unlabelled(where: str, missing: Sequence[str]) -> str:
    return (
        f"{where} has no {' and no '.join(missing)}: training needs an energy and forces for "
        "every frame (attach a SinglePointCalculator, or store them in the file)"
    )


def random_split(
    frames: Sequence, val_fraction: float, seed: int
) -> tuple[SubsetFrames, SubsetFrames]:
    """``(train, val)`` subsets: a seeded permutation, the first ``round(n * fraction)`` frames
    held out, at least one when ``val_fraction > 0`` and there are two or more frames, and
    never every frame (a single frame trains, unvalidated)."""
    n = len(frames)
    n_val = min(round(n * val_fraction), max(n - 1, 0))
    if val_fraction > 0 and n > 1:
        n_val = max(n_val, 1)
    order = _seeded_order(n, seed)
    train = SubsetFrames(frames, np.sort(order[n_val:]))
    return train, SubsetFrames(frames, np.sort(order[:n_val]))


def seeded_subset(frames: Sequence, size: int, seed: int) -> Sequence:
    """``size`` frames chosen by a seeded permutation, in their original order (the
    validation frames :func:`random_split` would hold out with ``size`` of them)."""
    return SubsetFrames(frames, np.sort(_seeded_order(len(frames), seed)[:size]))


def _seeded_order(n: int, seed: int) -> np.ndarray:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()


def frame_targets(
    atoms: Atoms, index: int | None = None, source: str | None = None
) -> tuple[float, np.ndarray]:
    """``(energy, forces [n_atoms, 3])`` of a labelled frame (eV, eV/Å).

    Raises:
        ValueError: the frame has no energy or no forces, forces of the wrong shape, labels
            that are not finite, or labels of other atoms (its calculator's atoms differ in
            positions, numbers, cell or pbc: ``atoms.get_potential_energy()`` refuses them
            too); the message names the frame: ``source`` and ``index`` when given.
    """
    label = f"frame {index}" if index is not None else "a frame"
    if source is not None:
        label = f"{source}: {label}"
    calc = atoms.calc
    results = getattr(calc, "results", None) or {}
    if results and getattr(calc, "atoms", None) is not None:
        changed = [c for c in calc.check_state(atoms) if c in _GEOMETRY]
        if changed:
            raise ValueError(
                f"{label} ({atoms.get_chemical_formula()}): its labels are of other atoms "
                f"(its {', '.join(changed)} changed after its energy and forces were computed)"
            )
    energy = label_energy(results)
    forces = results.get("forces")
    missing = _missing_labels(energy is not None, forces is not None)
    if missing:
        raise ValueError(_unlabelled(f"{label} ({atoms.get_chemical_formula()})", missing))
    check_energy_is_a_number(energy, f"{label} ({atoms.get_chemical_formula()})")
    forces = np.asarray(forces, dtype=np.float64)
    if forces.shape != (len(atoms), 3):
        raise ValueError(f"{label}: forces of shape {forces.shape} for {len(atoms)} atoms")
    bad = [
        name
        for name, ok in (("energy", np.isfinite(energy)), ("forces", np.isfinite(forces).all()))
        if not ok
    ]
    if bad:
        raise ValueError(not_finite_message(f"{label} ({atoms.get_chemical_formula()})", bad))
    return float(energy), forces


def frame_origin(frames: Sequence, index: int) -> tuple[str | None, int]:
    """``(source, index within it)`` of frame ``index`` of ``frames``, through subsets
    (:class:`SubsetFrames`) down to the file it comes from (a :class:`ConcatFrames`' name);
    source ``None`` for a plain sequence."""
    while isinstance(frames, SubsetFrames):
        frames, index = frames.frames, int(frames.indices[index])
    if isinstance(frames, ConcatFrames):
        source, index = frames.locate(index)
        return frames.names[source], index
    return None, index


#: OC20's tags, which ``tag_weights`` weighs atoms by: 0 subsurface, 1 surface, 2 adsorbate.
OC20_TAGS = (0, 1, 2)


def checked_frame(frames: Sequence, index: int, oc20_tags: bool = False) -> Atoms:
    """Frame ``index`` of ``frames``, checked for what training needs: finite energy and
    forces of the right shape (:func:`frame_targets`), a structure a graph can be built of
    (:func:`~forcecalc.graph.batch.check_atoms`: atoms, finite positions and cell, known
    elements, periodic axes of non-zero length), and with ``oc20_tags`` tags among
    :data:`OC20_TAGS` (ASE's slab builders tag layers 1, 2, 3, ... and adsorbates 0).

    Raises:
        ValueError: the frame fails a check, or cannot be read; the message names its file
            and its index within that file (:func:`frame_origin`).
    """
    atoms = frames[index]  # a file's reader names the file and the frame it cannot parse
    source, local = frame_origin(frames, index)
    frame_targets(atoms, local, source)
    where = f"frame {local}" if source is None else f"{source}: frame {local}"
    try:
        check_atoms(atoms)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    other = sorted(set(atoms.get_tags().tolist()) - set(OC20_TAGS)) if oc20_tags else []
    if other:
        raise ValueError(
            f"{where} has tags {other}: tag_weights weighs atoms by OC20's tags 0 "
            "(subsurface), 1 (surface) and 2 (adsorbate) only (ASE's slab builders tag "
            "layers 1, 2, 3, ... from the top and adsorbates 0); set OC20's tags, or use "
            "fixed_atom_weight"
        )
    return atoms


@dataclass(frozen=True)
class TrainBatch:
    """A batch of labelled frames.

    Attributes:
        graph: the structures with their neighbor graph.
        energy: ``[n_systems]`` DFT energies (eV).
        forces: ``[n_atoms, 3]`` DFT forces (eV/Å).
        index: ``[n_systems]`` int64 position of each frame in its dataset.
    """

    graph: Batch
    energy: Tensor
    forces: Tensor
    index: Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype) -> TrainBatch:
        """A copy on ``device`` with the labels in ``dtype``; the graph's positions and cell
        stay float64, as every inference path gives them to the models (SpinConv's frame
        geometry is float64 whatever the model's dtype)."""
        return TrainBatch(
            graph=self.graph.to(device=device, dtype=torch.float64),
            energy=self.energy.to(device=device, dtype=dtype),
            forces=self.forces.to(device=device, dtype=dtype),
            index=self.index.to(device=device),
        )


class IndexedFrames(Sequence):
    """``frames[i]`` as ``(i, frames[i])`` so that the collated batch knows its frames; each
    frame is checked as it is read (:func:`checked_frame`, with ``oc20_tags``), so that a bad
    frame found only during training is named by its file and its index within that file."""

    def __init__(self, frames: Sequence, oc20_tags: bool = False) -> None:
        self.frames = frames
        self.oc20_tags = oc20_tags

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> tuple[int, Atoms]:  # type: ignore[override]
        return int(index), checked_frame(self.frames, int(index), self.oc20_tags)


class Collater:
    """``[(index, Atoms), ...] -> TrainBatch``, building the graph at ``cutoff`` (float64)."""

    def __init__(self, cutoff: float) -> None:
        self.cutoff = float(cutoff)

    def __call__(self, items: Sequence[tuple[int, object]]) -> TrainBatch:
        indices = [i for i, _ in items]
        frames = [a for _, a in items]
        targets = [frame_targets(a, i) for i, a in items]
        graph = Batch.from_atoms(frames, cutoff=self.cutoff, dtype=torch.float64)
        return TrainBatch(
            graph=graph,
            energy=torch.tensor([e for e, _ in targets], dtype=torch.float64),
            forces=torch.from_numpy(np.concatenate([f for _, f in targets])),
            index=torch.tensor(indices, dtype=torch.int64),
        )


def atom_weights(graph: Batch, fixed_weight: float, tag_weights: Sequence[float] | None) -> Tensor:
    """``[n_atoms]`` force-loss weights: ``tag_weights[tag]`` when given (OCP's
    ``tag_specific_weights``; tags :data:`OC20_TAGS`, which :class:`IndexedFrames` checks),
    else 1 for free atoms and ``fixed_weight`` for FixAtoms atoms."""
    if tag_weights is not None:
        table = torch.as_tensor(tag_weights, dtype=graph.positions.dtype, device=graph.tags.device)
        return table[graph.tags]
    ones = torch.ones_like(graph.positions[:, 0])
    return torch.where(graph.fixed, ones * fixed_weight, ones)


class BatchPlan:
    """Which frames each process takes at each step (a ``batch_sampler`` for ``DataLoader``).

    Epoch ``e`` shuffles the frames with a generator seeded from ``(seed, e)``, cuts the
    permutation into global batches of ``batch_size * world_size`` frames, and gives rank ``r``
    the ``r``-th slice of each.  The last, shorter global batch is split as evenly as possible;
    it is dropped when it has fewer frames than processes.  :meth:`set_epoch` with ``start``
    skips the first ``start`` batches (resuming inside an epoch).
    """

    def __init__(
        self,
        n_frames: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.n_frames = n_frames
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """Every global batch of ``epoch``, as frame indices, in order."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.n_frames, generator=generator).numpy()
        else:
            order = np.arange(self.n_frames)
        size = self.batch_size * self.world_size
        batches = [order[i : i + size] for i in range(0, self.n_frames, size)]
        if batches and len(batches[-1]) < self.world_size:
            batches.pop()
        return batches

    def local_slice(self, global_size: int) -> slice:
        """This rank's part of a global batch of ``global_size`` frames."""
        base, extra = divmod(global_size, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches(self.epoch)[self.start :]:
            yield batch[self.local_slice(len(batch))].tolist()

    def __len__(self) -> int:
        return len(self.global_batches(self.epoch)) - self.start


def shard(n_frames: int, rank: int, world_size: int) -> range:
    """Contiguous evaluation shard of ``rank`` (every frame in exactly one shard)."""
    base, extra = divmod(n_frames, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))
