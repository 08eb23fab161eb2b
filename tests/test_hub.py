"""Checkpoint names and downloads (against a local HTTP server: no outside network)."""

from __future__ import annotations

import functools
import hashlib
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from ocp_fixtures import OCP_DATA

from forcecalc import hub


@pytest.fixture
def server():
    """Serve tests/data/ocp on 127.0.0.1 (a random free port)."""
    handler = functools.partial(_QuietHandler, directory=str(OCP_DATA))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
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
