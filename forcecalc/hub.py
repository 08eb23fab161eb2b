"""Checkpoint names: the files shipped in ``weights/`` and OCP's published checkpoints.

A checkpoint argument is resolved in this order:

1. an existing file path: used as is;
2. a shipped name, with or without ``.pt`` (``"spinconv-fc"``): the file installed with the
   package (``forcecalc.weights``), checked against the SHA-256 in its ``manifest.json``;
3. an OCP name (``"SpinConv-S2EF-OC20-All"``) or its file name
   (``"spinconv_force_centric_all.pt"``): downloaded once into the cache directory
   (``$FORCECALC_CACHE``, default ``$XDG_CACHE_HOME/forcecalc`` or ``~/.cache/forcecalc``) with
   a progress bar, checked against its SHA-256 where known (also when found in the cache), and
   renamed into place only when complete.

A file's SHA-256 is computed once per process for a given path, size and modification time.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from forcecalc.atomic import commit_file
from forcecalc.checkpoint import CheckpointError

#: The file in the shipped weights folder with each shipped file's SHA-256.
MANIFEST = "manifest.json"

#: What to do about a shipped file that is missing from the manifest or does not match it.
_REINSTALL = "reinstall forcecalc (pip install --force-reinstall forcecalc)"

#: (resolved path, size, mtime in ns) -> SHA-256 of the files hashed in this process.
_DIGESTS: dict[tuple[str, int, int], str] = {}


@dataclass(frozen=True)
class RemoteCheckpoint:
    """A checkpoint that can be downloaded."""

    name: str
    url: str
    description: str
    sha256: str | None = None

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

    Raises:
        FileNotFoundError: neither a file, a shipped name nor a known remote name.
        CheckpointError: a shipped or cached file whose SHA-256 is not the expected one, or a
            download that failed.
    """
    path = Path(source).expanduser()
    shipped = shipped_checkpoints()
    if path.is_file():
        if path.resolve() in {file.resolve() for file in shipped.values()}:  # by its path
            return _verify(path, _shipped_sha256(path.resolve()), _REINSTALL)
        return path
    name = str(source)
    stem = name[: -len(".pt")] if name.endswith(".pt") else name
    if stem in shipped:
        path = shipped[stem]
        return _verify(
            path,
            _shipped_sha256(path),
            f"{_REINSTALL}, or restore weights/{path.name} from its repository",
        )
    remote = _remote(name)
    if remote is not None:
        target = cache_dir() / remote.filename
        if not target.is_file():
            return _download_remote(remote, target, progress)
        if remote.sha256 is None:
            return target
        return _verify(
            target,
            remote.sha256,
            f"delete it, and {remote.name} is downloaded again when next used",
        )
    known = sorted(shipped) + sorted(REMOTE_CHECKPOINTS)
    raise FileNotFoundError(
        f"no checkpoint file or known name {name!r} (known names: {', '.join(known)})"
    )


def _download_remote(remote: RemoteCheckpoint, target: Path, progress: bool) -> Path:
    """:func:`download` of ``remote``, its failures as a :class:`CheckpointError`."""
    try:
        return download(remote.url, target, sha256=remote.sha256, progress=progress)
    except (OSError, http.client.HTTPException, ValueError) as error:
        reason = error.reason if type(error) is urllib.error.URLError else error
        raise CheckpointError(
            f"the download of {remote.name} from {remote.url} failed ({reason}); check the "
            "network connection, or download the file elsewhere and give its local path instead"
        ) from error


def download(
    url: str, target: Path, sha256: str | None = None, progress: bool = True, timeout: float = 60
) -> Path:
    """Download ``url`` to ``target`` atomically, checking its SHA-256 when given.

    The data goes to a temp file beside ``target``, renamed into place only when complete
    and verified; an interrupted or corrupt download leaves nothing at ``target``.
    """
    from tqdm.auto import tqdm

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    digest = hashlib.sha256()
    try:
        with (
            urllib.request.urlopen(url, timeout=timeout) as response,
            os.fdopen(handle, "wb") as stream,
        ):
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=target.name, disable=not progress
            ) as bar:
                while chunk := response.read(1 << 20):
                    stream.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            if total is not None and stream.tell() != total:
                raise OSError(f"download of {url} stopped at {stream.tell()} of {total} bytes")
        if sha256 is not None and digest.hexdigest() != sha256.lower():
            raise OSError(f"download of {url} has SHA-256 {digest.hexdigest()}, expected {sha256}")
        commit_file(Path(tmp), target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def list_models(show: bool = True) -> dict[str, str]:
    """Names usable as checkpoints: the shipped ones and those that can be downloaded.

    Returns:
        name -> where it comes from; printed as a table when ``show``.
    """
    models = {name: f"shipped: {path}" for name, path in sorted(shipped_checkpoints().items())}
    for name, remote in REMOTE_CHECKPOINTS.items():
        cached = (cache_dir() / remote.filename).is_file()
        models[name] = f"{'cached' if cached else 'download'}: {remote.description}"
    if show:
        width = max(len(name) for name in models)
        for name, where in models.items():
            print(f"{name:<{width}}  {where}")
    return models
