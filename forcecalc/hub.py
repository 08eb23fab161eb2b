"""Checkpoint names: the files shipped in ``weights/`` and OCP's published checkpoints.

A checkpoint argument is resolved in this order:

1. an existing file path: used as is;
2. a shipped name, with or without ``.pt`` (``"spinconv-fc"``): the file installed with the
   package (``forcecalc.weights``), checked against the SHA-256 in its ``manifest.json``;
3. an OCP name (``"SpinConv-S2EF-OC20-All"``) or its file name
   (``"spinconv_force_centric_all.pt"``): downloaded once into the cache directory
   (``$FORCECALC_CACHE``, default ``$XDG_CACHE_HOME/forcecalc`` or ``~/.cache/forcecalc``) with
   a progress bar, checked against its SHA-256 where known (also when found in the cache), and
   renamed into place only when complete. A cached file that is no PyTorch checkpoint (a
   truncated file, an error page saved in its place) is an error that says to delete it.

A folder is no checkpoint: a path to one is an error that says to pass a file inside it. A
known name (2, 3) that is also a folder in the current directory (``forcenet`` beside a
training run's ``forcenet/``) still means the known checkpoint, with a warning, since only an
existing *file* comes before the names.

A file's SHA-256 is computed once per process for a given path, size and modification time.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import http.client
import json
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from forcecalc.atomic import commit_file, try_lock
from forcecalc.checkpoint import CheckpointError, is_torch_file
from forcecalc.warning import warn

#: The file in the shipped weights folder with each shipped file's SHA-256.
MANIFEST = "manifest.json"

#: What to do about a shipped file that is missing from the manifest or does not match it.
_REINSTALL = "reinstall forcecalc (pip install --force-reinstall forcecalc)"

#: (resolved path, size, mtime in ns) -> SHA-256 of the files hashed in this process.
_DIGESTS: dict[tuple[str, int, int], str] = {}

#: The most bytes a remote checkpoint may have unless its entry says otherwise: OCP's
#: SpinConv checkpoints hold about 34 MB of weights (their hyperparameters), a few times that
#: with the optimizer state and moving average OCP's trainer saves, so this bound only stops a
#: broken server that sends data without end.
MAX_CHECKPOINT_BYTES = 2 << 30

#: Seconds without a write after which the temp file of a download whose writer holds no lock
#: on it (the writer is gone) is stale.
STALE_PART_SECONDS = 3600

#: Seconds without a write after which a download's temp file is stale where file locks do not
#: work (no ``fcntl``, or a file system without locks).
STALE_UNLOCKED_PART_SECONDS = 86400

#: Bytes read from the server at a time.
_CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteCheckpoint:
    """A checkpoint that can be downloaded."""

    name: str
    url: str
    description: str
    sha256: str | None = None
    #: a bound on its size: a download announcing or sending more is refused
    max_bytes: int = MAX_CHECKPOINT_BYTES

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


#: The only pretrained checkpoints of these models OCP ever published (both SpinConv,
#: force-centric). Their SHA-256 sums are not published.
REMOTE_CHECKPOINTS: dict[str, RemoteCheckpoint] = {
    c.name: c
    for c in (
        RemoteCheckpoint(
            "SpinConv-S2EF-OC20-All",
            "https://dl.fbaipublicfiles.com/opencatalystproject/models/2021_08/s2ef/"
            "spinconv_force_centric_all.pt",
            "OCP SpinConv force-centric trained on OC20 S2EF-All (val-ID force MAE 0.0267 eV/Å)",
        ),
        RemoteCheckpoint(
            "SpinConv-S2EF-OC20-2M",
            "https://dl.fbaipublicfiles.com/opencatalystproject/models/2021_12/s2ef/"
            "spinconv_force_centric_2M.pt",
            "OCP SpinConv force-centric trained on OC20 S2EF-2M (val-ID force MAE 0.0329 eV/Å)",
        ),
    )
}


def cache_dir() -> Path:
    """Where downloaded checkpoints are kept."""
    if os.environ.get("FORCECALC_CACHE"):
        return Path(os.environ["FORCECALC_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "forcecalc"


def weights_dir() -> Path:
    """The folder of the checkpoints installed with the package (``forcecalc.weights``)."""
    return Path(str(resources.files("forcecalc.weights")))


def shipped_checkpoints() -> dict[str, Path]:
    """Name (without ``.pt``) -> path of each checkpoint installed with the package."""
    return {
        entry.name[: -len(".pt")]: entry
        for entry in weights_dir().iterdir()
        if entry.name.endswith(".pt")
    }


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of ``path``, computed once per process for its path, size and mtime."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with path.open("rb") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def _shipped_sha256(path: Path) -> str:
    """The SHA-256 that the weights folder's manifest gives for shipped file ``path``."""
    manifest = path.parent / MANIFEST
    try:
        entries = json.loads(manifest.read_text())
        by_file = {entry["file"]: entry["sha256"] for entry in entries.values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(
            f"the manifest {manifest} of the shipped checkpoints cannot be read ({error}), so "
            f"{path.name} cannot be verified; {_REINSTALL}"
        ) from None
    if path.name not in by_file:
        raise CheckpointError(
            f"shipped checkpoint {path} has no SHA-256 in {manifest}, so it cannot be verified; "
            f"{_REINSTALL}"
        )
    return str(by_file[path.name])


def _verify(path: Path, expected: str, remedy: str) -> Path:
    """``path`` if its SHA-256 is ``expected``, else a :class:`CheckpointError` saying so."""
    actual = file_sha256(path)
    if actual != expected.lower():
        raise CheckpointError(
            f"checkpoint {path} is damaged or was modified: its SHA-256 is {actual}, expected "
            f"{expected.lower()}; {remedy}"
        )
    return path


def _remote(name: str) -> RemoteCheckpoint | None:
    for checkpoint in REMOTE_CHECKPOINTS.values():
        if name in (checkpoint.name, checkpoint.filename, checkpoint.filename[: -len(".pt")]):
            return checkpoint
    return None


def resolve_checkpoint(source: str | os.PathLike, progress: bool = True) -> Path:
    """The local file for a checkpoint path or name (downloading it if it is remote).

    A known name that is also a folder in the current directory resolves to the known
    checkpoint, with a warning that the folder is not used (see the module's docstring).

    Raises:
        FileNotFoundError: neither a file, a shipped name nor a known remote name.
        IsADirectoryError: a folder (that is not also a known name).
        CheckpointError: a shipped or cached file whose SHA-256 is not the expected one, a
            cached file that is no PyTorch checkpoint, or a download that failed.
    """
    shipped = shipped_checkpoints()
    known = sorted(shipped) + sorted(REMOTE_CHECKPOINTS)
    if not str(source).strip():  # Path("") is the current folder
        raise FileNotFoundError(
            f"the checkpoint is an empty name: give a file or a known name ({', '.join(known)})"
        )
    path = Path(source).expanduser()
    if path.is_file():
        if path.resolve() in {file.resolve() for file in shipped.values()}:  # by its path
            return _verify(path, _shipped_sha256(path.resolve()), _REINSTALL)
        return path
    name = str(source)
    stem = name[: -len(".pt")] if name.endswith(".pt") else name
    remote = _remote(name)
    if path.is_dir():
        _check_folder(name, path, stem in shipped or remote is not None)
    if stem in shipped:
        path = shipped[stem]
        return _verify(
            path,
            _shipped_sha256(path),
            f"{_REINSTALL}, or restore weights/{path.name} from its repository",
        )
    if remote is not None:
        target = cache_dir() / remote.filename
        if not target.is_file():
            return _readable_cached(_download_remote(remote, target, progress), remote)
        _remove_stale_parts(target)
        return _checked_cached(target, remote)
    raise FileNotFoundError(
        f"no checkpoint file or known name {name!r}{_suggestion(stem, known)} (known names: "
        f"{', '.join(known)})"
    )


def _suggestion(name: str, known: list[str]) -> str:
    """``"; did you mean 'x'?"`` for the known name closest to ``name`` (case, ``_`` for
    ``-`` and small typos forgiven), or ``""`` if none is close."""
    by_key = {k.lower().replace("_", "-"): k for k in known}
    close = difflib.get_close_matches(name.lower().replace("_", "-"), list(by_key), n=1)
    return f"; did you mean {by_key[close[0]]!r}?" if close else ""


def _check_folder(name: str, path: Path, known: bool) -> None:
    """An :class:`IsADirectoryError` for folder ``path`` given as ``name``; a warning that the
    folder is not used if ``name`` is also a ``known`` checkpoint name."""
    shown = name.rstrip(os.sep + (os.altsep or "")) or name
    if not known:
        raise IsADirectoryError(
            f"{shown} is a folder (pass the checkpoint file inside it, e.g. {shown}/best.pt or "
            f"{shown}/final.pt)"
        )
    warn(
        f"{name!r} is a known checkpoint name, which comes before the folder {path.resolve()} "
        f"(to use a checkpoint in that folder, pass its file, e.g. {shown}/best.pt)"
    )


def _checked_cached(path: Path, remote: RemoteCheckpoint) -> Path:
    """``path``, the cached file of ``remote``, if it can be used: its SHA-256 where known,
    else its layout (:func:`_readable_cached`); a :class:`CheckpointError` saying to delete
    it otherwise."""
    if remote.sha256 is None:
        return _readable_cached(path, remote)
    return _verify(
        path, remote.sha256, f"delete it, and {remote.name} is downloaded again when next used"
    )


def _readable_cached(path: Path, remote: RemoteCheckpoint) -> Path:
    """``path``, the cached file of ``remote``, if it has the layout of a PyTorch checkpoint;
    else a :class:`CheckpointError` naming it and saying to delete it."""
    if is_torch_file(path):
        return path
    with path.open("rb") as stream:
        head = stream.read(40)
    raise CheckpointError(
        f"cached checkpoint {path} is not a PyTorch checkpoint (a truncated download, or a "
        f"web page saved in its place: it begins with {head!r}); delete it, and "
        f"{remote.name} is downloaded again from {remote.url} when next used"
    )


def _download_remote(remote: RemoteCheckpoint, target: Path, progress: bool) -> Path:
    """:func:`download` of ``remote``, its failures as a :class:`CheckpointError`."""
    try:
        return download(
            remote.url,
            target,
            sha256=remote.sha256,
            progress=progress,
            max_bytes=remote.max_bytes,
        )
    except (OSError, http.client.HTTPException, ValueError) as error:
        # the server not reached (not an HTTP status, a size or checksum it got wrong)
        unreachable = type(error) is urllib.error.URLError or isinstance(
            error, TimeoutError | ConnectionError
        )
        reason = error.reason if type(error) is urllib.error.URLError else error
        advice = "check the network connection, or " if unreachable else ""
        raise CheckpointError(
            f"the download of {remote.name} from {remote.url} failed ({reason}); {advice}"
            f"download the file elsewhere and copy it to {target} (where the name "
            f"{remote.name} finds it) or give its local path instead"
        ) from error


def _content_length(response: http.client.HTTPResponse, url: str) -> int | None:
    """The size the server announces for ``response`` (its ``Content-Length``), if any."""
    value = response.headers.get("Content-Length")
    if value is None or not value.strip():
        return None
    if not value.strip().isdigit():
        raise OSError(f"download of {url} has an invalid Content-Length {value!r}")
    return int(value)


def _is_stale(part: Path, now: float) -> bool:
    """Whether the download temp file ``part`` is a dead download's: not written for
    :data:`STALE_PART_SECONDS` and not locked by its writer, or not written for
    :data:`STALE_UNLOCKED_PART_SECONDS` where its lock cannot be tested."""
    try:
        idle = now - part.stat().st_mtime
    except OSError:
        return False
    if idle < STALE_PART_SECONDS:
        return False
    try:
        with part.open("r+b") as stream:  # the lock goes with the file's closing
            locked = try_lock(stream.fileno())
    except OSError:  # not ours to open
        locked = None
    if locked is None:  # the writer's lock cannot be tested
        return idle > STALE_UNLOCKED_PART_SECONDS
    return locked  # taken: no writer holds it


def _remove_stale_parts(target: Path) -> None:
    """Remove the temp files (``.NAME.XXXXXXXX.part``) that killed downloads of ``target``
    left beside it. Each download holds a lock on its temp file while it writes it: a temp
    file that is locked, or was written in the last hour (see :func:`_is_stale`), is left
    alone, so that a download of the same file under way in another process (on this machine
    or, where the file system has locks, another) goes on."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.part")
    now = time.time()
    try:
        entries = [entry for entry in os.scandir(target.parent) if pattern.fullmatch(entry.name)]
    except OSError:
        return
    for entry in entries:
        part = Path(entry.path)
        if _is_stale(part, now):
            with contextlib.suppress(OSError):  # gone already, or not ours to remove
                part.unlink()


def download(
    url: str,
    target: Path,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60,
    max_bytes: int | None = None,
) -> Path:
    """Download the PyTorch checkpoint at ``url`` to ``target`` atomically, checking its SHA-256
    when given.

    The data goes to a temp file beside ``target``, renamed into place only when complete
    and verified; an interrupted or corrupt download leaves nothing at ``target``. The temp
    files that killed downloads of ``target`` left are removed first (see
    :func:`_remove_stale_parts`).

    Args:
        url: what to download.
        target: where to put it.
        sha256: its expected SHA-256 (hex), if known.
        progress: show a progress bar.
        timeout: seconds to wait for the server, at each read.
        max_bytes: a bound on its size: a larger ``Content-Length`` is refused before
            anything is read, and a download without one stops past it.

    Raises:
        OSError: the download failed, sent more (or fewer) bytes than its ``Content-Length``
            announced (it stops at the first byte too many), more than ``max_bytes``, data
            whose SHA-256 is not ``sha256``, or data that is no PyTorch checkpoint (e.g. a
            proxy's error page sent with status 200).
    """
    from tqdm.auto import tqdm

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_parts(target)
    handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    # held while it writes: tells other processes the writer is alive (_remove_stale_parts)
    try_lock(handle)
    digest = hashlib.sha256()
    try:
        with (
            urllib.request.urlopen(url, timeout=timeout) as response,
            os.fdopen(handle, "wb") as stream,
        ):
            total = _content_length(response, url)
            if total is not None and max_bytes is not None and total > max_bytes:
                raise OSError(
                    f"download of {url} announces {total} bytes, more than the {max_bytes} "
                    "it may have"
                )
            limit = max_bytes if total is None else total
            bound = "its Content-Length announced" if total is not None else "it may have"
            received = 0
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=target.name, disable=not progress
            ) as bar:
                while chunk := response.read(
                    _CHUNK if limit is None else min(_CHUNK, limit - received + 1)
                ):
                    received += len(chunk)
                    if limit is not None and received > limit:
                        raise OSError(f"download of {url} sent more than the {limit} bytes {bound}")
                    stream.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            if total is not None and received != total:
                raise OSError(f"download of {url} stopped at {received} of {total} bytes")
        if sha256 is not None and digest.hexdigest() != sha256.lower():
            raise OSError(f"download of {url} has SHA-256 {digest.hexdigest()}, expected {sha256}")
        if not is_torch_file(Path(tmp)):  # e.g. a proxy's error page sent with status 200
            with open(tmp, "rb") as stream:
                start = stream.read(40)
            raise OSError(f"download of {url} is no PyTorch checkpoint (it starts with {start!r})")
        commit_file(Path(tmp), target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def list_models(show: bool = True) -> dict[str, str]:
    """Names usable as checkpoints: the shipped ones and those that can be downloaded.

    Returns:
        name -> where it comes from (``shipped``; ``cached``; ``download``: not yet in the
        cache; ``corrupt``: a cached file that every use refuses, as a checkpoint's use
        checks it, to be deleted); printed as a table when ``show``.
    """
    models = {name: f"shipped: {path}" for name, path in sorted(shipped_checkpoints().items())}
    for name, remote in REMOTE_CHECKPOINTS.items():
        models[name] = f"{_cache_state(remote)}: {remote.description}"
    if show:
        width = max(len(name) for name in models)
        for name, where in models.items():
            print(f"{name:<{width}}  {where}")
    return models


def _cache_state(remote: RemoteCheckpoint) -> str:
    """Where ``remote`` stands in the cache: ``download`` (not there), ``cached`` (usable) or
    ``corrupt (...)`` (refused by :func:`resolve_checkpoint`'s check, with what to do)."""
    target = cache_dir() / remote.filename
    if not target.is_file():
        return "download"
    try:
        _checked_cached(target, remote)
    except CheckpointError:
        return f"corrupt (the cached {target} is no usable checkpoint: delete it)"
    return "cached"
