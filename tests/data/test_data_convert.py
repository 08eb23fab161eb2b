"""Converters between the HDF5 store, ASE db and extxyz, and the ``data`` CLI."""

from __future__ import annotations

import argparse
import base64
import json
import re
import warnings
from pathlib import Path
from typing import Any

import ase.db
import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms, FixBondLength

from forcecalc.cli import main
from forcecalc.data import FrameBatch, open_dataset, write_dataset
from forcecalc.data.cli import add_data_commands
from forcecalc.data.convert import convert


def _write_source(path: Path, attrs: dict[str, Any]) -> Path:
    """A store file with 6 frames of 2 systems (string, int, float, bool, numeric-looking and
    empty string columns) and ``attrs``."""
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
        "note": ["", "x"],
    }
    return write_dataset(path, batch, systems, attrs)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A store file with 6 frames of 2 systems and JSON attributes, like the generator's."""
    attrs = {"seed": 5, "config": '{"a": [1, 2], "b": "x\\"y"}', "size": "tiny"}
    return _write_source(tmp_path / "src.h5", attrs)


def _assert_same(a_path: Path, b_path: Path, exact: bool) -> None:
    a, b = open_dataset(a_path), open_dataset(b_path)
    assert a.attrs == b.attrs
    assert a.frames.keys() == b.frames.keys()
    for name in a.frames:
        nan = a.frames[name].dtype.kind == "f"
        assert np.array_equal(a.frames[name], b.frames[name], equal_nan=nan), name
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


def _padded_attrs(padding: str) -> dict[str, Any]:
    """Attributes whose padded base64 JSON (as older versions wrote it) ends in ``padding``."""
    for n in range(3):
        attrs = {"seed": 5, "size": "tiny", "note": "x" * n}
        text = base64.b64encode(json.dumps(attrs, sort_keys=True).encode()).decode()
        if len(text) - len(text.rstrip("=")) == len(padding):
            return attrs
    raise AssertionError(padding)


def _assert_frames(want: list[Atoms], got: list[Atoms], exact: bool) -> None:
    """Same energy, forces (exact, or to the float32 precision the store keeps after
    extxyz's 8 decimals), stress, FixAtoms, tags, pbc and info in every frame."""
    assert len(want) == len(got)
    for k, (a, b) in enumerate(zip(want, got, strict=True)):
        assert a.calc.results.keys() == b.calc.results.keys(), k
        assert a.get_potential_energy() == b.get_potential_energy(), k
        fa, fb = a.get_forces(apply_constraint=False), b.get_forces(apply_constraint=False)
        if exact:
            assert np.array_equal(fa, fb), k
        else:
            eps = np.finfo(np.float32).eps
            np.testing.assert_allclose(fb, fa, rtol=eps, atol=1e-8, err_msg=str(k))
        if "stress" in a.calc.results:
            assert np.array_equal(a.get_stress(), b.get_stress()), k
        assert [c.todict() for c in a.constraints] == [c.todict() for c in b.constraints], k
        assert np.array_equal(a.get_tags(), b.get_tags()), k
        assert np.array_equal(a.pbc, b.pbc), k
        info_a = {key: v for key, v in a.info.items() if key != "frame"}
        info_b = {key: v for key, v in b.info.items() if key != "frame"}
        assert info_a == info_b, k


