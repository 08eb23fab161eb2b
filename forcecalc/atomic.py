"""Output files: atomic writes (the data goes to a temp file beside the target, renamed into
place) and the checks of an output path made before any work (writable, a format ASE writes).

A write interrupted at any moment (an exception, a kill) leaves the previous file intact and
no partial file under the target's name.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from numbers import Integral, Real
from pathlib import Path
from typing import Any


@contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path in ``path``'s folder; on success it is renamed to ``path``.

    The temp file is named ``.{name}.XXXX{suffix}`` (so a crashed writer's leftovers can be
    found); on failure it is removed and the exception propagates. The file gets the usual
    permissions (``0o666`` less the umask), not ``mkstemp``'s private ``0o600``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        yield Path(tmp)
        commit_file(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def commit_file(tmp: Path, path: Path) -> None:
    """Make the finished file ``tmp`` durable and rename it to ``path`` (same folder): its
    data is flushed to disk, it gets the usual permissions (``0o666`` less the umask), and
    the folder is flushed after the rename (where it can be opened), so that a crash then
    leaves either the old file or the whole new one.  The one way every writer of the package
    puts a file in place."""
    with open(tmp, "rb") as stream:
        os.fsync(stream.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
    try:  # best effort: the file is in place; a folder we may write but not read stays unsynced
        folder = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(folder)
    except OSError:
        pass
    finally:
        os.close(folder)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, data: Any, indent: int = 1) -> Path:
    """Write ``data`` as JSON (RFC 8259) to ``path`` atomically: a number that is not finite
    (NaN, inf), which JSON has no token for, is written as ``null``, never as Python's
    ``NaN``/``Infinity`` that strict readers (``jq``, JavaScript) refuse."""
    text = json.dumps(_finite_or_null(data), indent=indent, default=str, allow_nan=False)
    return write_text(path, text + "\n")


def _finite_or_null(value: Any) -> Any:
    """``value`` with every number that is not finite, in its dicts, lists and tuples too,
    replaced by None (JSON's null)."""
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(item) for item in value]
    if isinstance(value, Real) and not isinstance(value, Integral) and not math.isfinite(value):
        return None
    return value


def torch_save(data: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically."""
    import torch

    with atomic_output(path) as tmp, open(tmp, "wb") as stream:
        torch.save(data, stream)
    return Path(path)


#: Output formats that keep every structure's energy, forces and ``info`` (the relaxation's
#: steps and convergence, ``input_index`` for ``merge``).
COMPLETE_FORMATS = ("extxyz", "traj")


def existing_ancestor(path: Path) -> Path:
    """The nearest folder above ``path`` that exists (or a file there: a path under a file)."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    return ancestor


def check_writable(path: str) -> None:
    """A ValueError, before any work is done, if ``path`` cannot be written: a folder, under
    a file, or without permission, or a place where no file can be made (tried with an empty
    temp file; missing folders are made when it is written)."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"cannot write {path}: it is a folder")
    ancestor = existing_ancestor(target)
    if not ancestor.is_dir():
        raise ValueError(f"cannot write {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise ValueError(f"cannot write {path}: no permission to write there")
    try:  # os.access says yes as root and on special file systems (/proc): make a file there
        handle, probe = tempfile.mkstemp(prefix=".forcecalc-probe-", dir=ancestor)
    except OSError as error:
        raise ValueError(f"cannot write {path}: {error.strerror or error}") from None
    os.close(handle)
    os.unlink(probe)


def output_format(path: str, n_frames: int, complete: bool = False) -> str:
    """ASE's format for writing ``n_frames`` structures to ``path`` (extxyz for .xyz and for a
    name without suffix that ASE does not know, such as ``relaxed``; a name ASE knows, such as
    ``CONTCAR``, gets its format: vasp), or a ValueError naming what ASE cannot do, before any
    work is done.  ``complete``: only a format of :data:`COMPLETE_FORMATS`; otherwise another
    one gets a note on stderr that energies, forces and info may be lost."""
    from ase.io.formats import UnknownFileTypeError, filetype, ioformats

    check_writable(path)
    suffix = Path(path).suffix
    if suffix in (".xyz", ".extxyz"):
        return "extxyz"
    try:
        name = filetype(path, read=False)
    except UnknownFileTypeError as error:
        if not suffix:
            return "extxyz"
        raise ValueError(f"cannot tell which format to write {path} in: {error}") from error
    io = ioformats.get(name)
    if io is None or not io.can_write:
        what = f"the suffix {suffix!r}" if suffix else f"the name {Path(path).name!r} ({name})"
        raise ValueError(
            f"cannot write {path}: ASE writes no format for {what} (use .extxyz or .traj)"
        )
    if io.single and n_frames != 1:
        raise ValueError(
            f"cannot write {path}: the {name} format holds one structure, but {n_frames} "
            "would be written (use .extxyz or .traj)"
        )
    if name not in COMPLETE_FORMATS:
        if complete:
            raise ValueError(
                f"cannot write {path}: `merge` needs each structure's info['input_index'], "
                f"which the {name} format does not keep (use .extxyz or .traj)"
            )
        print(
            f"forcecalc: note: {path} ({name}) may not keep the energies, forces and info "
            "of the structures; .extxyz and .traj keep them",
            file=sys.stderr,
        )
    return name


def try_lock(handle: int) -> bool | None:
    """Take an exclusive lock (``flock``) on the open file or folder ``handle`` without
    waiting; it is held until ``handle`` is closed or the process ends, however it ends.

    Returns:
        True: taken; False: another process holds it; None: locks do not work here (not
        POSIX, or a file system without ``flock``).
    """
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True
