"""What the command line says about checkpoints it cannot use: one line, the right advice."""

from __future__ import annotations

import errno
import urllib.error
from pathlib import Path

import pytest
import torch
from ocp_fixtures import OCP_DATA

from forcecalc import checkpoint, cli, hub


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


@pytest.mark.parametrize(
    ("output", "expected"),
    [(".", "cannot write .: it is a folder"), ("in.pt/out.pt", "in.pt is a file, not a folder")],
)
def test_convert_checks_its_output_first(
    tmp_path: Path, monkeypatch, capsys, output: str, expected: str
) -> None:
    """`forcecalc convert IN OUT` with OUT a folder or under a file exits 2 with one line
    naming the problem, before the input is read (a missing input is not reported)."""
    monkeypatch.chdir(tmp_path)
    Path("in.pt").write_bytes(b"x")
    assert cli.main(["convert", "missing.pt", output]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("forcecalc: error: ") and expected in err


def test_convert_keeps_an_existing_output_unless_told(tmp_path: Path, capsys) -> None:
    """`forcecalc convert IN OUT` where OUT exists (IN and OUT swapped: a fine-tuned model)
    exits 2 naming it and leaves it as it was; `--overwrite` replaces it."""
    kept = tmp_path / "mine.pt"
    kept.write_bytes(b"my fine-tuned weights")
    source = str(OCP_DATA / "forcenet_small.pt")
    assert cli.main(["convert", source, str(kept)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("forcecalc: error: ") and "mine.pt exists" in err and "--overwrite" in err
    assert kept.read_bytes() == b"my fine-tuned weights"
    assert cli.main(["convert", source, str(kept), "--overwrite"]) == 0
    assert checkpoint.read_checkpoint(kept)[0].model == "forcenet"


def test_a_failed_file_operation_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    """An OSError of a file operation (a full disk while writing) ends a command with exit
    code 2 and one line naming it, no traceback."""

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out.pt"))

    monkeypatch.setattr(checkpoint, "save_checkpoint", disk_full)
    assert cli.main(["convert", str(OCP_DATA / "forcenet_small.pt"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == f"forcecalc: error: [Errno 28] No space left on device: '{tmp_path}/out.pt'\n"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_convert_keeps_the_stored_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    """`forcecalc convert` of a forcecalc checkpoint writes its weights in the dtype they
    are stored in (float64 ones are neither rounded nor cast), with the same values."""
    source = checkpoint.save_checkpoint(
        checkpoint.load_checkpoint(OCP_DATA / "forcenet_small.pt", device="cpu", dtype=dtype),
        tmp_path / "in.pt",
    )
    assert cli.main(["convert", str(source), str(tmp_path / "out.pt")]) == 0
    _, before = checkpoint.read_checkpoint(source)
    _, after = checkpoint.read_checkpoint(tmp_path / "out.pt")
    assert after.keys() == before.keys()
    for key, value in before.items():  # the same dtype and bits (ForceNet's tables hold NaN)
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True)
    assert {value.dtype for value in after.values() if value.is_floating_point()} == {dtype}