@pytest.mark.parametrize("padding", ["=", "=="])
def test_attrs_needing_base64_padding_keep_frame_0(padding: str, tmp_path: Path) -> None:
    """Attributes whose base64 JSON would end in ``=``/``==`` do not swallow frame 0's energy:
    ASE reads every extxyz frame with its energy; HDF5 -> extxyz -> HDF5 keeps every frame's
    energy (exactly), forces (to float32 precision), FixAtoms, tags, info and the attributes;
    extxyz -> db -> extxyz gives the same frames and attributes exactly."""
    attrs = _padded_attrs(padding)
    src = _write_source(tmp_path / "src.h5", attrs)
    xyz = convert(src, tmp_path / "a.extxyz")
    plain = ase.io.read(xyz, index=":")
    assert all("energy" in atoms.calc.results for atoms in plain)
    back = open_dataset(convert(xyz, tmp_path / "back.h5"))
    assert {k: back.attrs[k] for k in attrs} == attrs
    assert np.array_equal(back.frames["energy"], open_dataset(src).frames["energy"])
    _assert_frames(list(open_dataset(src)), list(back), exact=False)
    again = convert(convert(xyz, tmp_path / "b.db"), tmp_path / "b.extxyz")
    _assert_frames(plain, ase.io.read(again, index=":"), exact=True)
    _assert_same(back.path, convert(again, tmp_path / "again.h5"), exact=True)


@pytest.mark.parametrize("padding", ["=", "=="])
def test_files_of_older_versions_with_padded_attrs_still_read(padding: str, tmp_path: Path) -> None:
    """An extxyz written by older versions (padded base64 attributes, which ASE's parser
    merges with the next key) converts with its attributes and that key restored: frame 0's
    energy, or its pbc when it has no energy."""
    attrs = _padded_attrs(padding)
    old = base64.b64encode(json.dumps(attrs, sort_keys=True).encode()).decode()
    assert old.endswith(padding) and not old.endswith("=" + padding)
    with_energy = Atoms("CO", positions=[[0, 0, 0], [0, 0, 1.1]], cell=[5, 5, 5], pbc=True)
    with_energy.calc = SinglePointCalculator(with_energy, energy=-1.25, forces=np.ones((2, 3)))
    with_energy.info.update(system=-1, step=0, kind=0, dataset_attrs=old)
    no_energy = Atoms("CO", positions=[[0, 0, 0], [0, 0, 1.1]], cell=[5, 5, 5])
    no_energy.pbc = [True, True, False]
    no_energy.calc = SinglePointCalculator(no_energy, forces=np.ones((2, 3)))
    no_energy.info.update(system=-1, step=0, kind=0, dataset_attrs=old)
    for name, atoms, field, want in (
        ("e", with_energy, "energy", [-1.25]),
        ("p", no_energy, "pbc", [[True, True, False]]),
    ):
        ase.io.write(tmp_path / f"{name}.xyz", atoms)
        assert "energy" not in ase.io.read(tmp_path / f"{name}.xyz").calc.results
        ds = open_dataset(convert(tmp_path / f"{name}.xyz", tmp_path / f"{name}.h5"))
        assert {k: ds.attrs[k] for k in attrs} == attrs
        assert ds.frames[field].tolist() == want


def _stress_frames() -> list[Atoms]:
    """EMT-labelled periodic bulk frames (energy, forces, stress) and a molecule without
    stress, with mixed pbc."""
    frames = []
    for k, a in enumerate((3.58, 3.61, 3.66)):
        atoms = bulk("Cu", "fcc", a=a, cubic=True)
        atoms.rattle(0.05, seed=k)
        atoms.calc = EMT()
        results = {
            "energy": atoms.get_potential_energy(),
            "forces": atoms.get_forces(),
            "stress": atoms.get_stress(),
        }
        atoms.calc = SinglePointCalculator(atoms, **results)
        frames.append(atoms)
    co = molecule("CO", vacuum=4.0)
    co.calc = SinglePointCalculator(co, energy=0.5, forces=np.zeros((2, 3)))
    frames.insert(1, co)
    return frames


