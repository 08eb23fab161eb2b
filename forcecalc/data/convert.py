"""Converters between the HDF5 frames store, ASE databases (``.db``) and extended XYZ.

Each frame becomes one ASE ``Atoms`` (energy and unconstrained forces in a
``SinglePointCalculator``, FixAtoms, tags) with ``info`` keys ``kind``, ``step``, ``system``
and, for frames of a system, that system's table row as ``sys_<column>`` keys. The file's
attributes travel as JSON (ASE db metadata, or base64-encoded JSON in ``info["dataset_attrs"]``
of the first extxyz frame, as extxyz cannot quote nested JSON). String values that ASE would
read back as numbers or booleans (or refuse, in a db), such as ``"3"``, travel as ``"str:3"``.
Reading back groups the ``sys_*`` keys by ``system`` to rebuild the systems table, so
HDF5 -> db -> HDF5 is exact and HDF5 -> extxyz -> HDF5 is exact up to extxyz's 8 printed
decimals for positions and forces. Frames from other sources get defaults: no energy/forces
-> NaN, no tags -> 0, no ``system`` -> -1 (no systems table).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import ase.db
import ase.io
import numpy as np
from ase import Atoms

from forcecalc.data.store import DatasetWriter, FrameBatch, open_dataset

_FORMATS = {".h5": "h5", ".hdf5": "h5", ".db": "db", ".xyz": "extxyz", ".extxyz": "extxyz"}
_CHUNK = 1024
_SYS = "sys_"
_ESCAPE = "str:"


def file_format(path: str | os.PathLike[str]) -> str:
    """``"h5"``, ``"db"`` or ``"extxyz"`` from the file suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in _FORMATS:
        raise ValueError(f"unknown format of {path}: use one of {sorted(_FORMATS)}")
    return _FORMATS[suffix]


def _plain(value: Any) -> Any:
    """A numpy scalar as the plain Python value ASE db and extxyz accept."""
    return value.item() if isinstance(value, np.generic) else value


def _escape(value: str) -> str:
    """``value`` prefixed with ``str:`` if ASE would parse it as a number or boolean."""
    try:
        float(value)
    except ValueError:
        if value.lower() not in ("t", "f", "true", "false") and not value.startswith(_ESCAPE):
            return value
    return _ESCAPE + value


def _unescape(value: Any) -> Any:
    """Inverse of :func:`_escape` (non-strings pass through)."""
    if isinstance(value, str) and value.startswith(_ESCAPE):
        return value[len(_ESCAPE) :]
    return value


def _read_h5(path: Path, attrs: dict[str, Any]) -> Iterator[Atoms]:
    """Frames of an HDF5 file with their system rows in ``info``; fills ``attrs`` first."""
    ds = open_dataset(path)
    reserved = {"format", "format_version", "n_frames", "n_atoms", "n_systems"}
    attrs.update({k: _plain(v) for k, v in ds.attrs.items() if k not in reserved})
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


def _read_db(path: Path, attrs: dict[str, Any]) -> Iterator[Atoms]:
    """Frames of an ASE database (key-value pairs into ``info``); fills ``attrs`` first."""
    db = ase.db.connect(path)
    attrs.update(db.metadata)
    for row in db.select():
        atoms = row.toatoms()
        atoms.info.update(row.key_value_pairs)
        yield atoms


def _read_extxyz(path: Path, attrs: dict[str, Any]) -> Iterator[Atoms]:
    """Frames of an extxyz file; fills ``attrs`` before yielding the first frame."""
    for atoms in ase.io.iread(path, index=":", format="extxyz"):
        if "dataset_attrs" in atoms.info:
            attrs.update(json.loads(base64.b64decode(atoms.info.pop("dataset_attrs"))))
        yield atoms


def _write_h5(path: Path, images: Iterable[Atoms], attrs: dict[str, Any]) -> None:
    """Frames (with ``sys_*`` info) to an HDF5 file, rebuilding the systems table."""
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


def _write_db(path: Path, images: Iterable[Atoms], attrs: dict[str, Any]) -> None:
    with ase.db.connect(path, append=False) as db:
        for atoms in images:
            db.write(atoms, key_value_pairs={k: _plain(v) for k, v in atoms.info.items()})
    ase.db.connect(path).metadata = attrs


def _write_extxyz(path: Path, images: Iterable[Atoms], attrs: dict[str, Any]) -> None:
    with open(path, "w") as fh:
        for k, atoms in enumerate(images):
            if k == 0 and attrs:
                text = json.dumps(attrs, sort_keys=True).encode()
                atoms.info["dataset_attrs"] = base64.b64encode(text).decode()
            ase.io.write(fh, atoms, format="extxyz")


_READERS = {"h5": _read_h5, "db": _read_db, "extxyz": _read_extxyz}


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Convert ``src`` to ``dst`` between HDF5 (.h5/.hdf5), ASE db (.db) and extxyz
    (.xyz/.extxyz); formats come from the suffixes. ``dst`` is written atomically (temporary
    file in the same folder, renamed on success). Returns ``dst``."""
    src, dst = Path(src), Path(dst)
    fin, fout = file_format(src), file_format(dst)
    attrs: dict[str, Any] = {}
    images = _READERS[fin](src, attrs)
    if fout == "h5":
        _write_h5(dst, images, attrs)
        return dst
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp{dst.suffix}")
    tmp.unlink(missing_ok=True)
    try:
        (_write_db if fout == "db" else _write_extxyz)(tmp, images, attrs)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst
