"""Checkpoint names and downloads (against a local HTTP server: no outside network)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import threading
import time
import urllib.error
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from ocp_fixtures import OCP_DATA

from forcecalc import hub
from forcecalc.checkpoint import CheckpointError, load_checkpoint


@contextmanager
def _serving(handler) -> Iterator[str]:
    """Serve with ``handler`` on 127.0.0.1 (a random free port); yields the base URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    serve = functools.partial(httpd.serve_forever, poll_interval=0.02)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def server():
    """Serve tests/data/ocp on 127.0.0.1 (a random free port)."""
    with _serving(functools.partial(_QuietHandler, directory=str(OCP_DATA))) as url:
        yield url


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class _FiveThousandBytes(BaseHTTPRequestHandler):
    """5000 bytes, announced in a Content-Length for ``/announced.pt``; for any other path
    without one (HTTP/1.0: the data ends where the server closes the connection)."""

    def do_GET(self) -> None:
        self.send_response(200)
        if self.path == "/announced.pt":
            self.send_header("Content-Length", "5000")
        self.end_headers()
        self.wfile.write(b"x" * 5000)

    def log_message(self, *args) -> None:
        pass


class _EndlessResponse:
    """What ``urlopen`` returns for a broken server that announces ``announced`` bytes and
    sends 1000-byte chunks without end; bounded all the same: a read past the 50th fails
    the test (so a reader that never stops cannot fill the disk)."""

    def __init__(self, announced: int) -> None:
        self.headers = {"Content-Length": str(announced)}
        self.reads = 0

    def read(self, size: int = -1) -> bytes:
        self.reads += 1
        if self.reads > 50:
            raise AssertionError("the download read on past the announced Content-Length")
        return b"x" * (1000 if size < 0 else min(size, 1000))

    def __enter__(self) -> _EndlessResponse:
        return self

    def __exit__(self, *args) -> None:
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
    cached = (OCP_DATA / "forcenet_small_gauss.pt").read_bytes()  # another checkpoint
    path.write_bytes(cached)
    assert hub.resolve_checkpoint("forcenet_small.pt", progress=False).read_bytes() == cached


def test_existing_path_is_used_as_is() -> None:
    """A path to an existing file resolves to itself."""
    path = OCP_DATA / "forcenet_small.pt"
    assert hub.resolve_checkpoint(path) == path


def test_unknown_name_lists_known_ones() -> None:
    """An unknown name raises FileNotFoundError that lists the names that exist."""
    with pytest.raises(FileNotFoundError, match="SpinConv-S2EF-OC20-All"):
        hub.resolve_checkpoint("no-such-model")


@pytest.mark.parametrize(
    ("given", "meant"),
    [
        ("spinconv_fc", "spinconv-fc"),
        ("SpinConv-FC", "spinconv-fc"),
        ("forcnet", "forcenet"),
        ("SpinConv-S2EF-OC20-all", "SpinConv-S2EF-OC20-All"),
    ],
)
def test_a_misspelled_name_gets_the_known_name_it_is_closest_to(given: str, meant: str) -> None:
    """A name that differs from a known one by case, ``_`` for ``-`` or a typo is refused
    (names are exact) with the known name suggested."""
    with pytest.raises(FileNotFoundError, match=f"did you mean '{meant}'"):
        hub.resolve_checkpoint(given)


@pytest.mark.parametrize("given", ["", "  "])
def test_an_empty_name_is_refused_as_empty(given: str) -> None:
    """An empty checkpoint name says so (it was taken as the current folder)."""
    with pytest.raises(FileNotFoundError, match="empty name"):
        hub.resolve_checkpoint(given)


def test_list_models_names_remote_checkpoints(capsys) -> None:
    """list_models() prints and returns the downloadable OCP checkpoints."""
    models = hub.list_models()
    assert "SpinConv-S2EF-OC20-All" in models and "SpinConv-S2EF-OC20-2M" in models
    assert "SpinConv-S2EF-OC20-All" in capsys.readouterr().out


