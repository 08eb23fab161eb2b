"""Atomic file writes: the data goes to a temp file beside the target, renamed into place.

A write interrupted at any moment (an exception, a kill) leaves the previous file intact and
no partial file under the target's name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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
    """Write ``data`` as JSON to ``path`` atomically."""
    return write_text(path, json.dumps(data, indent=indent, default=str) + "\n")


def torch_save(data: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically."""
    import torch

    with atomic_output(path) as tmp, open(tmp, "wb") as stream:
        torch.save(data, stream)
    return Path(path)
