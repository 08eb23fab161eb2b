"""Converters between the HDF5 store, ASE db and extxyz, and the ``data`` CLI."""

from __future__ import annotations

import argparse
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

from forcecalc.data import FrameBatch, open_dataset, write_dataset
from forcecalc.data.cli import add_data_commands
from forcecalc.data.convert import convert


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A store file with 6 frames of 2 systems (string, int, float, bool and numeric-looking
    string columns) and JSON attributes, like the generator's."""
    rng = np.random.default_rng(0)
    images = []
    for _ in range(6):
        atoms = Atoms(
            "Cu4CO",
            positions=rng.uniform(0, 6, (6, 3)),
            cell=[[6.0, 0, 0], [3.0, 5.2, 0], [0, 0, 20.0]],
            pbc=True,
            tags=[0, 0, 1, 1, 2, 2],
        )
        atoms.set_constraint(FixAtoms(indices=[0, 1]))
        atoms.calc = SinglePointCalculator(
            atoms, energy=rng.normal(), forces=rng.normal(size=(6, 3))
        )
        images.append(atoms)
    batch = FrameBatch.from_atoms(
        images, system=[0, 0, 0, 1, 1, 1], step=[0, 1, 2, 0, 1, 5], kind=[0, 0, 1, 0, 2, 2]
    )
    systems = {
        "adsorbate": ["CO", "CO"],
        "facet": ["(111)", "(211)"],
        "code": ["3", "12"],
        "sid": [4, 9],
        "e_slab": [1.25, -0.5],
        "converged": [True, False],
        "relaxed_frame": [1, 4],
    }
    attrs = {"seed": 5, "config": '{"a": [1, 2], "b": "x\\"y"}', "size": "tiny"}
    return write_dataset(tmp_path / "src.h5", batch, systems, attrs)


def _assert_same(a_path: Path, b_path: Path, exact: bool) -> None:
    a, b = open_dataset(a_path), open_dataset(b_path)
    assert a.attrs == b.attrs
    assert a.frames.keys() == b.frames.keys()
    for name in a.frames:
        assert np.array_equal(a.frames[name], b.frames[name]), name
    for name in ("positions", "forces", "numbers", "tags", "fixed"):
        x, y = a.atom_array(name), b.atom_array(name)
        assert x.dtype == y.dtype
        if exact:
            assert np.array_equal(x, y), name
        else:  # extxyz prints 8 decimals
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-8 if name == "positions" else 2e-8)
    assert a.systems.keys() == b.systems.keys()
    for name in a.systems:
        assert a.systems[name].dtype == b.systems[name].dtype, name
        assert np.array_equal(a.systems[name], b.systems[name]), name


def test_db_round_trip_is_exact(source: Path, tmp_path: Path) -> None:
    """HDF5 -> ASE db -> HDF5 gives back every frame field, the systems table (with column
    types) and the attributes exactly; the db rows are ordinary ASE rows."""
    db = convert(source, tmp_path / "a.db")
    import ase.db

    row = ase.db.connect(db).get(id=4)
    assert row.sys_facet == "(211)" and row.step == 0 and row.kind == 0
    assert row.toatoms().constraints[0].index.tolist() == [0, 1]
    _assert_same(source, convert(db, tmp_path / "back.h5"), exact=True)


def test_extxyz_round_trip(source: Path, tmp_path: Path) -> None:
    """HDF5 -> extxyz -> HDF5 round-trips everything, positions and forces to extxyz's 8
    decimals; the extxyz file reads in ASE with energy, forces, tags and FixAtoms; extxyz ->
    db -> extxyz -> HDF5 keeps it too."""
    xyz = convert(source, tmp_path / "a.extxyz")
    frames = ase.io.read(xyz, index=":")
    assert len(frames) == 6 and frames[2].info["sys_code"] == "str:3"  # else read as int 3
    assert frames[0].get_tags().tolist() == [0, 0, 1, 1, 2, 2]
    assert isinstance(frames[0].constraints[0], FixAtoms)
    _assert_same(source, convert(xyz, tmp_path / "back.h5"), exact=False)
    db = convert(xyz, tmp_path / "b.db")
    _assert_same(source, convert(convert(db, tmp_path / "b.xyz"), tmp_path / "b.h5"), exact=False)


def test_foreign_files_and_bad_suffixes(tmp_path: Path) -> None:
    """A plain extxyz without our keys converts with defaults (no systems, NaN energy where
    absent); an unknown suffix is refused and leaves no file."""
    plain = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]], cell=[5, 5, 5])
    ase.io.write(tmp_path / "plain.xyz", [plain, plain])
    ds = open_dataset(convert(tmp_path / "plain.xyz", tmp_path / "plain.h5"))
    assert len(ds) == 2 and ds.systems == {} and np.isnan(ds.frames["energy"]).all()
    assert ds.frames["system"].tolist() == [-1, -1]
    with pytest.raises(ValueError, match="unknown format"):
        convert(tmp_path / "plain.xyz", tmp_path / "out.cif")
    assert not (tmp_path / "out.cif").exists()


def test_cli_registers_data_commands(source: Path, tmp_path: Path) -> None:
    """``add_data_commands`` registers ``data oc20emt`` (size, out, seed, workers) and
    ``data convert``; each sets ``func``; ``data convert`` converts."""
    parser = argparse.ArgumentParser(prog="forcecalc")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["data", "oc20emt", "--size", "tiny", "--out", "d", "--seed", "3", "--workers", "2"]
    )
    assert (args.size, args.out, args.seed, args.workers) == ("tiny", "d", 3, 2)
    assert callable(args.func)
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "oc20emt", "--size", "huge", "--out", "d"])
    args = parser.parse_args(["data", "convert", str(source), str(tmp_path / "c.db")])
    assert args.func(args) == 0
    assert len(open_dataset(convert(tmp_path / "c.db", tmp_path / "c.h5"))) == 6
