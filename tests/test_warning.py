"""forcecalc's warnings point at the user's line, whichever public function led to them."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from ase import Atoms
from ase.build import molecule
from ase.optimize import BFGS

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


def test_a_warning_through_ase_names_the_users_line() -> None:
    """A warning raised while ASE asks the calculator (``atoms.get_potential_energy()``, an
    optimizer's step) names the user's line, not ASE's calculator or optimizer module: here
    two atoms 0.3 Å apart (closer than any bond)."""
    atoms = Atoms("Cu2", positions=[[0, 0, 0], [0.3, 0, 0]], cell=[8, 8, 8], pbc=True)
    atoms.calc = forcecalc.ForceNetCalculator("forcenet")
    for call in (atoms.get_potential_energy, lambda: BFGS(atoms, logfile=None).run(steps=1)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        ours = [w for w in caught if issubclass(w.category, ForcecalcWarning)]
        assert ours and all("closer than any bond" in str(w.message) for w in ours)
        assert {Path(w.filename).resolve() for w in ours} == {Path(__file__).resolve()}
