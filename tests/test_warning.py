"""forcecalc's warnings point at the user's line, whichever public function led to them."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from ase.build import molecule

import forcecalc
from forcecalc.warning import ForcecalcWarning


@pytest.mark.parametrize(
    "call",
    [
        lambda: forcecalc.load_checkpoint("forcenet"),
        lambda: forcecalc.ForceNetCalculator("forcenet"),
        lambda: forcecalc.relax([molecule("H2O")], "forcenet", steps=0),
    ],
    ids=["load_checkpoint", "calculator", "relax"],
)
def test_a_warning_names_the_callers_line(
    call: Callable[[], object], tmp_path: Path, monkeypatch
) -> None:
    """The same warning (a known name that is also a folder here: the folder is not used) is
    reached at three depths inside forcecalc; each time it is a ForcecalcWarning (a
    UserWarning, so existing filters apply) attributed to this file, the caller's, not to a
    line inside the package."""
    monkeypatch.chdir(tmp_path)
    Path("forcenet").mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    ours = [w for w in caught if issubclass(w.category, ForcecalcWarning)]
    assert len(ours) == 1 and issubclass(ours[0].category, UserWarning)
    assert "is a known checkpoint name" in str(ours[0].message)
    assert Path(ours[0].filename).resolve() == Path(__file__).resolve()


def test_forcecalc_warnings_can_be_silenced_by_category(tmp_path: Path, monkeypatch) -> None:
    """``filterwarnings("ignore", category=forcecalc.ForcecalcWarning)`` silences them."""
    monkeypatch.chdir(tmp_path)
    Path("forcenet").mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=forcecalc.ForcecalcWarning)
        forcecalc.load_checkpoint("forcenet")
    assert not caught