def test_stress_is_stored_and_round_trips(tmp_path: Path) -> None:
    """Frames with stress (EMT on periodic bulk) keep it through extxyz -> HDF5 (stored as
    Voigt ``/frames/stress``, NaN for the frame without one) -> extxyz / db -> HDF5; a file
    whose frames have no stress has no stress field and its frames no stress."""
    frames = _stress_frames()
    ase.io.write(tmp_path / "in.extxyz", frames)
    ds = open_dataset(convert(tmp_path / "in.extxyz", tmp_path / "s.h5"))
    stress = ds.frames["stress"]
    assert np.isnan(stress[1]).all()
    for k in (0, 2, 3):
        np.testing.assert_allclose(stress[k], frames[k].get_stress(), rtol=0, atol=1e-15)
    read = list(ds)
    assert "stress" not in read[1].calc.results
    assert np.array_equal(read[2].get_stress(), stress[2])
    for mid in ("x.extxyz", "x.db"):
        back = convert(convert(ds.path, tmp_path / mid), tmp_path / f"{mid}.h5")
        _assert_same(ds.path, back, exact=mid.endswith(".db"))
        _assert_frames(read, list(open_dataset(back)), exact=mid.endswith(".db"))
    source = _write_source(tmp_path / "src.h5", {})
    assert "stress" not in open_dataset(source).frames
    assert all("stress" not in atoms.calc.results for atoms in open_dataset(source))


def test_empty_files_convert_to_empty_files(tmp_path: Path) -> None:
    """An empty extxyz converts to an empty store, db and extxyz, with a warning that says so;
    an empty store converts to empty db and extxyz files and back to an empty store."""
    (tmp_path / "empty.xyz").write_text("")
    for dst in ("e.h5", "e.db", "e2.xyz"):
        with pytest.warns(UserWarning, match="holds no frames"):
            convert(tmp_path / "empty.xyz", tmp_path / dst)
    assert len(open_dataset(tmp_path / "e.h5")) == 0
    assert ase.db.connect(tmp_path / "e.db").count() == 0
    assert (tmp_path / "e2.xyz").read_text() == ""
    for mid in ("f.db", "f.xyz"):
        with pytest.warns(UserWarning, match="holds no frames"):
            back = convert(convert(tmp_path / "e.h5", tmp_path / mid), tmp_path / f"{mid}.h5")
        assert len(open_dataset(back)) == 0


def test_frames_without_energies_and_with_mixed_pbc(tmp_path: Path) -> None:
    """Frames without energy (one with forces only, one with nothing), periodic, molecular and
    slab (T T F) pbc convert to the store with NaN for what is missing and exact pbc and cell,
    and come back from it through extxyz and db with the same results, pbc and cell."""
    slab = bulk("Cu", "fcc", a=3.6) * (2, 2, 1)
    slab.pbc = [True, True, False]
    forces_only = slab.copy()
    forces_only.calc = SinglePointCalculator(forces_only, forces=np.full((4, 3), 0.25))
    frames = [bulk("Cu", "fcc", a=3.6, cubic=True), molecule("CO"), slab, forces_only]
    ase.io.write(tmp_path / "in.xyz", frames)
    ds = open_dataset(convert(tmp_path / "in.xyz", tmp_path / "in.h5"))
    assert np.isnan(ds.frames["energy"]).all()
    assert ds.frames["pbc"].tolist() == [[1, 1, 1], [0, 0, 0], [1, 1, 0], [1, 1, 0]]
    assert np.array_equal(ds.frames["cell"], [f.cell[:] for f in frames])
    assert np.isnan(ds.atom_array("forces", 0, 10)).all()
    assert np.array_equal(ds[3].get_forces(), np.full((4, 3), 0.25))
    assert [a.calc is None for a in ds] == [True, True, True, False]
    for mid in ("m.extxyz", "m.db"):
        back = open_dataset(convert(convert(ds.path, tmp_path / mid), tmp_path / f"{mid}.h5"))
        for name in ("energy", "pbc", "cell", "system"):
            assert np.array_equal(back.frames[name], ds.frames[name], equal_nan=True), name
        assert np.array_equal(back.atom_array("forces"), ds.atom_array("forces"), equal_nan=True)


