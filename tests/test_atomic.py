"""Output files (forcecalc.atomic): a file is replaced whole or not at all; locks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import forcecalc.atomic
from forcecalc.atomic import check_writable, torch_save, try_lock, write_json


def test_atomic_save_keeps_previous_file_on_failure(tmp_path: Path, monkeypatch) -> None:
    """A write that fails midway leaves the previous file intact and no temp file behind."""
    target = tmp_path / "ckpt.pt"
    torch_save({"a": 1}, target)

    def broken_save(obj, stream) -> None:
        stream.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        torch_save({"a": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_written_files_have_the_usual_permissions(tmp_path: Path) -> None:
    """A committed file gets ``0o666`` less the umask, not the temp file's private ``0o600``,
    and holds what was written."""
    mask = os.umask(0o022)
    try:
        path = write_json(tmp_path / "sub" / "out.json", {"a": [1, 2]})
    finally:
        os.umask(mask)
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert path.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]


def test_try_lock_is_exclusive_until_its_holder_closes(tmp_path: Path) -> None:
    """``try_lock`` takes a lock another open handle of the same file cannot take (False),
    until the holder closes it; a folder can be locked too."""
    pytest.importorskip("fcntl")
    path = tmp_path / "f"
    path.write_bytes(b"x")
    first, second = os.open(path, os.O_RDONLY), os.open(path, os.O_RDONLY)
    try:
        assert try_lock(first) is True
        assert try_lock(second) is False
        os.close(first)
        assert try_lock(second) is True
    finally:
        os.close(second)
    folder = os.open(tmp_path, os.O_RDONLY)
    try:
        assert try_lock(folder) is True
    finally:
        os.close(folder)


def test_an_output_place_is_tried_before_any_work(tmp_path: Path, monkeypatch) -> None:
    """``check_writable`` makes (and removes) a file where the output goes, since
    ``os.access`` says yes where none can be made (as root, on /proc or a read-only mount):
    a folder where that fails is refused with the system's reason; a writable one is left as
    it was."""
    check_writable(str(tmp_path / "new" / "out.xyz"))
    assert list(tmp_path.iterdir()) == []

    def refused(**_: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(forcecalc.atomic.tempfile, "mkstemp", refused)
    with pytest.raises(ValueError, match=r"cannot write .*out\.xyz: Permission denied"):
        check_writable(str(tmp_path / "out.xyz"))


def test_json_outputs_hold_no_nan_or_infinity_tokens(tmp_path: Path) -> None:
    """RFC 8259 has no token for a number that is not finite: ``write_json`` writes NaN and
    inf (Python floats and numpy scalars, nested in dicts, lists and tuples) as null, so that
    strict readers (jq, JavaScript; Python's json with parse_constant refusing) read the
    file; finite numbers, integers and booleans are written as they are."""
    import numpy as np

    data = {
        "mae": float("nan"),
        "rows": [float("inf"), -np.inf, np.float32("nan"), 0.25, (1, np.float64(2.5))],
        "counts": {"failed": 2, "ok": True},
    }
    path = write_json(tmp_path / "scores.json", data)

    def refuse(token: str) -> None:
        raise ValueError(f"not JSON: {token}")

    assert json.loads(path.read_text(), parse_constant=refuse) == {
        "mae": None,
        "rows": [None, None, None, 0.25, [1, 2.5]],
        "counts": {"failed": 2, "ok": True},
    }
