"""What the command line says about checkpoints it cannot use: one line, the right advice."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest

from forcecalc import cli, hub


@pytest.mark.parametrize("unsafe", [[], ["--allow-unsafe"]])
def test_junk_checkpoint_is_one_line_without_unsafe_advice(
    tmp_path: Path, capsys, unsafe: list[str]
) -> None:
    """`forcecalc info` of a file that is no checkpoint exits 2 with one line saying it is
    not a PyTorch checkpoint, with or without --allow-unsafe, and never suggests it."""
    path = tmp_path / "t.pt"
    path.write_bytes(b"x")
    assert cli.main(["info", str(path), *unsafe]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{path} is not a PyTorch checkpoint" in err
    assert "unsafe" not in err


def test_offline_download_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    """`forcecalc info` of an OCP name with no network exits 2 with one line naming the
    model and the failed download (no traceback)."""
    monkeypatch.setenv("FORCECALC_CACHE", str(tmp_path))

    def offline(url, timeout):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(hub.urllib.request, "urlopen", offline)
    assert cli.main(["info", "SpinConv-S2EF-OC20-2M"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "download of SpinConv-S2EF-OC20-2M from https://" in err