def test_results_and_info_the_store_cannot_hold_warn(tmp_path: Path) -> None:
    """Converting to HDF5 warns, naming them, about calculator results (EMT's per-atom
    ``energies``), ``info`` keys, per-atom arrays (magnetic moments) and constraints other than
    FixAtoms the store has no place for; ``free_energy`` equal to
    ``energy`` and the store's own keys give no warning."""
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.calc = EMT()
    atoms.get_stress()
    atoms.info["config_type"] = "bulk"
    ase.io.write(tmp_path / "emt.xyz", atoms)
    with pytest.warns(UserWarning, match="no place for") as record:
        convert(tmp_path / "emt.xyz", tmp_path / "emt.h5")
    message = str(record[0].message)
    assert "'energies'" in message and "'config_type'" in message
    magnetic = atoms.copy()
    magnetic.set_initial_magnetic_moments([1.0] * len(atoms))
    magnetic.set_constraint(FixBondLength(0, 1))
    ase.io.write(tmp_path / "magnetic.db", magnetic)
    with pytest.warns(UserWarning, match="no place for") as record:
        convert(tmp_path / "magnetic.db", tmp_path / "magnetic.h5")
    message = str(record[0].message)
    assert "'initial_magmoms'" in message and "FixBondLength" in message
    assert "free_energy" not in message and "'stress'" not in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(convert(tmp_path / "emt.h5", tmp_path / "a.xyz"), tmp_path / "a.h5")


def test_extxyz_refuses_strings_it_cannot_hold(tmp_path: Path) -> None:
    """An ``info`` string extxyz would read back differently (here a systems column value
    ending in ``=``, which would swallow the next key) is refused naming the key, leaving no
    file; an empty string travels escaped and comes back empty."""
    src = tmp_path / "src.h5"
    write_dataset(
        src,
        FrameBatch.from_atoms([Atoms("H")], system=[0]),
        {"formula": ["a="], "empty": [""]},
    )
    with pytest.raises(ValueError, match="sys_formula"):
        convert(src, tmp_path / "out.extxyz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.h5"]
    write_dataset(src, FrameBatch.from_atoms([Atoms("H")], system=[0]), {"empty": [""]})
    back = convert(convert(src, tmp_path / "out.extxyz"), tmp_path / "back.h5")
    assert open_dataset(back).systems["empty"].tolist() == [""]


