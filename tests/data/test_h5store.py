"""The HDF5 frames store: reader round-trip, random access, atomic writes."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms, FixBondLength

from forcecalc.data import DatasetWriter, FrameBatch, open_dataset, write_dataset


def _images(n: int, seed: int = 0) -> list[Atoms]:
    """``n`` random frames of 3-7 atoms with energy, forces, tags, FixAtoms and step info."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        m = int(rng.integers(3, 8))
        atoms = Atoms(
            numbers=rng.choice([1, 6, 8, 29, 78], m),
            positions=rng.uniform(0, 8, (m, 3)),
            cell=np.diag(rng.uniform(8, 12, 3)) + rng.uniform(-1, 1, (3, 3)),
            pbc=[True, True, bool(k % 2)],
            tags=rng.integers(0, 3, m),
        )
        atoms.set_constraint(FixAtoms(mask=atoms.get_tags() == 0))
        atoms.calc = SinglePointCalculator(
            atoms, energy=float(rng.normal()), forces=rng.normal(size=(m, 3))
        )
        out.append(atoms)
    return out


def _batch(images: list[Atoms]) -> FrameBatch:
    n = len(images)
    return FrameBatch.from_atoms(
        images,
        system=[k // 2 for k in range(n)],
        step=list(range(n)),
        kind=[k % 3 for k in range(n)],
    )


def _systems(n_systems: int) -> dict[str, list[object]]:
    return {
        "name": [f"sys{s}" for s in range(n_systems)],
        "energy": [0.5 * s for s in range(n_systems)],
        "ok": [s % 2 == 0 for s in range(n_systems)],
        "initial_frame": [2 * s for s in range(n_systems)],
        "relaxed_frame": [2 * s + 1 for s in range(n_systems)],
    }


def test_reader_round_trips_every_field(tmp_path: Path) -> None:
    """Every per-atom, per-frame and per-system field and the attributes come back as written:
    items are Atoms with energy and unconstrained forces in a SinglePointCalculator (forces
    float32-rounded), FixAtoms, tags, pbc, cell and info; ``arrays`` gives the raw arrays;
    negative indices, slices, iteration and ``initial``/``relaxed`` work."""
    images = _images(10)
    path = write_dataset(tmp_path / "a.h5", _batch(images), _systems(5), {"seed": 3, "note": "x"})
    ds = open_dataset(path)
    assert len(ds) == 10 and ds.n_systems == 5
    assert ds.attrs["seed"] == 3 and ds.attrs["note"] == "x"
    assert ds.attrs["n_atoms"] == sum(len(a) for a in images)
    for k, (want, got) in enumerate(zip(images, ds, strict=True)):
        assert np.array_equal(got.numbers, want.numbers)
        assert np.array_equal(got.positions, want.positions)
        assert np.array_equal(got.cell[:], want.cell[:])
        assert np.array_equal(got.pbc, want.pbc)
        assert np.array_equal(got.get_tags(), want.get_tags())
        assert np.array_equal(got.constraints[0].index, want.constraints[0].index)
        assert got.get_potential_energy() == want.get_potential_energy()
        f = want.get_forces(apply_constraint=False).astype(np.float32)
        assert np.array_equal(got.get_forces(apply_constraint=False), f)
        assert np.abs(got.get_forces()[want.get_tags() == 0]).sum() == 0
        assert got.info == {"frame": k, "system": k // 2, "step": k, "kind": k % 3}
        raw = ds.arrays(k)
        assert np.array_equal(raw["positions"], want.positions)
        assert np.array_equal(raw["fixed"], want.get_tags() == 0)
        assert raw["energy"] == want.get_potential_energy()
    assert ds[-1].info["frame"] == 9
    assert [a.info["frame"] for a in ds[2:7:2]] == [2, 4, 6]
    with pytest.raises(IndexError):
        ds[10]
    assert list(ds.systems["name"]) == [f"sys{s}" for s in range(5)]
    assert ds.systems["ok"].dtype == bool and ds.systems["energy"][3] == 1.5
    assert ds.relaxed(2).info["frame"] == 5 and ds.initial(2).info["frame"] == 4
    assert np.array_equal(ds.natoms, [len(a) for a in images])
    mem = open_dataset(path, in_memory=True)
    assert np.array_equal(mem.arrays(7)["forces"], ds.arrays(7)["forces"])


def test_incremental_appends_equal_one_write(tmp_path: Path) -> None:
    """Appending frames and systems in several calls gives the same file content as one call
    (offsets continue across appends); files are chunked and gzip-compressed."""
    images = _images(9, seed=1)
    one = write_dataset(tmp_path / "one.h5", _batch(images), _systems(5))
    with DatasetWriter(tmp_path / "many.h5") as writer:
        full = _batch(images)
        table = _systems(5)
        for (lo, hi), rows in zip(((0, 4), (4, 5), (5, 9)), ((0, 2), None, (2, 5)), strict=True):
            part = FrameBatch.from_atoms(
                images[lo:hi],
                system=full.system[lo:hi],
                step=full.step[lo:hi],
                kind=full.kind[lo:hi],
            )
            systems = {k: v[rows[0] : rows[1]] for k, v in table.items()} if rows else None
            writer.append(part, systems)
    with h5py.File(one) as a, h5py.File(writer.path) as b:
        for name in a["frames"]:
            assert np.array_equal(a["frames"][name][()], b["frames"][name][()]), name
            assert b["frames"][name].compression == "gzip"
            assert b["frames"][name].chunks is not None
        for name in a["systems"]:
            assert np.array_equal(a["systems"][name][()], b["systems"][name][()]), name


def test_interrupted_write_keeps_the_previous_file(tmp_path: Path) -> None:
    """An exception in the middle of a write (after part of the data went to disk) leaves no
    temporary or partial file and the previous file at the path intact and readable."""
    path = tmp_path / "data.h5"
    write_dataset(path, _batch(_images(4)), attrs={"version": "old"})
    before = path.read_bytes()
    images = _images(6, seed=2)
    with pytest.raises(RuntimeError, match="interrupted"), DatasetWriter(path, {"v": "new"}) as w:
        w.append(_batch(images[:3]))
        raise RuntimeError("interrupted")
    bad = _batch(images[3:])
    bad.forces = bad.forces[:-1]  # fails the shape check of the second append
    with pytest.raises(ValueError, match="forces"), DatasetWriter(path) as w:
        w.append(_batch(images[:3]))
        w.append(bad)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.h5"]
    ds = open_dataset(path)
    assert ds.attrs["version"] == "old" and len(ds) == 4


def test_failing_h5py_write_mid_append(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure inside h5py while datasets are being resized and filled (simulated by
    making the forces dataset's write raise) discards the temporary file; no file appears."""
    path = tmp_path / "new.h5"
    real_setitem = h5py.Dataset.__setitem__

    def failing_setitem(self: h5py.Dataset, key: object, value: object) -> None:
        if self.name == "/frames/forces":
            raise OSError("disk full")
        real_setitem(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", failing_setitem)
    with pytest.raises(OSError, match="disk full"):
        write_dataset(path, _batch(_images(3)))
    assert list(tmp_path.iterdir()) == []


def test_reader_pickles_for_worker_processes(tmp_path: Path) -> None:
    """A pickled reader (as sent to data-loader workers) reopens the file and reads the same
    frames; a non-store HDF5 file is refused, another file with the command converting it."""
    path = write_dataset(tmp_path / "a.h5", _batch(_images(5)))
    ds = open_dataset(path)
    ds[0]
    copy = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(copy[3].positions, ds[3].positions)
    with h5py.File(tmp_path / "other.h5", "w") as h5:
        h5["x"] = 1
    with pytest.raises(ValueError, match="not a"):
        open_dataset(tmp_path / "other.h5")
    (tmp_path / "user.extxyz").write_text("1\n\nH 0 0 0\n")
    with pytest.raises(ValueError, match=r"forcecalc data convert .*user.extxyz user.h5"):
        open_dataset(tmp_path / "user.extxyz")


def test_stress_is_an_optional_frame_field(tmp_path: Path) -> None:
    """Stress is stored only in files where some frame has one (files without it keep the
    original layout and read without a stress field); appended after stress-less frames, it
    is NaN for those; frames with stress (given as 3x3 or Voigt) read back in Voigt order."""
    images = _images(5, seed=3)
    plain = write_dataset(tmp_path / "plain.h5", _batch(images))
    with h5py.File(plain) as h5:
        assert "stress" not in h5["frames"]
    ds = open_dataset(plain)
    assert "stress" not in ds.frames and "stress" not in ds.arrays(0)
    assert "stress" not in ds[0].calc.results
    voigt = np.arange(6.0) + 1
    images[3].calc.results["stress"] = voigt
    images[4].calc.results["stress"] = np.array([[1.0, 6, 5], [6, 2, 4], [5, 4, 3]])
    with DatasetWriter(tmp_path / "s.h5") as writer:
        writer.append(_batch(images[:3]))
        writer.append(_batch(images[3:]))
    ds = open_dataset(writer.path)
    assert np.isnan(ds.frames["stress"][:3]).all()
    assert np.array_equal(ds.frames["stress"][3:], [voigt, voigt])
    assert np.array_equal(ds[4].get_stress(), voigt) and "stress" not in ds[1].calc.results
    bad = _batch(images[3:])
    bad.stress = np.zeros((2, 9))
    with pytest.raises(ValueError, match="stress"):
        write_dataset(tmp_path / "bad.h5", bad)


def test_non_finite_positions_or_cells_are_refused_naming_the_frame(tmp_path: Path) -> None:
    """A frame with NaN or infinite positions or cell is refused with a ValueError naming its
    index in the file, its formula and the problem; nothing is written (a previous file is
    kept); non-finite labels are stored (the reader takes them for missing ones)."""
    images = _images(4, seed=4)
    path = write_dataset(tmp_path / "a.h5", _batch(images))
    before = path.read_bytes()
    nan_position = [a.copy() for a in images]
    for copy, atoms in zip(nan_position, images, strict=True):
        copy.calc = atoms.calc
    nan_position[2].positions[1, 0] = np.nan
    formula = nan_position[2].get_chemical_formula()
    with pytest.raises(ValueError, match=rf"frame 2 \({formula}\) .*positions hold NaN or inf"):
        write_dataset(path, FrameBatch.from_atoms(nan_position))
    inf_cell = _batch(images[:2])
    inf_cell.cell[1, 2, 2] = np.inf
    with (
        pytest.raises(ValueError, match=r"frame 5 .*cell holds NaN or inf"),
        DatasetWriter(path) as writer,
    ):
        writer.append(_batch(images))
        writer.append(inf_cell)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5"]
    unknown = _batch(images)
    unknown.energy[:] = np.nan
    unknown.forces[-1] = np.inf
    assert len(open_dataset(write_dataset(tmp_path / "b.h5", unknown))) == 4


def test_atomic_numbers_of_no_element_are_refused(tmp_path: Path) -> None:
    """An atomic number outside 0-118 (which the ``uint8`` field would wrap: 300 -> 44, Ru)
    is refused naming the frame and the number, before anything is written."""
    batch = _batch(_images(3, seed=5))
    natoms = np.asarray(batch.natoms)
    batch.numbers[int(natoms[0]) + 1] = 300
    with pytest.raises(ValueError, match=r"frame 1 .*one of no element \(\[300\]\)"):
        write_dataset(tmp_path / "a.h5", batch)
    assert list(tmp_path.iterdir()) == []


def test_non_scalar_attributes_round_trip_as_json(tmp_path: Path) -> None:
    """Attributes that are not strings, numbers or booleans (lists, dicts, None, numpy
    arrays) are stored as JSON text and read back decoded; strings that hold JSON stay
    strings; the store's own attribute names are refused."""
    attrs = {
        "default_columns": ["id", "formula"],
        "key_descriptions": {"foo": ["Foo", "A foo", "eV"]},
        "none": None,
        "array": np.arange(3),
        "config": '{"a": 1}',
        "seed": 3,
    }
    ds = open_dataset(write_dataset(tmp_path / "a.h5", _batch(_images(2)), attrs=attrs))
    assert ds.attrs["default_columns"] == ["id", "formula"]
    assert ds.attrs["key_descriptions"] == {"foo": ["Foo", "A foo", "eV"]}
    assert ds.attrs["none"] is None and ds.attrs["array"] == [0, 1, 2]
    assert ds.attrs["config"] == '{"a": 1}' and ds.attrs["seed"] == 3
    assert "json_attrs" not in ds.attrs
    for key in ("n_frames", "json_attrs"):
        with pytest.raises(ValueError, match="reserved"):
            write_dataset(tmp_path / "b.h5", _batch(_images(2)), attrs={key: 1})
    assert not (tmp_path / "b.h5").exists()


def test_from_atoms_warns_once_about_what_the_store_drops(tmp_path: Path) -> None:
    """``FrameBatch.from_atoms`` (so ``write_dataset``) warns, in one warning per call that
    names each kind once however many frames carry it, about ``info`` keys, per-atom arrays
    (momenta), constraints other than FixAtoms and calculator results the store has no
    place for; frames with nothing of that give no warning."""
    images = _images(3, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FrameBatch.from_atoms(images)
    for atoms in images:
        atoms.info["note"] = "x"
        atoms.set_momenta(np.ones((len(atoms), 3)))
        atoms.set_constraint([*atoms.constraints, FixBondLength(0, 1)])
        atoms.calc.results["magmom"] = 1.0
    with pytest.warns(UserWarning, match="no place for") as record:
        write_dataset(tmp_path / "a.h5", FrameBatch.from_atoms(images))
    assert len(record) == 1
    message = str(record[0].message)
    for name in ("info['note']", "'momenta'", "FixBondLength", "'magmom'"):
        assert message.count(name) == 1, name
    assert len(open_dataset(tmp_path / "a.h5")) == 3


def test_missing_labels_are_found_by_frame_across_atom_blocks(tmp_path: Path) -> None:
    """``Dataset.missing_labels`` marks exactly the frames whose stored energy, and those whose
    stored forces (any component of any atom), are NaN or inf, whatever the block of atoms
    the forces are read in."""
    batch = _batch(_images(5, seed=6))
    natoms = np.asarray(batch.natoms)
    batch.energy[1] = np.nan
    batch.forces[int(natoms[:3].sum()) + 2, 1] = np.inf  # frame 3, its third atom
    batch.forces[int(natoms.sum()) - 1, 0] = np.nan  # the last atom of frame 4
    with open_dataset(write_dataset(tmp_path / "a.h5", batch)) as dataset:
        for block in (1, 3, 1 << 20):
            energy, forces = dataset.missing_labels(atom_block=block)
            assert energy.tolist() == [False, True, False, False, False]
            assert forces.tolist() == [False, False, False, True, True]
