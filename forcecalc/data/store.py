"""HDF5 store of labelled frames: an atomic writer and an O(1) random-access reader.

Layout of a file (all datasets chunked, gzip-compressed with the shuffle filter)::

    /frames/positions  [N, 3] float64   Å, all frames' atoms concatenated
    /frames/forces     [N, 3] float32   eV/Å, unconstrained (forces on fixed atoms kept)
    /frames/numbers    [N]    uint8     atomic numbers
    /frames/tags       [N]    int32     OC20 tags (0 subsurface, 1 surface, 2 adsorbate)
    /frames/fixed      [N]    bool      FixAtoms mask
    /frames/offsets    [F+1]  int64     frame f owns atoms offsets[f]:offsets[f+1]
    /frames/energy     [F]    float64   eV (NaN: unknown)
    /frames/cell       [F, 3, 3] float64  lattice vectors as rows, Å
    /frames/pbc        [F, 3] bool
    /frames/system     [F]    int64     row of the frame's system in /systems (-1: none)
    /frames/step       [F]    int64     step in the trajectory the frame comes from
    /frames/kind       [F]    uint8     frame kind (the generator's names in attrs["frame_kinds"])
    /frames/stress     [F, 6] float64   optional: eV/Å³, Voigt xx yy zz yz xz xy (NaN: unknown)
    /systems/<column>  [S]    one column per system property (numbers, bools or strings)

Root attributes: ``format``, ``format_version``, ``n_frames``, ``n_atoms``, ``n_systems`` and
whatever metadata the writer was given (the generator stores its version, seed and config as
JSON). Strings, numbers and booleans are stored as HDF5 attributes; other values (lists, dicts,
None, arrays) as JSON text, their names listed in the root attribute ``json_attrs`` (a JSON
list), and the reader gives them back decoded. Optional frame fields (``stress``) exist only in
files where some frame has them; a reader of a file without one sees no such field. Files are
written to a temporary file in the same folder and renamed into place on success, so a path is
either absent, the previous complete file, or the new complete file. The writer refuses frames
with NaN or infinite positions or cells, or an atomic number of no element (outside 0-118).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import h5py
import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from ase.data import chemical_symbols
from ase.stress import full_3x3_to_voigt_6_stress

from forcecalc.atomic import commit_file
from forcecalc.warning import warn


def label_energy(results: Mapping[str, Any]) -> Any:
    """The energy label of a frame's results (a calculator's, an extxyz comment line's, an
    ASE db row's): ``energy``, else a ``free_energy`` given alone; None without either.  The
    one rule the store, training and evaluation read labels by."""
    return results.get("energy", results.get("free_energy"))


def check_energy_is_a_number(energy: object, where: str) -> None:
    """A ``ValueError`` naming the frame (``where``) when its energy label (``label_energy``:
    not None) is not a real number: text that ASE's extended XYZ reader keeps as a string
    (``energy=abc``), or a flag."""
    if isinstance(energy, (bool, np.bool_)) or not isinstance(energy, (int, float, np.number)):
        raise ValueError(f"{where}: the energy {energy!r} is not a number")


def non_finite(values: Any) -> bool:
    """Whether ``values`` (numbers, or their text: ``b"nan"``) hold a number that is not
    finite (NaN or inf).  Text that is no number is left to the frame's reader, whose error
    names the file and the frame."""
    try:
        numbers = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return not np.isfinite(numbers).all()


def not_finite_message(where: str, names: Sequence[str]) -> str:
    """The error message for a frame (``where``) whose labels ``names`` are not finite."""
    return f"{where}: {' and '.join(names)} not finite (NaN or inf)"


FORMAT = "forcecalc.frames"
FORMAT_VERSION = 1
#: Root attribute listing (as JSON) the attributes stored as JSON text.
JSON_ATTRS = "json_attrs"
#: Root attributes the writer sets itself (refused as metadata).
RESERVED_ATTRS = frozenset(
    {"format", "format_version", "n_frames", "n_atoms", "n_systems", JSON_ATTRS}
)
#: Calculator results the store keeps (``free_energy`` is kept as the energy when it is given
#: alone or equals ``energy``).
STORED_RESULTS = frozenset({"energy", "forces", "stress"})
#: Per-atom arrays of ``Atoms.arrays`` the store keeps (forces come from the calculator).
STORED_ARRAYS = frozenset({"numbers", "positions", "tags"})
_ATOM_CHUNK = 1024
_FRAME_CHUNK = 4096
_COMPRESSION = {"compression": "gzip", "compression_opts": 4, "shuffle": True}


def unstored(atoms: Atoms, kept_info: Callable[[str], bool] | None = None) -> list[str]:
    """What of ``atoms`` the store has no place for: calculator results other than energy,
    forces and stress (``free_energy`` alone or equal to ``energy`` counts as kept), ``info``
    keys (except those ``kept_info`` accepts, which the caller stores itself), per-atom arrays
    other than numbers, positions and tags, and constraints other than FixAtoms; as names
    such as ``info['config_type']`` or ``constraint FixBondLength``."""
    results = atoms.calc.results if atoms.calc is not None else {}
    names = [f"info[{k!r}]" for k in atoms.info if kept_info is None or not kept_info(k)]
    names += [f"per-atom array {k!r}" for k in atoms.arrays if k not in STORED_ARRAYS]
    names += [
        f"constraint {type(c).__name__}" for c in atoms.constraints if not isinstance(c, FixAtoms)
    ]
    for key, value in results.items():
        same = key == "free_energy" and value == results.get("energy", value)
        if key not in STORED_RESULTS and not same:
            names.append(f"calculator result {key!r}")
    return names


def unstored_message(names: Iterable[str], action: str) -> str:
    """The warning about what the store has no place for: ``names`` (each once, sorted) and
    what did not happen to them (``action``: "stored", "converted")."""
    return f"the HDF5 store has no place for {', '.join(sorted(set(names)))}; not {action}"


@dataclass
class FrameBatch:
    """Frames to append, flattened: per-atom arrays concatenated over frames.

    Attributes:
        positions: ``[N, 3]`` Å.
        numbers: ``[N]`` atomic numbers.
        forces: ``[N, 3]`` eV/Å (NaN where unknown).
        tags: ``[N]`` OC20 tags.
        fixed: ``[N]`` bool FixAtoms mask.
        natoms: ``[F]`` atoms per frame (sums to N).
        energy: ``[F]`` eV (NaN where unknown).
        cell: ``[F, 3, 3]`` lattice vectors as rows (Å).
        pbc: ``[F, 3]`` bool.
        system: ``[F]`` row in the systems table (-1: none).
        step: ``[F]`` trajectory step.
        kind: ``[F]`` frame kind code.
        stress: ``[F, 6]`` eV/Å³ in Voigt order (NaN rows where unknown), or None when no
            frame has a stress.
    """

    positions: np.ndarray
    numbers: np.ndarray
    forces: np.ndarray
    tags: np.ndarray
    fixed: np.ndarray
    natoms: np.ndarray
    energy: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    system: np.ndarray
    step: np.ndarray
    kind: np.ndarray
    stress: np.ndarray | None = None

    @classmethod
    def from_atoms(
        cls,
        images: Sequence[Atoms],
        system: Sequence[int] | None = None,
        step: Sequence[int] | None = None,
        kind: Sequence[int] | None = None,
        kept_info: Callable[[str], bool] | None = None,
        dropped: set[str] | None = None,
    ) -> FrameBatch:
        """Frames from ASE atoms (energy/forces/stress from their calculator, NaN if absent;
        ``stress`` None if no frame has one).

        Forces are taken unconstrained (``apply_constraint=False``); ``fixed`` comes from
        ``FixAtoms`` constraints. ``system``, ``step`` and ``kind`` default to -1, 0, 0 (they
        are not read from ``info``). What the store has no place for (see :func:`unstored`:
        ``info``, other calculator results, per-atom arrays such as momenta, constraints
        other than FixAtoms) is named in one warning per call, each kind once however many
        frames carry it.

        Args:
            images: the frames.
            system: ``[F]`` row of each frame's system (-1: none).
            step: ``[F]`` trajectory step of each frame.
            kind: ``[F]`` frame kind code of each frame.
            kept_info: ``info`` keys the caller stores itself (no warning for them).
            dropped: a set to add the names of what is not stored to, instead of warning
                (for a caller that warns once over several batches).
        """
        names = {name for atoms in images for name in unstored(atoms, kept_info)}
        if dropped is not None:
            dropped.update(names)
        elif names:
            warn(unstored_message(names, "stored"))
        f = len(images)
        natoms = np.array([len(a) for a in images], dtype=np.int64)
        energy = np.full(f, np.nan)
        stress = np.full((f, 6), np.nan)
        forces = []
        fixed = []
        for k, atoms in enumerate(images):
            results = atoms.calc.results if atoms.calc is not None else {}
            value = label_energy(results)
            if value is not None:
                energy[k] = float(value)
            if "stress" in results:
                stress[k] = _voigt(results["stress"])
            forces.append(results.get("forces", np.full((len(atoms), 3), np.nan)))
            mask = np.zeros(len(atoms), dtype=bool)
            for c in atoms.constraints:
                if isinstance(c, FixAtoms):
                    mask[c.index] = True
            fixed.append(mask)

        def cat(arrays: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
            return np.concatenate(arrays) if arrays else np.zeros(shape)

        return cls(
            positions=cat([a.positions for a in images], (0, 3)),
            numbers=cat([a.numbers for a in images], (0,)),
            forces=cat([np.asarray(x, dtype=np.float64) for x in forces], (0, 3)),
            tags=cat([a.get_tags() for a in images], (0,)),
            fixed=cat(fixed, (0,)).astype(bool),
            natoms=natoms,
            energy=energy,
            cell=np.array([np.asarray(a.cell) for a in images]).reshape(f, 3, 3),
            pbc=np.array([a.pbc for a in images], dtype=bool).reshape(f, 3),
            system=np.asarray(system if system is not None else [-1] * f, dtype=np.int64),
            step=np.asarray(step if step is not None else [0] * f, dtype=np.int64),
            kind=np.asarray(kind if kind is not None else [0] * f, dtype=np.uint8),
            stress=None if np.isnan(stress).all() else stress,
        )


def _voigt(stress: Any) -> np.ndarray:
    """A stress as the 6 Voigt components (from 6 values or a 3x3 matrix)."""
    values = np.asarray(stress, dtype=np.float64)
    if values.shape == (3, 3):
        return full_3x3_to_voigt_6_stress(values)
    if values.shape != (6,):
        raise ValueError(f"stress of shape {values.shape}: expected (6,) or (3, 3)")
    return values


#: name -> (dtype, trailing shape, per-atom?)
_FRAME_FIELDS: dict[str, tuple[Any, tuple[int, ...], bool]] = {
    "positions": (np.float64, (3,), True),
    "forces": (np.float32, (3,), True),
    "numbers": (np.uint8, (), True),
    "tags": (np.int32, (), True),
    "fixed": (np.bool_, (), True),
    "energy": (np.float64, (), False),
    "cell": (np.float64, (3, 3), False),
    "pbc": (np.bool_, (3,), False),
    "system": (np.int64, (), False),
    "step": (np.int64, (), False),
    "kind": (np.uint8, (), False),
}
#: per-frame fields a file may lack (a reader gives no such field then), NaN where unknown
_OPTIONAL_FIELDS: dict[str, tuple[Any, tuple[int, ...]]] = {"stress": (np.float64, (6,))}


def _column_dtype(values: np.ndarray) -> Any:
    """HDF5 dtype of a systems column: strings as UTF-8, bools, int64 or float64."""
    if values.dtype.kind in "USO":
        return h5py.string_dtype("utf-8")
    if values.dtype.kind == "b":
        return np.bool_
    if values.dtype.kind in "iu":
        return np.int64
    return np.float64


def _json_value(value: Any) -> Any:
    """A numpy array or scalar inside an attribute as the list or number JSON can hold."""
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _formula(numbers: np.ndarray) -> str:
    """The chemical formula of atomic numbers ``numbers`` ``[n]`` (``Z<n>`` for a number
    without a symbol)."""
    if np.all((numbers >= 0) & (numbers < len(chemical_symbols))):
        return Atoms(numbers=numbers).get_chemical_formula()
    return "".join(f"Z{n}" for n in numbers)


def _check_storable(
    path: Path, first: int, arrays: Mapping[str, np.ndarray], natoms: np.ndarray
) -> None:
    """A ValueError naming the first frame with NaN or infinite positions or cell, or an
    atomic number that is no element's (outside 0-118: it would not survive the ``uint8``
    field).  Labels are not checked: the reader takes a non-finite label for a missing one.

    Args:
        path: the file, for the message.
        first: index in the file of the batch's first frame.
        arrays: the batch's fields: ``positions`` ``[N, 3]``, ``numbers`` ``[N]``, ``cell``
            ``[F, 3, 3]``.
        natoms: ``[F]`` atoms per frame.
    """
    frame_of_atom = np.repeat(np.arange(len(natoms)), natoms)

    def frames_with(atom_flags: np.ndarray) -> np.ndarray:
        flags = np.zeros(len(natoms), dtype=bool)
        flags[frame_of_atom[atom_flags]] = True
        return flags

    numbers = np.asarray(arrays["numbers"])
    unknown = (numbers < 0) | (numbers > len(chemical_symbols) - 1)
    problems = {
        "positions hold NaN or inf": frames_with(~np.isfinite(arrays["positions"]).all(axis=1)),
        "cell holds NaN or inf": ~np.isfinite(arrays["cell"]).all(axis=(1, 2)),
        "atomic numbers include one of no element": frames_with(unknown),
    }
    bad = np.flatnonzero(np.logical_or.reduce(list(problems.values())))
    if not len(bad):
        return
    k = int(bad[0])
    lo = int(natoms[:k].sum())
    what = "; ".join(name for name, flags in problems.items() if flags[k])
    more = f" (and {len(bad) - 1} more frames)" if len(bad) > 1 else ""
    if problems["atomic numbers include one of no element"][k]:
        wrong = sorted(set(numbers[lo : lo + natoms[k]][unknown[lo : lo + natoms[k]]].tolist()))
        what = what.replace("one of no element", f"one of no element ({wrong})")
    raise ValueError(
        f"cannot store frame {first + k} ({_formula(numbers[lo : lo + natoms[k]])}) in {path}: "
        f"its {what}{more}"
    )


class DatasetWriter:
    """Appends frames and systems to a new HDF5 file, renamed into place only on success.

    Use as a context manager (an exception inside the block discards the temporary file and
    leaves any previous file at ``path`` untouched), or call :meth:`close` / :meth:`abort`.

    Args:
        path: destination file.
        attrs: root attributes: str, int, float and bool values as HDF5 attributes, others
            (lists, dicts, None, arrays) as JSON text that the reader decodes; the names of
            :data:`RESERVED_ATTRS` are refused.
    """

    def __init__(
        self, path: str | os.PathLike[str], attrs: Mapping[str, Any] | None = None
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:12]}.tmp")
        self._json_keys: set[str] = set()
        self._h5: h5py.File | None = h5py.File(self._tmp, "w")
        try:
            self._create_layout(attrs or {})
        except BaseException:
            self.abort()
            raise
        self.n_frames = 0
        self.n_atoms = 0
        self.n_systems = 0
        self._columns: list[str] | None = None

    def _create_layout(self, attrs: Mapping[str, Any]) -> None:
        """Root attributes and the empty, resizable datasets."""
        h5 = self._file
        h5.attrs["format"] = FORMAT
        h5.attrs["format_version"] = FORMAT_VERSION
        for key, value in attrs.items():
            self.set_attr(key, value)
        frames = h5.create_group("frames")
        h5.create_group("systems")
        for name, (dtype, shape, per_atom) in _FRAME_FIELDS.items():
            chunk = _ATOM_CHUNK if per_atom else _FRAME_CHUNK
            frames.create_dataset(
                name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype,
                chunks=(chunk, *shape), **_COMPRESSION,
            )  # fmt: skip
        frames.create_dataset(
            "offsets", data=np.zeros(1, dtype=np.int64), maxshape=(None,),
            chunks=(_FRAME_CHUNK,), **_COMPRESSION,
        )  # fmt: skip

    def set_attr(self, key: str, value: Any) -> None:
        """Set a root attribute: a str, int, float or bool as itself, another value as JSON
        text (listed in ``json_attrs``; :class:`Dataset` decodes it).

        Raises:
            ValueError: ``key`` is reserved, or ``value`` has no JSON form.
        """
        if key in RESERVED_ATTRS:
            raise ValueError(f"attribute {key!r} is reserved for the store's own use")
        attrs = self._file.attrs
        if isinstance(value, str | bool | int | float | np.generic):
            attrs[key] = value
            self._json_keys.discard(key)
        else:
            try:
                attrs[key] = json.dumps(value, default=_json_value)
            except (TypeError, ValueError) as error:
                raise ValueError(f"attribute {key!r} has no JSON form: {error}") from error
            self._json_keys.add(key)
        if self._json_keys:
            attrs[JSON_ATTRS] = json.dumps(sorted(self._json_keys))
        elif JSON_ATTRS in attrs:
            del attrs[JSON_ATTRS]

    @property
    def _file(self) -> h5py.File:
        if self._h5 is None:
            raise ValueError(f"writer of {self.path} is closed")
        return self._h5

    def append(
        self, batch: FrameBatch, systems: Mapping[str, Sequence[Any] | np.ndarray] | None = None
    ) -> None:
        """Append frames and (optionally) system rows.

        Args:
            batch: the frames; their ``system`` values refer to rows of the whole file.
            systems: columns of new system rows, each ``[S_new]``; every call must give the
                same column names as the first one that gave any.

        Raises:
            ValueError: a field has the wrong shape, or a frame has NaN or infinite
                positions or cell or an atomic number of no element (naming the first such
                frame by its index in the file and its formula); nothing of the batch is
                written then.
        """
        arrays = {name: np.asarray(getattr(batch, name)) for name in _FRAME_FIELDS}
        natoms = np.asarray(batch.natoms).astype(np.int64)
        n_new_atoms = int(natoms.sum())
        n_new_frames = len(natoms)
        for name, (_, shape, per_atom) in _FRAME_FIELDS.items():
            expected = (n_new_atoms if per_atom else n_new_frames, *shape)
            if arrays[name].shape != expected:
                raise ValueError(f"{name}: shape {arrays[name].shape}, expected {expected}")
        optional = {name: getattr(batch, name) for name in _OPTIONAL_FIELDS}
        for name, (_, shape) in _OPTIONAL_FIELDS.items():
            values = optional[name]
            if values is not None and np.shape(values) != (n_new_frames, *shape):
                raise ValueError(
                    f"{name}: shape {np.shape(values)}, expected {(n_new_frames, *shape)}"
                )
        _check_storable(self.path, self.n_frames, arrays, natoms)
        columns = {k: np.asarray(v) for k, v in (systems or {}).items()}
        if columns:
            if self._columns is None:
                self._columns = sorted(columns)
            if sorted(columns) != self._columns:
                raise ValueError(f"system columns {sorted(columns)} != {self._columns}")
            lengths = {len(v) for v in columns.values()}
            if len(lengths) != 1 or any(v.ndim != 1 for v in columns.values()):
                raise ValueError("system columns must be 1-D and of equal length")
        frames = self._file["frames"]
        for name, (dtype, _, per_atom) in _FRAME_FIELDS.items():
            start = self.n_atoms if per_atom else self.n_frames
            ds = frames[name]
            ds.resize(start + len(arrays[name]), axis=0)
            ds[start:] = arrays[name].astype(dtype, copy=False)
        for name, (dtype, shape) in _OPTIONAL_FIELDS.items():
            if optional[name] is None and name not in frames:
                continue
            if name not in frames:  # the frames before this batch lack it: NaN
                frames.create_dataset(
                    name, shape=(self.n_frames, *shape), maxshape=(None, *shape), dtype=dtype,
                    chunks=(_FRAME_CHUNK, *shape), fillvalue=np.nan, **_COMPRESSION,
                )  # fmt: skip
            ds = frames[name]
            ds.resize(self.n_frames + n_new_frames, axis=0)
            ds[self.n_frames :] = np.nan if optional[name] is None else optional[name]
        offsets = frames["offsets"]
        offsets.resize(self.n_frames + n_new_frames + 1, axis=0)
        offsets[self.n_frames + 1 :] = self.n_atoms + np.cumsum(natoms)
        self.n_frames += n_new_frames
        self.n_atoms += n_new_atoms
        if columns:
            group = self._file["systems"]
            n_new = len(next(iter(columns.values())))
            for name, values in columns.items():
                if name not in group:
                    group.create_dataset(
                        name, shape=(0,), maxshape=(None,), dtype=_column_dtype(values),
                        chunks=(_FRAME_CHUNK,), **_COMPRESSION,
                    )  # fmt: skip
                ds = group[name]
                ds.resize(self.n_systems + n_new, axis=0)
                ds[self.n_systems :] = values.astype(object) if values.dtype.kind == "U" else values
            self.n_systems += n_new

    def close(self) -> Path:
        """Finish the file, make it durable and rename it to :attr:`path`; returns the path."""
        h5 = self._file
        h5.attrs["n_frames"] = self.n_frames
        h5.attrs["n_atoms"] = self.n_atoms
        h5.attrs["n_systems"] = self.n_systems
        h5.close()
        self._h5 = None
        try:
            commit_file(self._tmp, self.path)
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise
        return self.path

    def abort(self) -> None:
        """Discard the temporary file; :attr:`path` is left as it was."""
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_dataset(
    path: str | os.PathLike[str],
    batch: FrameBatch,
    systems: Mapping[str, Sequence[Any] | np.ndarray] | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write one batch of frames (and systems) to ``path`` atomically."""
    with DatasetWriter(path, attrs) as writer:
        writer.append(batch, systems)
    return writer.path