@pytest.mark.parametrize("dst", ["out.h5", "out.db", "out.xyz"])
def test_unreadable_input_is_one_error_naming_it(tmp_path: Path, dst: str) -> None:
    """A file that is not what its suffix says is a ValueError naming it (the CLI prints it
    on one line; it was the parser's traceback), and nothing is written."""
    (tmp_path / "bad.extxyz").write_text("garbage\n")
    with pytest.raises(ValueError, match=r"cannot read .*bad.extxyz: XYZError"):
        convert(tmp_path / "bad.extxyz", tmp_path / dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.extxyz"]


def test_missing_input_is_refused(tmp_path: Path) -> None:
    """A missing input file is refused (a missing .db is not created empty), leaving no file."""
    for name in ("in.db", "in.h5", "in.xyz"):
        with pytest.raises(FileNotFoundError, match="no such file"):
            convert(tmp_path / name, tmp_path / "out.h5")
    assert list(tmp_path.iterdir()) == []


def test_cli_convert_reports_warnings_on_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``data convert`` prints the converter's warnings as one ``forcecalc: warning:`` line
    each on stderr (as every command shows forcecalc's own warnings) and the output path on
    stdout."""
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.calc = EMT()
    atoms.get_forces()
    ase.io.write(tmp_path / "emt.xyz", atoms)
    assert main(["data", "convert", str(tmp_path / "emt.xyz"), str(tmp_path / "o.h5")]) == 0
    out, err = capsys.readouterr()
    assert out == f"{tmp_path / 'o.h5'}\n"
    assert err.startswith("forcecalc: warning: ") and err.count("\n") == 1 and "energies" in err


def test_a_free_energy_alone_is_stored_as_the_energy(tmp_path):
    """A frame labelled with a free energy and no energy (some DFT outputs) keeps it as its
    energy in HDF5, as training reads such frames (it was dropped, and the file refused)."""
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.calc = SinglePointCalculator(atoms, free_energy=-3.5, forces=np.zeros((4, 3)))
    ase.io.write(tmp_path / "in.extxyz", atoms)
    convert(tmp_path / "in.extxyz", tmp_path / "out.h5")
    with open_dataset(tmp_path / "out.h5") as dataset:
        assert dataset[0].get_potential_energy() == -3.5


def test_db_metadata_round_trips_and_row_data_is_named(tmp_path: Path) -> None:
    """An ASE db whose metadata holds ASE's ``default_columns`` and ``key_descriptions``
    converts to HDF5 (they are stored as JSON text) and back to a db with the same metadata;
    rows' ``data`` (not converted) is named in the one "no place for" warning of a conversion
    to HDF5, and in a warning of a conversion to extxyz."""
    metadata = {
        "title": "mine",
        "default_columns": ["id", "formula", "energy"],
        "key_descriptions": {"foo": ["Foo", "A foo", "eV"]},
    }
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.calc = SinglePointCalculator(atoms, energy=-1.0, forces=np.zeros((4, 3)))
    with ase.db.connect(tmp_path / "in.db") as db:
        db.write(atoms, data={"hessian": np.eye(12)})
        db.write(atoms)
    ase.db.connect(tmp_path / "in.db").metadata = metadata
    with pytest.warns(UserWarning, match="no place for") as record:
        convert(tmp_path / "in.db", tmp_path / "out.h5")
    assert len(record) == 1 and "row data 'hessian'" in str(record[0].message)
    assert {k: open_dataset(tmp_path / "out.h5").attrs[k] for k in metadata} == metadata
    back = convert(tmp_path / "out.h5", tmp_path / "back.db")
    assert ase.db.connect(back).metadata == metadata
    with pytest.warns(UserWarning, match="not converted: ASE db row data 'hessian'"):
        convert(tmp_path / "in.db", tmp_path / "out.extxyz")


def test_any_file_ase_reads_converts(tmp_path: Path) -> None:
    """Inputs in other formats ASE reads (a trajectory, a POSCAR without suffix, a CIF)
    convert by ASE's reader, with their structures (and the trajectory's energies and
    forces; the CIF's space group info gets the "no place for" warning); a file ASE
    recognises in no format, or cannot read, is a ValueError naming it, and nothing is
    written."""
    frames = _stress_frames()
    ase.io.write(tmp_path / "in.traj", frames)
    ds = open_dataset(convert(tmp_path / "in.traj", tmp_path / "traj.h5"))
    assert len(ds) == len(frames)
    for want, got in zip(frames, ds, strict=True):
        assert np.array_equal(got.positions, want.positions)
        assert got.get_potential_energy() == want.get_potential_energy()
    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    ase.io.write(tmp_path / "POSCAR", cu, format="vasp")
    ase.io.write(tmp_path / "in.cif", cu)
    for name in ("POSCAR", "in.cif"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            (got,) = open_dataset(convert(tmp_path / name, tmp_path / f"{name}.h5"))
        assert [str(w.message).count("info['spacegroup']") for w in caught] == (
            [1] if name == "in.cif" else []
        )
        np.testing.assert_allclose(got.positions, cu.positions, atol=1e-6)
        np.testing.assert_allclose(got.cell[:], cu.cell[:], atol=1e-6)
    (tmp_path / "notes.abc").write_text("hello\n")
    ase.io.write(tmp_path / "picture.png", cu)
    for name, message in (("notes.abc", "does not recognise"), ("picture.png", "cannot read")):
        with pytest.raises(ValueError, match=rf"cannot read .*{name}: .*{message}"):
            convert(tmp_path / name, tmp_path / "out.h5")
    assert not (tmp_path / "out.h5").exists()


def test_a_folder_destination_is_refused_before_reading(tmp_path: Path) -> None:
    """A destination that is an existing folder (or under a file) is a ValueError saying so
    before the input is read (an unreadable input gives this error, not its own)."""
    (tmp_path / "bad.extxyz").write_text("garbage\n")
    (tmp_path / "dir.h5").mkdir()
    (tmp_path / "file").write_text("")
    for dst, message in (("dir.h5", "it is a folder"), ("file/out.db", "is a file")):
        with pytest.raises(ValueError, match=f"cannot write .*{message}"):
            convert(tmp_path / "bad.extxyz", tmp_path / dst)
    assert list((tmp_path / "dir.h5").iterdir()) == []


def test_non_finite_positions_are_refused_by_convert(tmp_path: Path) -> None:
    """Converting frames with NaN positions to HDF5 is a ValueError naming the frame's index
    in the input and its formula; no output is written."""
    frames = _stress_frames()
    frames[2].positions[0, 1] = np.nan
    ase.io.write(tmp_path / "in.extxyz", frames)
    formula = frames[2].get_chemical_formula()
    with pytest.raises(ValueError, match=rf"frame 2 \({formula}\).*positions hold NaN"):
        convert(tmp_path / "in.extxyz", tmp_path / "out.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.extxyz"]


def test_cli_convert_keeps_an_existing_output_unless_told_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``data convert IN OUT`` onto an existing OUT is an error that leaves OUT as it was (IN
    and OUT swapped replaced the user's data); ``--overwrite`` replaces it."""
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.calc = EMT()
    atoms.get_forces()
    source, target = tmp_path / "in.extxyz", tmp_path / "mine.extxyz"
    ase.io.write(source, atoms)
    target.write_text("the user's frames\n")
    assert main(["data", "convert", str(source), str(target)]) == 2
    assert "exists (the output comes second" in capsys.readouterr().err
    assert target.read_text() == "the user's frames\n"
    assert main(["data", "convert", str(source), str(target), "--overwrite"]) == 0
    assert len(ase.io.read(target, index=":")) == 1


@pytest.mark.parametrize("label", ["energy=abc", "energy=nan", "forces"])
@pytest.mark.parametrize("suffix", [".h5", ".db", ".extxyz"])
def test_a_label_that_is_no_finite_number_is_named_with_its_frame(
    tmp_path: Path, suffix: str, label: str
) -> None:
    """An extended XYZ energy that is text (``energy=abc``, kept as a string by ASE's reader),
    or an energy or force that is not finite, is an error naming the file and the frame, and
    no output is written (HDF5 dropped a NaN energy without a word: its missing label)."""
    frames = []
    for a in (3.6, 3.65):
        atoms = bulk("Cu", "fcc", a=a, cubic=True)
        atoms.calc = EMT()
        atoms.get_forces()
        frames.append(atoms)
    source = tmp_path / "in.extxyz"
    ase.io.write(source, frames)
    lines = source.read_text().splitlines(keepends=True)
    comment, atom = len(frames[0]) + 3, len(frames[0]) + 5  # frame 1's comment, second atom
    if label == "forces":
        fields = lines[atom].split()
        lines[atom] = " ".join([*fields[:-1], "inf"]) + "\n"
        expected = "forces not finite"
    else:
        lines[comment] = re.sub(r"energy=\S+", label, lines[comment])
        expected = "the energy 'abc' is not a number" if "abc" in label else "energy not finite"
    source.write_text("".join(lines))
    with pytest.raises(ValueError, match=rf"^{source}: frame 1: {expected}"):
        convert(source, tmp_path / f"out{suffix}")
    assert not (tmp_path / f"out{suffix}").exists()
