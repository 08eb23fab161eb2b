"""Checkpoint names: the files shipped in ``weights/`` and OCP's published checkpoints.

A checkpoint argument is resolved in this order:

1. an existing file path: used as is;
2. a shipped name, with or without ``.pt`` (``"spinconv-fc"``): the file installed with the
   package (``forcecalc.weights``);
3. an OCP name (``"SpinConv-S2EF-OC20-All"``) or its file name
   (``"spinconv_force_centric_all.pt"``): downloaded once into the cache directory
   (``$FORCECALC_CACHE``, default ``$XDG_CACHE_HOME/forcecalc`` or ``~/.cache/forcecalc``) with
   a progress bar, checked against its SHA-256 where known, and renamed into place only when
   complete.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path


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


def shipped_checkpoints() -> dict[str, Path]:
    """Name (without ``.pt``) -> path of each checkpoint installed with the package."""
    folder = resources.files("forcecalc.weights")
    return {
        entry.name[: -len(".pt")]: Path(str(entry))
        for entry in folder.iterdir()
        if entry.name.endswith(".pt")
    }


def _remote(name: str) -> RemoteCheckpoint | None:
    for checkpoint in REMOTE_CHECKPOINTS.values():
        if name in (checkpoint.name, checkpoint.filename, checkpoint.filename[: -len(".pt")]):
            return checkpoint
    return None


def resolve_checkpoint(source: str | os.PathLike, progress: bool = True) -> Path:
    """The local file for a checkpoint path or name (downloading it if it is remote).

    Raises:
        FileNotFoundError: neither a file, a shipped name nor a known remote name.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return path
    name = str(source)
    shipped = shipped_checkpoints()
    stem = name[: -len(".pt")] if name.endswith(".pt") else name
    if stem in shipped:
        return shipped[stem]
    remote = _remote(name)
    if remote is not None:
        target = cache_dir() / remote.filename
        if target.is_file():
            return target
        return download(remote.url, target, sha256=remote.sha256, progress=progress)
    known = sorted(shipped) + sorted(REMOTE_CHECKPOINTS)
    raise FileNotFoundError(
        f"no checkpoint file or known name {name!r} (known names: {', '.join(known)})"
    )


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
        os.replace(tmp, target)
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
