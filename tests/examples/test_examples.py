"""Every example runs to the end with the shipped weights and prints what it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from forcecalc.hub import shipped_checkpoints

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name: str, *args: str, cwd: Path | None = None) -> str:
    """Run ``examples/NAME`` with the CPU; returns its standard output."""
    if "spinconv-fc" not in shipped_checkpoints():
        pytest.fail("weights/spinconv-fc.pt is not shipped")
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_relax_co_cu111_compares_with_emt() -> None:
    """The main job: relaxes CO/Cu(111) with the shipped model and with EMT, prints both."""
    out = run_example("relax_co_cu111.py")
    assert "adsorption energy (eV)" in out
    assert "EMT max force at the forcecalc minimum" in out
    assert "RMSD of the free atoms" in out


def test_neb_prints_both_barriers() -> None:
    """The NEB example relaxes a band with the model and with EMT and prints both barriers."""
    out = run_example("neb_o_cu100.py", "--images", "3", "--fmax", "0.1")
    assert "barrier, forcecalc" in out and "barrier, EMT" in out


def test_batched_prediction_agrees_with_one_by_one() -> None:
    """Batched prediction equals the one-by-one calculator (to float32 noise)."""
    out = run_example("batched_prediction.py", "--n", "12", "--batch-size", "4")
    line = next(x for x in out.splitlines() if x.startswith("largest batched"))
    assert float(line.split(":")[1].split()[0]) < 1e-4


def test_plot_relaxation_writes_a_png(tmp_path: Path) -> None:
    """The plotting example saves a PNG of energy and max force per step."""
    pytest.importorskip("matplotlib")
    out_file = tmp_path / "relax.png"
    run_example("plot_relaxation.py", "--out", str(out_file))
    assert out_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_md_runs_langevin_then_nve_with_the_energy_centric_model() -> None:
    """The MD example thermalises with Langevin and reports NVE energy conservation for the
    shipped energy-centric model and for EMT; the model's drift is finite and small over a
    short run (a model with discontinuities shows jumps of ~0.1 eV)."""
    if "spinconv-ec" not in shipped_checkpoints():
        pytest.fail("weights/spinconv-ec.pt is not shipped")
    out = run_example("md_co_pt111.py", "--langevin-steps", "10", "--nve-steps", "20")
    assert "stress (GPa" in out
    spreads = [
        float(line.split("spread")[1].split("meV")[0])
        for line in out.splitlines()
        if "NVE 20 steps" in line
    ]
    assert len(spreads) == 2
    assert spreads[0] < 20.0
