"""What `forcecalc relax`, `md` and `info` write: each frame's own results, the format the
suffix names (checked before any work), constraints kept, parameters counted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ase.build import add_adsorbate, fcc111
from ase.constraints import FixAtoms, FixCartesian
from ase.io import read, write
from ocp_fixtures import OCP_DATA
from stress_checks import assert_calculator_stress

from forcecalc.calculator import load_calculator
from forcecalc.cli import main

SPINCONV_EC = OCP_DATA / "spinconv_small_ec.pt"


def _two_slabs() -> list:
    """Two different small O/Cu(111) slabs (2 and 3 layers)."""
    slabs = []
    for layers in (2, 3):
        slab = fcc111("Cu", size=(2, 2, layers), vacuum=5.0)
        add_adsorbate(slab, "O", 2.0, "fcc")
        slabs.append(slab)
    return slabs


def _relax(tmp_path: Path, out: Path, *extra: str) -> int:
    command = ["relax", str(tmp_path / "in.extxyz"), "--model", str(SPINCONV_EC)]
    command += ["--dtype", "float64", "--steps", "3", "--out", str(out), *extra]
    return main(command)


@pytest.mark.parametrize("suffix", [".extxyz", ".traj"])
def test_relax_frames_carry_their_own_energy_and_forces(tmp_path: Path, suffix: str) -> None:
    """`relax --out` (one by one, and --batched) writes every frame with the energy and
    forces of that frame's own structure, equal to a fresh calculator's at the written
    positions; both modes write the same results (energy, free_energy, forces)."""
    write(tmp_path / "in.extxyz", _two_slabs())
    fresh = load_calculator(SPINCONV_EC, device="cpu", dtype="float64")
    written = {}
    for mode in ([], ["--batched"]):
        out = tmp_path / f"out{len(mode)}{suffix}"
        assert _relax(tmp_path, out, *mode) == 0
        frames = read(out, index=":")
        assert [len(atoms) for atoms in frames] == [9, 13]
        for atoms in frames:
            reference = atoms.copy()
            reference.calc = fresh
            assert atoms.get_potential_energy() == pytest.approx(
                reference.get_potential_energy(), abs=1e-6
            )
            np.testing.assert_allclose(
                atoms.get_forces(apply_constraint=False),
                reference.get_forces(apply_constraint=False),
                rtol=0,
                atol=1e-5,
            )
        written[len(mode)] = frames
    assert set(written[0][0].calc.results) == set(written[1][0].calc.results)
    assert set(written[0][0].calc.results) >= {"energy", "free_energy", "forces"}


def test_relax_writes_a_bulk_structures_stress_in_both_modes(tmp_path: Path) -> None:
    """A bulk cell relaxed with a model that defines stress (energy-centric SpinConv with
    conservative forces): one by one and --batched write the same results, its stress (Voigt,
    eV/Å^3, computed with the forces as the calculator does) among them, in --out and in
    every --trajectory frame, equal to a fresh calculator's at the written positions (the
    batched outputs had none)."""
    from ase.build import bulk

    crystal = bulk("Cu", "fcc", a=3.7, cubic=True)  # expanded: a stress of some size
    crystal.rattle(0.05, seed=1)
    write(tmp_path / "in.extxyz", crystal)
    fresh = load_calculator(SPINCONV_EC, device="cpu", dtype="float64", forces="conservative")
    written = []
    for mode in ([], ["--batched"]):
        out, paths = tmp_path / f"out{len(mode)}.traj", tmp_path / f"paths{len(mode)}"
        options = ["--forces", "conservative", "--trajectory", str(paths), *mode]
        assert _relax(tmp_path, out, *options) == 0
        frames = [read(out), *read(paths / "0.traj", index=":")]
        assert_calculator_stress(frames, fresh)
        written.append(frames)
    for one, batched in zip(*written, strict=True):
        assert set(one.calc.results) == set(batched.calc.results)
        np.testing.assert_allclose(one.get_stress(), batched.get_stress(), rtol=0, atol=1e-8)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("out.vasp", "the vasp format holds one structure, but 2"),
        ("POSCAR", "the vasp format holds one structure, but 2"),
        ("out.foo", "'.foo'"),
    ],
)
def test_relax_refuses_an_unwritable_out_before_relaxing(
    tmp_path: Path, monkeypatch, capsys, name: str, expected: str
) -> None:
    """`relax --out` with a suffix ASE cannot write, or a one-structure format for several
    structures, fails with a one-line error before the model is even loaded."""
    write(tmp_path / "in.extxyz", _two_slabs())

    def no_loading(*args, **kwargs):
        pytest.fail("the model was loaded before --out was checked")

    monkeypatch.setattr("forcecalc.checkpoint.load_checkpoint", no_loading)
    assert _relax(tmp_path, tmp_path / name) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("forcecalc: error: cannot write")
    assert expected in err
    assert not (tmp_path / name).exists()


@pytest.mark.parametrize("name", ["CONTCAR.vasp", "CONTCAR"])
def test_relax_writes_one_structure_in_a_single_structure_format(tmp_path: Path, name: str) -> None:
    """`relax --out CONTCAR.vasp` with one input structure writes it in VASP's format, and so
    does `--out CONTCAR`: a name without suffix that ASE knows gets ASE's format (others,
    such as `relaxed`, get extxyz), so that ASE, VESTA and VASP read it back."""
    write(tmp_path / "in.extxyz", _two_slabs()[0])
    assert _relax(tmp_path, tmp_path / name) == 0
    assert len(read(tmp_path / name)) == 9
    assert (tmp_path / name).read_text().splitlines()[0].strip() != "9"  # not xyz
    assert _relax(tmp_path, tmp_path / "relaxed") == 0
    assert "relax_converged" in read(tmp_path / "relaxed", format="extxyz").info


def test_fix_below_adds_to_the_input_constraints(tmp_path: Path) -> None:
    """`relax --fix-below Z` adds the atoms below Z to the input's FixAtoms (several merged
    into one) and keeps its other constraints: all those atoms stay where they were."""
    slab = _two_slabs()[0]
    top = len(slab) - 2
    cartesian = FixCartesian(top, [True, True, False])
    slab.set_constraint([FixAtoms([len(slab) - 1]), cartesian, FixAtoms([4])])
    write(tmp_path / "in.traj", slab)
    z_bottom = slab.positions[:4, 2].max() + 0.1
    command = ["relax", str(tmp_path / "in.traj"), "--model", str(SPINCONV_EC)]
    command += ["--steps", "3", "--fix-below", str(z_bottom), "--out", str(tmp_path / "o.traj")]
    assert main(command) == 0
    relaxed = read(tmp_path / "o.traj")
    fix_atoms = [c for c in relaxed.constraints if isinstance(c, FixAtoms)]
    assert len(fix_atoms) == 1 and len(relaxed.constraints) == 2
    assert fix_atoms[0].get_indices().tolist() == [0, 1, 2, 3, 4, len(slab) - 1]
    assert any(isinstance(c, FixCartesian) for c in relaxed.constraints)
    fixed = fix_atoms[0].get_indices()
    np.testing.assert_allclose(relaxed.positions[fixed], slab.positions[fixed], atol=1e-10)
    np.testing.assert_allclose(relaxed.positions[top, :2], slab.positions[top, :2], atol=1e-10)
    assert not np.allclose(relaxed.positions, slab.positions)


def test_md_out_follows_the_suffix_and_creates_folders(tmp_path: Path) -> None:
    """`md --out DIR/md.extxyz` creates DIR and writes extxyz (not a binary trajectory): one
    frame every --log-interval steps and at step 0, each with its energy and forces."""
    write(tmp_path / "in.extxyz", _two_slabs()[0])
    out = tmp_path / "new" / "folder" / "md.extxyz"
    command = ["md", str(tmp_path / "in.extxyz"), "--model", str(SPINCONV_EC)]
    command += ["--steps", "5", "--log-interval", "2", "--out", str(out)]
    assert main(command) == 0
    assert out.read_text().split("\n", 1)[0].strip() == "9"
    frames = read(out, index=":", format="extxyz")
    assert len(frames) == 3
    assert all(atoms.calc.results.keys() >= {"energy", "forces"} for atoms in frames)
    assert not Path(f"{out}.part").exists()


def test_info_counts_parameters_without_buffers(capsys) -> None:
    """`forcecalc info` reports as "parameters" the model's parameters only (not its
    buffers), and the buffers' values separately."""
    checkpoint = OCP_DATA / "spinconv_small_fc.pt"
    assert main(["info", str(checkpoint)]) == 0
    report = json.loads(capsys.readouterr().out)
    # this fixture's counts: 204,667 weights; 91 buffer values (GaussianSmearing's 64 centres
    # and the force block's 3 rotations, 27 values)
    assert report["parameters"] == 204_667
    assert report["buffer_values"] == 91
