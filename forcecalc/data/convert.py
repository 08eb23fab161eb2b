"""Converters between the HDF5 frames store, ASE databases (``.db``) and extended XYZ, from
those or any other file ASE reads (``.traj``, ``POSCAR``, ``.cif``...).

Each frame becomes one ASE ``Atoms`` (energy, unconstrained forces and, where known, stress in a
``SinglePointCalculator``, FixAtoms, tags) with ``info`` keys ``kind``, ``step``, ``system``
and, for frames of a system, that system's table row as ``sys_<column>`` keys. The file's
attributes travel as JSON (ASE db metadata, or base64-encoded JSON without ``=`` padding in
``info["dataset_attrs"]`` of the first extxyz frame, as extxyz cannot quote nested JSON and
ASE's extxyz parser merges an unquoted value ending in ``=`` with the next key). String
values that ASE would read back as numbers or booleans (or refuse, in a db), such as ``"3"``,
travel as ``"str:3"``.
Reading back groups the ``sys_*`` keys by ``system`` to rebuild the systems table, so
HDF5 -> db -> HDF5 is exact and HDF5 -> extxyz -> HDF5 is exact up to extxyz's 8 printed
decimals for positions and forces. Frames from other sources get defaults: no energy/forces
-> NaN, no tags -> 0, no ``system`` -> -1 (no systems table); converting to HDF5 warns about
calculator results, ``info`` keys, per-atom arrays, constraints and ASE db row data (``data=``
of ``db.write``) the store has no place for (they are not converted); row data is not copied
to other outputs either, with a warning. Attributes that are not strings, numbers or
booleans (an ASE db's ``default_columns`` and ``key_descriptions``) are stored as JSON text in
HDF5 and come back as they were.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import ase.db
import ase.io
import numpy as np
from ase import Atoms
from ase.calculators.calculator import all_properties
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io.extxyz import key_val_dict_to_str, key_val_str_to_dict
from ase.io.formats import UnknownFileTypeError, filetype, ioformats
from ase.stress import full_3x3_to_voigt_6_stress

from forcecalc.atomic import atomic_output, check_writable
from forcecalc.data.store import (
    RESERVED_ATTRS,
    DatasetWriter,
    FrameBatch,
    check_energy_is_a_number,
    label_energy,
    non_finite,
    not_finite_message,
    open_dataset,
    unstored_message,
)
from forcecalc.warning import warn

_FORMATS = {".h5": "h5", ".hdf5": "h5", ".db": "db", ".xyz": "extxyz", ".extxyz": "extxyz"}
_CHUNK = 1024
_SYS = "sys_"
_ESCAPE = "str:"
_ATTRS = "dataset_attrs"
#: ``info`` keys the HDF5 store keeps (besides ``sys_*``)
_STORED_INFO = {"system", "step", "kind"}
#: A reader: fills the attributes (dict) before its first frame and adds the names of what it
#: could not pass on (ASE db row data) to the set.
_Reader = Callable[[Path, dict[str, Any], set[str]], Iterator[Atoms]]


def file_format(path: str | os.PathLike[str]) -> str:
    """``"h5"``, ``"db"`` or ``"extxyz"`` from the file suffix (the formats ``convert``
    writes, and reads without ASE's format detection)."""
    suffix = Path(path).suffix.lower()
    if suffix not in _FORMATS:
        raise ValueError(f"unknown format of {path}: use one of {sorted(_FORMATS)}")
    return _FORMATS[suffix]


def _plain(value: Any) -> Any:
    """A numpy scalar as the plain Python value ASE db and extxyz accept."""
    return value.item() if isinstance(value, np.generic) else value


def _escape(value: str) -> str:
    """``value`` prefixed with ``str:`` if ASE would parse it as a number or boolean, or if it
    is empty (extxyz would merge the next key into an empty value)."""
    try:
        float(value)
    except ValueError:
        plain = value.lower() not in ("", "t", "f", "true", "false")
        if plain and not value.startswith(_ESCAPE):
            return value
    return _ESCAPE + value


def _unescape(value: Any) -> Any:
    """Inverse of :func:`_escape` (non-strings pass through)."""
    if isinstance(value, str) and value.startswith(_ESCAPE):
        return value[len(_ESCAPE) :]
    return value


def _read_h5(path: Path, attrs: dict[str, Any], dropped: set[str]) -> Iterator[Atoms]:
    """Frames of an HDF5 file with their system rows in ``info``; fills ``attrs`` first
    (the file holds nothing for ``dropped``)."""
    ds = open_dataset(path)
    attrs.update({k: _plain(v) for k, v in ds.attrs.items() if k not in RESERVED_ATTRS})
    with ds:
        for atoms in ds:
            system = atoms.info.pop("system")
            atoms.info.pop("frame")
            atoms.info["system"] = system
            if system >= 0:
                for name, values in ds.systems.items():
                    value = _plain(values[system])
                    atoms.info[_SYS + name] = _escape(value) if isinstance(value, str) else value
            yield atoms


def _read_db(path: Path, attrs: dict[str, Any], dropped: set[str]) -> Iterator[Atoms]:
    """Frames of an ASE database (key-value pairs into ``info``); fills ``attrs`` first and
    adds the keys of rows' data (``row.data``, not converted) to ``dropped``."""
    db = ase.db.connect(path)
    attrs.update(db.metadata)
    for row in db.select():
        atoms = row.toatoms()
        atoms.info.update(row.key_value_pairs)
        dropped.update(f"ASE db row data {key!r}" for key in row.data)
        yield atoms


def _encode_attrs(attrs: dict[str, Any]) -> str:
    """``attrs`` as base64 JSON without ``=`` padding (one token on an extxyz comment line)."""
    return base64.b64encode(json.dumps(attrs, sort_keys=True).encode()).decode().rstrip("=")


def _decode_attrs(atoms: Atoms) -> dict[str, Any]:
    """Pop and decode ``info["dataset_attrs"]`` of ``atoms``.

    Older versions wrote the base64 padding, which made ASE's parser merge the next
    ``key=value`` of the comment line into the value (``...J9==energy=-1.5``); that pair is
    split off and restored to the calculator results, ``pbc`` or ``info``.
    """
    value = str(atoms.info.pop(_ATTRS))
    text, _, merged = value.partition("=")  # "=" is only base64 padding
    merged = merged.lstrip("=")
    try:
        attrs = json.loads(base64.b64decode(text + "=" * (-len(text) % 4), validate=True))
    except ValueError as err:
        raise ValueError(f"info[{_ATTRS!r}] is not base64-encoded JSON: {value!r}") from err
    if merged:
        key, _, raw = merged.partition("=")
        parsed = key_val_str_to_dict(f'{key}="{raw}"')[key]
        if key == "pbc":
            atoms.pbc = parsed
        elif key in all_properties:
            if atoms.calc is None:
                atoms.calc = SinglePointCalculator(atoms)
            is_matrix = key == "stress" and np.shape(parsed) == (3, 3)
            atoms.calc.results[key] = full_3x3_to_voigt_6_stress(parsed) if is_matrix else parsed
        else:
            atoms.info[key] = parsed
    return attrs


def _read_extxyz(path: Path, attrs: dict[str, Any], dropped: set[str]) -> Iterator[Atoms]:
    """Frames of an extxyz file; fills ``attrs`` before yielding the first frame (the file
    holds nothing for ``dropped``)."""
    for atoms in ase.io.iread(path, index=":", format="extxyz"):
        if _ATTRS in atoms.info:
            attrs.update(_decode_attrs(atoms))
        yield atoms


def _read_ase(path: Path, attrs: dict[str, Any], dropped: set[str], fmt: str) -> Iterator[Atoms]:
    """Frames of a file in ASE's format ``fmt`` (no attributes; nothing for ``dropped``)."""
    yield from ase.io.iread(str(path), index=":", format=fmt)


def _converted_info(key: str) -> bool:
    """Whether :func:`_write_h5` keeps ``info[key]`` (``system``, ``step``, ``kind`` and the
    ``sys_*`` system columns)."""
    return key in _STORED_INFO or key.startswith(_SYS)


def _write_h5(
    path: Path, images: Iterable[Atoms], attrs: dict[str, Any], dropped: set[str]
) -> None:
    """Frames (with ``sys_*`` info) to an HDF5 file, rebuilding the systems table; warns once
    about what the store has no place for, with the names already in ``dropped`` (what the
    reader could not pass on)."""
    rows: dict[int, dict[str, Any]] = {}
    with DatasetWriter(path) as writer:
        chunk: list[Atoms] = []

        def flush() -> None:
            info = [a.info for a in chunk]
            writer.append(
                FrameBatch.from_atoms(
                    chunk,
                    system=[int(i.get("system", -1)) for i in info],
                    step=[int(i.get("step", 0)) for i in info],
                    kind=[int(i.get("kind", 0)) for i in info],
                    kept_info=_converted_info,
                    dropped=dropped,
                )
            )
            for i in info:
                if int(i.get("system", -1)) >= 0:
                    row = {k[len(_SYS) :]: _unescape(v) for k, v in i.items() if k.startswith(_SYS)}
                    rows.setdefault(int(i["system"]), row)
            chunk.clear()

        for atoms in images:
            chunk.append(atoms)
            if len(chunk) == _CHUNK:
                flush()
        if chunk:
            flush()
        for key, value in attrs.items():
            writer.set_attr(key, value)
        if rows:
            if sorted(rows) != list(range(len(rows))):
                raise ValueError("the frames' system indices are not 0..S-1")
            columns = sorted({k for row in rows.values() for k in row})
            table = {c: [rows[s][c] for s in range(len(rows))] for c in columns}
            writer.append(FrameBatch.from_atoms([]), table)
    if dropped:
        warn(f"{path}: {unstored_message(dropped, 'converted')}")


def _write_db(path: Path, images: Iterable[Atoms], attrs: dict[str, Any]) -> None:
    with ase.db.connect(path, append=False) as db:
        for atoms in images:
            db.write(atoms, key_value_pairs={k: _plain(v) for k, v in atoms.info.items()})
    ase.db.connect(path).metadata = attrs


@functools.lru_cache(maxsize=4096)
def _extxyz_safe(value: str) -> bool:
    """Whether ASE writes and parses back ``value`` as the same ``info`` string, without
    touching the next key (not so for values ending in ``=``, with backslashes or newlines)."""
    try:
        parsed = key_val_str_to_dict(key_val_dict_to_str({"s": value, "next": 0}))
    except ValueError:
        return False
    return isinstance(parsed.get("s"), str) and parsed["s"] == value and parsed.get("next") == 0


def _write_extxyz(path: Path, images: Iterable[Atoms], attrs: dict[str, Any]) -> None:
    """Frames to an extxyz file; refuses ``info`` strings that would not read back as written."""
    with open(path, "w") as fh:
        for k, atoms in enumerate(images):
            for key, value in atoms.info.items():
                if isinstance(value, str) and not _extxyz_safe(value):
                    raise ValueError(
                        f"frame {k}: extxyz cannot hold info[{key!r}] = {value!r} (ASE would "
                        "read it back differently); convert to .h5 or .db instead"
                    )
            if k == 0 and attrs:
                atoms.info[_ATTRS] = _encode_attrs(attrs)
            ase.io.write(fh, atoms, format="extxyz")


_READERS: dict[str, _Reader] = {"h5": _read_h5, "db": _read_db, "extxyz": _read_extxyz}


def _reader(src: Path) -> _Reader:
    """The reader of ``src``: ours for .h5/.hdf5, .db, .xyz/.extxyz, else ASE's for the format
    ASE detects (a ValueError naming ``src`` where ASE knows no format, or cannot read it)."""
    suffix = src.suffix.lower()
    if suffix in _FORMATS:
        return _READERS[_FORMATS[suffix]]
    unknown = f"cannot read {src}: not .h5, .db or extxyz, and ASE does not recognise its format"
    try:
        name = filetype(str(src), read=True)
    except (UnknownFileTypeError, OSError, ValueError) as error:
        raise ValueError(f"{unknown} ({type(error).__name__}: {error})") from error
    io = ioformats.get(name)
    if io is None:
        raise ValueError(unknown)
    if not io.can_read:
        raise ValueError(f"cannot read {src}: ASE recognises it as {name}, which it cannot read")
    return functools.partial(_read_ase, fmt=name)


def _check_labels(atoms: Atoms, where: str) -> None:
    """A ``ValueError`` naming the frame (``where``) whose energy label is no number, or
    whose energy or forces are not finite (HDF5 keeps NaN for a missing label: such a label
    was dropped without a word)."""
    results = atoms.calc.results if atoms.calc is not None else {}
    energy = label_energy(results)
    if energy is not None:
        check_energy_is_a_number(energy, where)
    bad = [
        name
        for name, value in (("energy", energy), ("forces", results.get("forces")))
        if value is not None and non_finite(value)
    ]
    if bad:
        raise ValueError(not_finite_message(where, bad))


def _readable(images: Iterable[Atoms], src: Path, dst: Path) -> Iterator[Atoms]:
    """``images``, with a reader's failure (a file that is not what its suffix says, a
    truncated frame) or labels that are no finite numbers (:func:`_check_labels`) as a
    ValueError naming ``src`` (and the frame), and a warning where ``src`` has no frames
    (``dst`` is then empty)."""
    frames = iter(images)
    count = 0
    while True:
        try:
            atoms = next(frames)
        except StopIteration:
            break
        except (  # the parsers'
            OSError,
            ValueError,
            KeyError,
            IndexError,
            RuntimeError,
            UnknownFileTypeError,
            sqlite3.Error,
        ) as error:
            raise ValueError(f"cannot read {src}: {type(error).__name__}: {error}") from error
        _check_labels(atoms, f"{src}: frame {count}")
        count += 1
        yield atoms
    if not count:
        warn(f"{src} holds no frames: {dst} is empty")


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Convert ``src`` to ``dst``: HDF5 (.h5/.hdf5), ASE db (.db) or extxyz (.xyz/.extxyz),
    from one of those or any other file ASE reads (its format as ASE detects it); the output
    format comes from ``dst``'s suffix. ``dst`` is checked before ``src`` is read, and written
    atomically (temporary file in the same folder, renamed on success). Returns ``dst``.

    Raises:
        ValueError: ``dst`` has another suffix or cannot be written (a folder, no
            permission), ``src`` cannot be read in its format, or a frame cannot be stored
            (HDF5: non-finite positions or cell); nothing is written then. A ``src`` without
            frames gives an empty ``dst`` and a warning.
        FileNotFoundError: ``src`` does not exist."""

    src, dst = Path(src), Path(dst)
    fout = file_format(dst)
    if not src.is_file():  # ase.db.connect would create an empty database
        raise FileNotFoundError(f"no such file: {src}")
    check_writable(str(dst))
    attrs: dict[str, Any] = {}
    dropped: set[str] = set()
    images = _readable(_reader(src)(src, attrs, dropped), src, dst)
    if fout == "h5":
        _write_h5(dst, images, attrs, dropped)
        return dst
    with atomic_output(dst, suffix=f".tmp{dst.suffix}") as tmp:
        (_write_db if fout == "db" else _write_extxyz)(tmp, images, attrs)
    if dropped:
        warn(f"{dst}: not converted: {', '.join(sorted(dropped))}")
    return dst