class Dataset(Sequence[Atoms]):
    """Read-only view of a frames file: a Sequence of ``ase.Atoms`` with O(1) random access.

    Items carry energy, forces and (where stored) stress in a ``SinglePointCalculator``
    (``get_forces()`` applies the FixAtoms constraint as usual;
    ``get_forces(apply_constraint=False)`` gives the stored forces), FixAtoms constraints,
    tags, and ``info`` keys ``frame``, ``system``, ``step``, ``kind``. Per-frame arrays and
    the systems table are read into memory at open; per-atom arrays are read on demand unless
    ``in_memory``. The reader reopens the file lazily in each process, so it can be pickled
    into data-loader workers. ``attrs`` holds the root attributes, those stored as JSON text
    decoded.

    Args:
        path: an HDF5 file written by :class:`DatasetWriter`.
        in_memory: read every per-atom array into memory at open (fastest random access).
    """

    def __init__(self, path: str | os.PathLike[str], in_memory: bool = False) -> None:
        self.path = Path(path)
        self._h5: h5py.File | None = None
        self._pid = -1
        self._dsets: dict[str, h5py.Dataset] = {}
        h5 = self._file
        self.attrs: dict[str, Any] = {
            k: (v.item() if isinstance(v, np.generic) else v) for k, v in h5.attrs.items()
        }
        for key in json.loads(self.attrs.pop(JSON_ATTRS, "[]")):
            self.attrs[key] = json.loads(self.attrs[key])
        frames = h5["frames"]
        self.offsets: np.ndarray = frames["offsets"][()]
        #: per-frame arrays: energy [F], cell [F, 3, 3], pbc [F, 3], system, step, kind [F],
        #: and stress [F, 6] if the file has it
        self.frames: dict[str, np.ndarray] = {
            name: frames[name][()] for name, (_, _, per_atom) in _FRAME_FIELDS.items()
            if not per_atom
        }  # fmt: skip
        self.frames.update({name: frames[name][()] for name in _OPTIONAL_FIELDS if name in frames})
        #: systems table: column name -> [S] array (strings decoded to ``str``)
        self.systems: dict[str, np.ndarray] = {}
        for name, ds in h5["systems"].items():
            values = ds[()]
            if h5py.check_string_dtype(ds.dtype) is not None:
                values = np.array([v.decode() for v in values], dtype=object)
            self.systems[name] = values
        self._atom_arrays: dict[str, np.ndarray] = (
            {n: frames[n][()] for n, (_, _, per_atom) in _FRAME_FIELDS.items() if per_atom}
            if in_memory
            else {}
        )

    def _open(self) -> h5py.File:
        """The file, opened in this process on first use, with the per-atom dataset handles
        (h5py's name lookups cost ~0.2 ms each, more than reading a frame)."""
        if self._h5 is None or self._pid != os.getpid():
            h5 = h5py.File(self.path, "r", rdcc_nbytes=16 * 1024**2)
            if h5.attrs.get("format") != FORMAT:
                h5.close()
                raise ValueError(f"{self.path} is not a {FORMAT} file")
            self._h5 = h5
            self._pid = os.getpid()
            frames = h5["frames"]
            self._dsets = {
                n: frames[n] for n, (_, _, per_atom) in _FRAME_FIELDS.items() if per_atom
            }
        return self._h5

    @property
    def _file(self) -> h5py.File:
        return self._open()

    def _dataset(self, name: str) -> h5py.Dataset:
        """Handle of per-atom dataset ``name``, valid in this process."""
        self._open()
        return self._dsets[name]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_h5"] = None
        state["_pid"] = -1
        state["_dsets"] = {}
        return state

    def close(self) -> None:
        """Close the HDF5 handle (reopened on the next read)."""
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = None
        self._dsets = {}

    def __enter__(self) -> Dataset:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def natoms(self) -> np.ndarray:
        """``[F]`` atoms per frame."""
        return np.diff(self.offsets)

    @property
    def n_systems(self) -> int:
        return int(self.attrs.get("n_systems", 0))

    def missing_labels(self, atom_block: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
        """``([F], [F])`` bool: the frames whose stored energy, and those whose stored forces
        (any component), are missing (NaN) or not finite: the frames the reader gives no
        energy and forces.  Read from the file's arrays, ``atom_block`` atoms of forces at a
        time, without building the frames."""
        energy = ~np.isfinite(np.asarray(self.frames["energy"], dtype=np.float64))
        forces = np.zeros(len(self), dtype=bool)
        offsets = np.asarray(self.offsets, dtype=np.int64)
        for start in range(0, int(offsets[-1]), atom_block):
            block = self.atom_array("forces", start, start + atom_block)
            atoms = start + np.flatnonzero(~np.isfinite(block).all(axis=1))
            forces[np.searchsorted(offsets, atoms, side="right") - 1] = True
        return energy, forces

    def atom_array(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of per-atom array ``name`` (positions, forces, numbers, tags,
        fixed), for the whole file by default."""
        if name in self._atom_arrays:
            return self._atom_arrays[name][start:stop]
        return self._dataset(name)[start:stop]

    def arrays(self, index: int) -> dict[str, np.ndarray]:
        """Raw arrays of frame ``index``, for fast batching.

        Returns:
            ``positions`` [n, 3] float64, ``forces`` [n, 3] float32, ``numbers`` [n] uint8,
            ``tags`` [n] int32, ``fixed`` [n] bool, ``energy`` [] float64, ``cell`` [3, 3],
            ``pbc`` [3], ``system``, ``step``, ``kind`` (0-d arrays), and ``stress`` [6] if
            the file has it.
        """
        i = self._index(index)
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        out = {
            name: self.atom_array(name, lo, hi)
            for name, (_, _, per_atom) in _FRAME_FIELDS.items()
            if per_atom
        }
        out.update({name: values[i] for name, values in self.frames.items()})
        return out

    def _index(self, index: int) -> int:
        n = len(self)
        i = int(index) + n if index < 0 else int(index)
        if not 0 <= i < n:
            raise IndexError(f"frame {index} out of range for {n} frames")
        return i

    def _atoms(self, index: int) -> Atoms:
        a = self.arrays(index)
        atoms = Atoms(
            numbers=a["numbers"].astype(np.int64),
            positions=a["positions"],
            cell=a["cell"],
            pbc=a["pbc"],
            tags=a["tags"].astype(np.int64),
        )
        if a["fixed"].any():
            atoms.set_constraint(FixAtoms(mask=a["fixed"]))
        results: dict[str, Any] = {}
        if np.isfinite(a["energy"]):
            results["energy"] = float(a["energy"])
        forces = a["forces"].astype(np.float64)
        if np.isfinite(forces).all():
            results["forces"] = forces
        if "stress" in a and np.isfinite(a["stress"]).all():
            results["stress"] = a["stress"].copy()
        if results:
            atoms.calc = SinglePointCalculator(atoms, **results)
        atoms.info.update(
            frame=self._index(index),
            system=int(a["system"]),
            step=int(a["step"]),
            kind=int(a["kind"]),
        )
        return atoms

    @overload
    def __getitem__(self, index: int) -> Atoms: ...

    @overload
    def __getitem__(self, index: slice) -> list[Atoms]: ...

    def __getitem__(self, index: int | slice) -> Atoms | list[Atoms]:
        if isinstance(index, slice):
            return [self._atoms(i) for i in range(*index.indices(len(self)))]
        return self._atoms(index)

    def __iter__(self) -> Iterator[Atoms]:
        for i in range(len(self)):
            yield self._atoms(i)

    def initial(self, system: int) -> Atoms:
        """Initial structure of ``system`` (row of the systems table), for IS2RS / IS2RE."""
        return self._atoms(int(self.systems["initial_frame"][system]))

    def relaxed(self, system: int) -> Atoms:
        """Relaxed structure of ``system`` (its energy is the IS2RE target)."""
        return self._atoms(int(self.systems["relaxed_frame"][system]))


def open_dataset(path: str | os.PathLike[str], in_memory: bool = False) -> Dataset:
    """Open a frames file written by :class:`DatasetWriter` (see :class:`Dataset`); a file
    that is not one is a ``ValueError`` naming it."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no frames file at {path}")
    try:
        return Dataset(path, in_memory=in_memory)
    except (OSError, KeyError) as error:
        raise ValueError(
            f"{path} is not a forcecalc frames file (HDF5 with a 'frames' group): {error}; "
            f"a file ASE reads converts with: forcecalc data convert {path} "
            f"{Path(path).with_suffix('.h5').name}"
        ) from None
