"""Checkpoint names and downloads (against a local HTTP server: no outside network)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import threading
import urllib.error
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from ocp_fixtures import OCP_DATA

from forcecalc import hub
from forcecalc.checkpoint import CheckpointError


@pytest.fixture
def server():
    """Serve tests/data/ocp on 127.0.0.1 (a random free port)."""
    handler = functools.partial(_QuietHandler, directory=str(OCP_DATA))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    serve = functools.partial(httpd.serve_forever, poll_interval=0.02)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_download_is_complete_and_checked(server, tmp_path: Path) -> None:
    """A download lands byte-identical at the target, with its SHA-256 verified."""
    source = OCP_DATA / "forcenet_small.pt"
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    target = hub.download(
        f"{server}/forcenet_small.pt", tmp_path / "x.pt", sha256=sha, progress=False
    )
    assert target.read_bytes() == source.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_bad_checksum_leaves_nothing(server, tmp_path: Path) -> None:
    """A download whose SHA-256 differs raises and leaves no file (not even a partial one)."""
    with pytest.raises(OSError, match="SHA-256"):
        hub.download(
            f"{server}/forcenet_small.pt", tmp_path / "x.pt", sha256="0" * 64, progress=False
        )
    assert list(tmp_path.iterdir()) == []


def test_missing_url_leaves_nothing(server, tmp_path: Path) -> None:
    """An HTTP error raises and leaves no file behind."""
    with pytest.raises(OSError):
        hub.download(f"{server}/nope.pt", tmp_path / "x.pt", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_remote_name_downloads_once_into_cache(server, tmp_path: Path, monkeypatch) -> None:
    """An OCP name resolves to the cache ($FORCECALC_CACHE): downloaded once, then reused."""
    monkeypatch.setenv("FORCECALC_CACHE", str(tmp_path))
    remote = hub.RemoteCheckpoint("Test-Model", f"{server}/forcenet_small.pt", "test")
    monkeypatch.setitem(hub.REMOTE_CHECKPOINTS, remote.name, remote)
    path = hub.resolve_checkpoint("Test-Model", progress=False)
    assert path == tmp_path / "forcenet_small.pt"
    assert path.read_bytes() == (OCP_DATA / "forcenet_small.pt").read_bytes()
    path.write_bytes(b"cached")
    assert hub.resolve_checkpoint("forcenet_small.pt", progress=False).read_bytes() == b"cached"


def test_existing_path_is_used_as_is() -> None:
    """A path to an existing file resolves to itself."""
    path = OCP_DATA / "forcenet_small.pt"
    assert hub.resolve_checkpoint(path) == path


def test_unknown_name_lists_known_ones() -> None:
    """An unknown name raises FileNotFoundError that lists the names that exist."""
    with pytest.raises(FileNotFoundError, match="SpinConv-S2EF-OC20-All"):
        hub.resolve_checkpoint("no-such-model")


def test_list_models_names_remote_checkpoints(capsys) -> None:
    """list_models() prints and returns the downloadable OCP checkpoints."""
    models = hub.list_models()
    assert "SpinConv-S2EF-OC20-All" in models and "SpinConv-S2EF-OC20-2M" in models
    assert "SpinConv-S2EF-OC20-All" in capsys.readouterr().out


@pytest.fixture
def weights_copy(tmp_path: Path, monkeypatch) -> Path:
    """A copy of the shipped weights folder (forcenet.pt and manifest.json) that the hub
    resolves shipped names in."""
    folder = tmp_path / "weights"
    folder.mkdir()
    for name in ("forcenet.pt", hub.MANIFEST):
        shutil.copyfile(hub.weights_dir() / name, folder / name)
    monkeypatch.setattr(hub, "weights_dir", lambda: folder)
    return folder


def test_shipped_names_are_verified_against_the_manifest() -> None:
    """Each shipped name resolves to its file in the weights folder, its SHA-256 checked."""
    manifest = json.loads((hub.weights_dir() / hub.MANIFEST).read_text())
    for name, entry in manifest.items():
        path = hub.resolve_checkpoint(name)
        assert path == hub.weights_dir() / entry["file"]
        assert hub.file_sha256(path) == entry["sha256"]


def test_corrupted_shipped_file_is_refused(weights_copy: Path) -> None:
    """A shipped file with 1000 bytes zeroed in the middle raises CheckpointError naming the
    file, the expected and the actual SHA-256, and saying to reinstall, whether it is loaded
    by name or by its path."""
    path = weights_copy / "forcenet.pt"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 1000] = bytes(1000)
    path.write_bytes(bytes(data))
    expected = json.loads((weights_copy / hub.MANIFEST).read_text())["forcenet"]["sha256"]
    actual = hashlib.sha256(bytes(data)).hexdigest()
    for name in ("forcenet", "forcenet.pt", str(path)):  # by name, and by its own path
        with pytest.raises(CheckpointError) as error:
            hub.resolve_checkpoint(name)
        message = str(error.value)
        assert str(path) in message and expected in message and actual in message
        assert "reinstall forcecalc" in message


def test_shipped_file_is_hashed_once_per_version(weights_copy: Path, monkeypatch) -> None:
    """Resolving a shipped name again hashes nothing; a file rewritten since (a new
    modification time) is hashed again."""
    calls = []
    sha256 = hashlib.sha256

    def counting_sha256(*args):
        calls.append(args)
        return sha256(*args)

    monkeypatch.setattr(hub.hashlib, "sha256", counting_sha256)
    path = hub.resolve_checkpoint("forcenet")
    hub.resolve_checkpoint("forcenet")
    assert len(calls) == 1
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    hub.resolve_checkpoint("forcenet")
    assert len(calls) == 2


def test_shipped_file_without_manifest_entry_is_refused(weights_copy: Path) -> None:
    """A shipped file that the manifest does not list raises CheckpointError: it cannot be
    verified."""
    (weights_copy / hub.MANIFEST).write_text("{}")
    with pytest.raises(CheckpointError, match=r"forcenet\.pt has no SHA-256 in .*manifest"):
        hub.resolve_checkpoint("forcenet")


def test_failed_download_names_model_url_and_local_path(tmp_path: Path, monkeypatch) -> None:
    """An OCP name that cannot be downloaded (no network) raises CheckpointError, a ValueError
    (which the CLI reports in one line), naming the model, the URL, the reason and that a
    local path can be given instead; nothing is left in the cache."""
    monkeypatch.setenv("FORCECALC_CACHE", str(tmp_path))

    def offline(url, timeout):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(hub.urllib.request, "urlopen", offline)
    remote = hub.REMOTE_CHECKPOINTS["SpinConv-S2EF-OC20-All"]
    with pytest.raises(CheckpointError) as error:
        hub.resolve_checkpoint(remote.name, progress=False)
    message = str(error.value)
    assert isinstance(error.value, ValueError)
    assert remote.name in message and remote.url in message
    assert "Temporary failure in name resolution" in message and "local path" in message
    assert list(tmp_path.iterdir()) == []


def test_failed_download_via_http_error(server, tmp_path: Path, monkeypatch) -> None:
    """An HTTP error (404) for an OCP name raises CheckpointError with the HTTP status."""
    monkeypatch.setenv("FORCECALC_CACHE", str(tmp_path))
    remote = hub.RemoteCheckpoint("Gone-Model", f"{server}/gone.pt", "test")
    monkeypatch.setitem(hub.REMOTE_CHECKPOINTS, remote.name, remote)
    with pytest.raises(CheckpointError, match=r"download of Gone-Model from .*HTTP Error 404"):
        hub.resolve_checkpoint(remote.name, progress=False)


def test_cached_download_with_known_hash_is_verified(server, tmp_path: Path, monkeypatch) -> None:
    """A remote checkpoint with a known SHA-256 is checked when found in the cache too: a
    damaged cached copy raises CheckpointError saying to delete it."""
    monkeypatch.setenv("FORCECALC_CACHE", str(tmp_path))
    sha = hashlib.sha256((OCP_DATA / "forcenet_small.pt").read_bytes()).hexdigest()
    remote = hub.RemoteCheckpoint("Hashed-Model", f"{server}/forcenet_small.pt", "test", sha)
    monkeypatch.setitem(hub.REMOTE_CHECKPOINTS, remote.name, remote)
    path = hub.resolve_checkpoint(remote.name, progress=False)
    assert hub.resolve_checkpoint(remote.name, progress=False) == path
    path.write_bytes(b"damaged")
    with pytest.raises(CheckpointError, match=rf"{sha}; delete it"):
        hub.resolve_checkpoint(remote.name, progress=False)