def test_list_models_calls_a_corrupt_cached_file_corrupt(tmp_path: Path, monkeypatch) -> None:
    """A cached file that every use of its name refuses (an HTML page, an empty file, a
    checkpoint whose known SHA-256 does not match) is listed as corrupt, to be deleted, not
    as cached; a sound cached checkpoint is cached, a missing one to download."""
    monkeypatch.setenv("FORCECALC_CACHE", str(tmp_path))
    sha = hashlib.sha256((OCP_DATA / "forcenet_small.pt").read_bytes()).hexdigest()
    remotes = [
        hub.RemoteCheckpoint(f"M{k}", f"http://127.0.0.1:9/m{k}.pt", "test", known)
        for k, known in enumerate((None, None, "0" * 64, sha, None))
    ]
    monkeypatch.setattr(hub, "REMOTE_CHECKPOINTS", {r.name: r for r in remotes})
    (tmp_path / "m0.pt").write_text("<html>error</html>")
    (tmp_path / "m1.pt").write_bytes(b"")
    for name in ("m2.pt", "m3.pt"):
        shutil.copyfile(OCP_DATA / "forcenet_small.pt", tmp_path / name)
    listed = hub.list_models(show=False)
    states = [listed[remote.name].removesuffix(": test") for remote in remotes]
    expected = ["corrupt", "corrupt", "corrupt", "cached", "download"]
    assert [state.split(" (")[0] for state in states] == expected
    assert f"the cached {tmp_path / 'm0.pt'} is no usable checkpoint: delete it" in states[0]
    for remote, state in zip(remotes, states, strict=True):
        if state.startswith("corrupt"):
            with pytest.raises(CheckpointError, match="delete it"):
                hub.resolve_checkpoint(remote.name, progress=False)


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
    (which the CLI reports in one line), naming the model, the URL, the reason, the place in
    the cache where a copy of the file makes the name work, and that a local path can be
    given instead; nothing is left in the cache."""
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
    assert "check the network connection" in message
    assert f"copy it to {tmp_path / remote.filename} (where the name {remote.name}" in message
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


def test_download_stops_at_the_first_byte_past_content_length(tmp_path: Path, monkeypatch) -> None:
    """A server that sends more than its Content-Length (here without end) is cut off at the
    first byte too many: CheckpointError naming the URL and the announced size, nothing
    left in the cache (neither the file nor a temp file)."""
    monkeypatch.setenv("FORCECALC_CACHE", str(tmp_path))
    response = _EndlessResponse(announced=2500)
    monkeypatch.setattr(hub.urllib.request, "urlopen", lambda url, timeout: response)
    remote = hub.RemoteCheckpoint("Endless-Model", "http://127.0.0.1:9/endless.pt", "test")
    monkeypatch.setitem(hub.REMOTE_CHECKPOINTS, remote.name, remote)
    with pytest.raises(CheckpointError, match=r"endless\.pt sent more than the 2500 bytes"):
        hub.resolve_checkpoint(remote.name, progress=False)
    assert response.reads == 3  # 1000 + 1000 + 501 bytes: one byte too many
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("path", ["/announced.pt", "/unannounced.pt"])
def test_download_is_bounded_by_the_checkpoints_max_bytes(
    tmp_path: Path, monkeypatch, path: str
) -> None:
    """A remote checkpoint's download stops at its entry's max_bytes: a larger Content-Length
    is refused before any data is read, data without one is cut off past the bound; the
    CheckpointError names the URL and the bound, and nothing is left in the cache."""
    monkeypatch.setenv("FORCECALC_CACHE", str(tmp_path))
    with _serving(_FiveThousandBytes) as url:
        remote = hub.RemoteCheckpoint("Big-Model", url + path, "test", max_bytes=1000)
        monkeypatch.setitem(hub.REMOTE_CHECKPOINTS, remote.name, remote)
        with pytest.raises(CheckpointError, match=rf"{path}.* more than the 1000 ") as error:
            hub.resolve_checkpoint(remote.name, progress=False)
    assert "network" not in str(error.value)  # the server was reached: no network advice
    assert list(tmp_path.iterdir()) == []


def test_download_removes_dead_downloads_temp_files(server, tmp_path: Path) -> None:
    """A download of x.pt first removes the temp files (.x.pt.XXXXXXXX.part) of killed
    downloads: those no process holds locked and not written for STALE_PART_SECONDS. One
    locked by a download under way (another open file here), one written recently and the
    temp files of other names stay."""
    fcntl = pytest.importorskip("fcntl")
    names = [".x.pt.dead0000.part", ".x.pt.live0000.part", ".x.pt.new00000.part"]
    names.append(".y.pt.dead0000.part")
    old = time.time() - 2 * hub.STALE_PART_SECONDS
    for name in names:
        (tmp_path / name).write_bytes(b"partial")
        if "new" not in name:
            os.utime(tmp_path / name, (old, old))
    with (tmp_path / ".x.pt.live0000.part").open("r+b") as writer:
        fcntl.flock(writer, fcntl.LOCK_EX | fcntl.LOCK_NB)
        hub.download(f"{server}/forcenet_small.pt", tmp_path / "x.pt", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [*names[1:], "x.pt"]


def test_cached_name_removes_dead_downloads_temp_files(server, tmp_path: Path, monkeypatch) -> None:
    """Resolving an OCP name found in the cache also removes the stale temp files that a
    killed download of it left (its retry ran before they were stale)."""
    monkeypatch.setenv("FORCECALC_CACHE", str(tmp_path))
    remote = hub.RemoteCheckpoint("Test-Model", f"{server}/forcenet_small.pt", "test")
    monkeypatch.setitem(hub.REMOTE_CHECKPOINTS, remote.name, remote)
    path = hub.resolve_checkpoint(remote.name, progress=False)
    stale = tmp_path / f".{path.name}.dead0000.part"
    stale.write_bytes(b"partial")
    old = time.time() - 2 * hub.STALE_PART_SECONDS
    os.utime(stale, (old, old))
    assert hub.resolve_checkpoint(remote.name, progress=False) == path
    assert list(tmp_path.iterdir()) == [path]


def test_concurrent_downloads_of_one_file_both_succeed(server, tmp_path: Path, monkeypatch) -> None:
    """A download that starts while another of the same file is under way (paused mid-file,
    its temp file made to look old) leaves the other's temp file alone, since the other holds
    its lock: both complete, the file is whole, and no temp file is left."""
    data = (OCP_DATA / "forcenet_small.pt").read_bytes()
    paused, release = threading.Event(), threading.Event()

    class PausedResponse:
        def __init__(self) -> None:
            self.headers = {"Content-Length": str(len(data))}
            self.chunks = [data[:1000], data[1000:]]

        def read(self, size: int = -1) -> bytes:
            if len(self.chunks) == 1:
                paused.set()
                assert release.wait(timeout=10)
            return self.chunks.pop(0) if self.chunks else b""

        def __enter__(self) -> PausedResponse:
            return self

        def __exit__(self, *args) -> None:
            pass

    urlopen = hub.urllib.request.urlopen
    monkeypatch.setattr(
        hub.urllib.request,
        "urlopen",
        lambda url, timeout: PausedResponse() if url == "paused" else urlopen(url, timeout=timeout),
    )
    target = tmp_path / "x.pt"
    errors: list[BaseException] = []

    def first() -> None:
        try:
            hub.download("paused", target, progress=False)
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert paused.wait(timeout=10)
        old = time.time() - 2 * hub.STALE_PART_SECONDS
        for part in tmp_path.glob(".x.pt.*.part"):
            os.utime(part, (old, old))
        hub.download(f"{server}/forcenet_small.pt", target, progress=False)
    finally:
        release.set()
        thread.join(timeout=10)
    assert errors == []
    assert target.read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


@pytest.mark.parametrize(
    "content", [b"truncated", b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>"]
)
def test_unreadable_cached_file_says_to_delete_it(
    server, tmp_path: Path, monkeypatch, content: bytes
) -> None:
    """Loading an OCP name whose cached file is no PyTorch checkpoint (a truncated file, an
    error page saved in its place) raises CheckpointError naming the cached file, what it
    begins with, and saying to delete it to download it again from its URL."""
    monkeypatch.setenv("FORCECALC_CACHE", str(tmp_path))
    remote = hub.RemoteCheckpoint("Test-Model", f"{server}/forcenet_small.pt", "test")
    monkeypatch.setitem(hub.REMOTE_CHECKPOINTS, remote.name, remote)
    path = hub.resolve_checkpoint(remote.name, progress=False)
    data = path.read_bytes()
    path.write_bytes(data[:1000] if content == b"truncated" else content)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(remote.name, device="cpu")
    message = str(error.value)
    assert f"cached checkpoint {path} is not a PyTorch checkpoint" in message
    assert repr(path.read_bytes()[:40]) in message
    assert f"delete it, and Test-Model is downloaded again from {remote.url}" in message


@pytest.mark.parametrize("given", ["adir.pt/", "adir.pt", "./forcenet/", "./forcenet", "run"])
def test_a_folder_is_not_a_checkpoint(tmp_path: Path, monkeypatch, given: str) -> None:
    """A path to a folder (a training run's, one named like a checkpoint file) raises
    IsADirectoryError saying to pass the checkpoint file inside it."""
    monkeypatch.chdir(tmp_path)
    folder = given.rstrip("/")
    Path(folder).mkdir()
    with pytest.raises(IsADirectoryError) as error:
        hub.resolve_checkpoint(given)
    assert str(error.value) == (
        f"{folder} is a folder (pass the checkpoint file inside it, e.g. {folder}/best.pt or "
        f"{folder}/final.pt)"
    )


def test_a_known_name_comes_before_a_folder_of_that_name(tmp_path: Path, monkeypatch) -> None:
    """A bare shipped name that is also a folder in the current directory resolves to the
    shipped checkpoint (only an existing file comes before the names), with a warning naming
    the folder and how to use a checkpoint in it; `forcenet/` is the folder (an error)."""
    monkeypatch.chdir(tmp_path)
    Path("forcenet").mkdir()
    with pytest.warns(UserWarning, match=rf"{tmp_path / 'forcenet'} .*forcenet/best\.pt"):
        assert hub.resolve_checkpoint("forcenet") == hub.weights_dir() / "forcenet.pt"
    with pytest.raises(IsADirectoryError, match="forcenet is a folder"):
        hub.resolve_checkpoint("forcenet/")


class _ErrorPage(BaseHTTPRequestHandler):
    """An HTML page with status 200 (what a captive portal or proxy sends for any URL)."""

    def do_GET(self) -> None:
        page = b"<html><body>Please sign in to the network</body></html>"
        self.send_response(200)
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def log_message(self, *args) -> None:
        pass


def test_a_page_that_is_no_checkpoint_never_enters_the_cache(tmp_path: Path, monkeypatch) -> None:
    """A download whose data is no PyTorch checkpoint (an HTML page sent with status 200) is
    an error naming the URL and how the data starts, and leaves nothing in the cache (a
    later call downloads again instead of failing on a cached page)."""
    monkeypatch.setenv("FORCECALC_CACHE", str(tmp_path))
    with _serving(_ErrorPage) as url:
        remote = hub.RemoteCheckpoint("Portal-Model", url + "/model.pt", "test")
        monkeypatch.setitem(hub.REMOTE_CHECKPOINTS, remote.name, remote)
        with pytest.raises(CheckpointError, match=r"model\.pt is no PyTorch checkpoint.*<html>"):
            hub.resolve_checkpoint(remote.name, progress=False)
    assert list(tmp_path.iterdir()) == []
