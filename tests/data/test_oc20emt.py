"""The OC20-EMT generator: determinism, OC20 conventions, energy meaning, OOD splits."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import ase.io
import h5py
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.emt import EMT

from forcecalc.cli import main
from forcecalc.data import oc20emt, open_dataset
from forcecalc.data.oc20emt import (
    ADSORBATES,
    FACETS,
    FRAME_KINDS,
    METALS,
    SIZES,
    SPLITS,
    STOICHIOMETRIES,
    TEST_SPLITS,
    Bulk,
    DatasetWriter,
    SystemSpec,
    SystemTask,
    _draw_spec,
    build_slab,
    emt_lattice_constants,
    find_sites,
    gas_references,
    generate,
    is2rs_inputs,
    plan_splits,
)

SEED = 7


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The ``tiny`` data set generated in this process (its speed: benchmarks/oc20emt.py)."""
    return generate("tiny", tmp_path_factory.mktemp("tiny1"), seed=SEED, workers=1, progress=False)


def _file_content(path: Path) -> dict[str, object]:
    """Every dataset and attribute of an HDF5 file, as numpy values."""
    out: dict[str, object] = {}
    with h5py.File(path, "r") as h5:
        out.update({f"@{k}": v for k, v in h5.attrs.items()})
        h5.visititems(
            lambda name, obj: (
                out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
            )
        )
    return out


def test_tiny_is_deterministic_across_worker_counts(tiny: dict[str, Path], tmp_path: Path) -> None:
    """``tiny`` writes one file per split, and the same seed gives identical
    HDF5 datasets and attributes with 1 worker (in process) and 2 worker processes."""
    paths = tiny
    assert set(paths) == set(SPLITS)
    other = generate("tiny", tmp_path, seed=SEED, workers=2, progress=False)
    for split in SPLITS:
        a, b = _file_content(paths[split]), _file_content(other[split])
        assert a.keys() == b.keys()
        for key, value in a.items():
            assert np.array_equal(np.asarray(value), np.asarray(b[key])), (split, key)
            assert np.asarray(value).dtype == np.asarray(b[key]).dtype, (split, key)


def test_is2rs_inputs_are_the_stored_initial_frames(tiny: dict[str, Path], tmp_path: Path) -> None:
    """``is2rs_inputs`` rebuilds the test splits' initial structures without their frames:
    the same atoms, cell, positions, tags and FixAtoms as the initial frames ``generate``
    stored, in data-set order, with the system's id and split in ``info``; the ``data is2rs``
    command writes them to extxyz, which keeps all of that."""
    paths = tiny
    inputs = is2rs_inputs("tiny", SEED)
    stored = [
        (split, s, open_dataset(paths[split]).initial(s))
        for split in TEST_SPLITS
        for s in range(SIZES["tiny"].systems[split])
    ]
    assert len(inputs) == len(stored)
    for atoms, (split, system, initial) in zip(inputs, stored, strict=True):
        assert atoms.info["split"] == split
        assert atoms.info["sid"] == int(open_dataset(paths[split]).systems["sid"][system])
        assert np.array_equal(atoms.numbers, initial.numbers)
        assert np.array_equal(atoms.positions, initial.positions)
        assert np.array_equal(atoms.cell[:], initial.cell[:])
        assert np.array_equal(atoms.get_tags(), initial.get_tags())
        assert atoms.constraints[0].index.tolist() == initial.constraints[0].index.tolist()
    out = tmp_path / "is2rs.extxyz"
    assert (
        main(
            [
                "data",
                "is2rs",
                "--size",
                "tiny",
                "--seed",
                str(SEED),
                "--out",
                str(out),
                "--splits",
                "test_id",
                "test_ood_cat",
                "--workers",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    read = ase.io.read(out, ":")
    assert [a.info["split"] for a in read] == ["test_id", "test_ood_cat"]
    assert np.allclose(read[1].positions, inputs[2].positions, atol=1e-7)
    assert read[1].constraints[0].index.tolist() == inputs[2].constraints[0].index.tolist()
    assert np.array_equal(read[1].get_tags(), inputs[2].get_tags())
    with pytest.raises(ValueError, match="unknown split"):
        is2rs_inputs("tiny", SEED, splits=["test"])
    with pytest.raises(ValueError, match="unknown OC20-EMT size 'huge'"):
        is2rs_inputs("huge", SEED)


def test_a_different_seed_gives_a_different_plan() -> None:
    """The seed matters: another seed holds out other adsorbates or element pairs."""
    assert plan_splits(SEED) != plan_splits(SEED + 1)


def test_conventions_and_energy_meaning(tiny: dict[str, Path]) -> None:
    """OC20 conventions hold (pbc on all axes, tags 0/1/2, FixAtoms exactly on tag 0, >= 10 Å
    of vacuum above the adsorbate, EMT elements only) and every stored energy is
    E_EMT - e_slab - e_ref with the stored forces the unconstrained EMT forces."""
    paths = tiny
    refs = gas_references()
    for split, path in paths.items():
        with open_dataset(path) as ds:
            assert ds.attrs["split"] == split
            assert len(ds) > 0 and ds.n_systems == SIZES["tiny"].systems[split]
            kinds = set(ds.frames["kind"].tolist())
            assert kinds == set(range(len(FRAME_KINDS)))
            for i in np.linspace(0, len(ds) - 1, 5).astype(int):
                atoms = ds[int(i)]
                row = {k: v[atoms.info["system"]] for k, v in ds.systems.items()}
                tags = atoms.get_tags()
                assert atoms.pbc.all()
                assert set(tags.tolist()) == {0, 1, 2}
                fixed = np.zeros(len(atoms), bool)
                fixed[atoms.constraints[0].index] = True
                assert np.array_equal(fixed, tags == 0)
                assert set(atoms.get_chemical_symbols()) <= {*METALS, "H", "C", "N", "O"}
                z = atoms.positions[:, 2]
                assert atoms.cell[2, 2] - (z.max() - z.min()) >= 10.0
                ads = atoms[tags == 2]
                assert sorted(ads.get_chemical_symbols()) == sorted(
                    Atoms(ADSORBATES[row["adsorbate"]][0]).get_chemical_symbols()
                )
                e_ref = sum(refs[s] for s in ads.get_chemical_symbols())
                assert row["e_ref"] == pytest.approx(e_ref, abs=1e-12)
                stored_e = atoms.get_potential_energy()
                stored_f = atoms.get_forces(apply_constraint=False)
                emt = atoms.copy()
                emt.calc = EMT()
                e_total = emt.get_potential_energy()
                assert stored_e == pytest.approx(e_total - row["e_slab"] - e_ref, abs=1e-9)
                f_emt = emt.get_forces(apply_constraint=False)
                np.testing.assert_allclose(stored_f, f_emt, atol=1e-5, rtol=1e-5)
                assert np.abs(atoms.get_forces()[fixed]).max() == 0.0


def test_relaxation_systems_table(tiny: dict[str, Path]) -> None:
    """Each system's initial frame is relaxation step 0 and its relaxed frame the last
    relaxation step, with ``relaxed_energy`` that frame's energy (IS2RS/IS2RE targets); each
    system also has its rattled and MD frames."""
    paths = tiny
    for path in paths.values():
        with open_dataset(path) as ds:
            for s in range(ds.n_systems):
                i0, i1 = ds.systems["initial_frame"][s], ds.systems["relaxed_frame"][s]
                assert ds.frames["kind"][i0] == ds.frames["kind"][i1] == 0
                assert ds.frames["step"][i0] == 0
                assert ds.frames["step"][i1] == ds.systems["n_relax_steps"][s]
                assert ds.frames["system"][i0] == ds.frames["system"][i1] == s
                relaxed = ds.relaxed(s)
                assert relaxed.get_potential_energy() == ds.systems["relaxed_energy"][s]
                assert np.array_equal(relaxed.numbers, ds.initial(s).numbers)
                kinds = ds.frames["kind"][ds.frames["system"] == s]
                assert (kinds == 1).sum() == SIZES["tiny"].n_rattled
                assert (kinds == 2).sum() == SIZES["tiny"].n_md


def test_ood_splits_exclude_what_they_claim(tiny: dict[str, Path]) -> None:
    """OOD-ads splits use only held-out adsorbates, never in train; OOD-cat splits use only
    alloys of held-out element pairs, whose pairs (any composition, ordering, facet) never
    appear in train; checked on the tiny files and on 400 drawn systems per split."""
    paths = tiny
    plan = plan_splits(SEED)
    assert set(plan.ood_adsorbates).isdisjoint(plan.id_adsorbates)
    assert set(plan.ood_pairs).isdisjoint(plan.id_pairs)
    assert {"H", "C", "N", "O"} <= {
        s for a in plan.id_adsorbates for s in Atoms(ADSORBATES[a][0]).get_chemical_symbols()
    }

    def pair(bulk_name: str) -> tuple[str, ...]:
        return tuple(sorted(set(Atoms(bulk_name.split(":")[0]).get_chemical_symbols())))

    drawn: dict[str, tuple[set[str], set[tuple[str, ...]], set[tuple[str, str]]]] = {}
    for split in SPLITS:
        task = SystemTask(0, split, SEED, SIZES["small"], plan, {}, {})
        specs = [_draw_spec(np.random.default_rng(k), split, task) for k in range(400)]
        with open_dataset(paths[split]) as ds:
            ads = set(ds.systems["adsorbate"]) | {s.adsorbate for s in specs}
            pairs = {pair(b) for b in ds.systems["bulk"]} | {s.bulk.elements for s in specs}
            cats = set(zip(ds.systems["bulk"], ds.systems["facet"], strict=True))
            cats |= {(s.bulk.name, s.facet) for s in specs}
        drawn[split] = (ads, pairs, cats)
    train_ads, train_pairs, train_cats = drawn["train"]
    assert train_ads <= set(plan.id_adsorbates)
    for split in ("test_ood_ads", "test_ood_both"):
        assert drawn[split][0] <= set(plan.ood_adsorbates)
        assert drawn[split][0].isdisjoint(train_ads)
    for split in ("val_id", "test_id", "test_ood_cat"):
        assert drawn[split][0] <= set(plan.id_adsorbates)
    for split in ("test_ood_cat", "test_ood_both"):
        assert all(len(p) == 2 for p in drawn[split][1])
        assert drawn[split][1] <= set(plan.ood_pairs)
        assert drawn[split][1].isdisjoint(train_pairs)
        assert drawn[split][2].isdisjoint(train_cats)
    for split in ("val_id", "test_id", "test_ood_ads"):
        assert {p for p in drawn[split][1] if len(p) == 2} <= set(plan.id_pairs)


def test_catalog_and_slabs() -> None:
    """At least 20 adsorbates of H, C, N, O with the binding atom first at the origin; every
    facet, metal, alloy kind, layer count and termination gives a slab of whole layers (24-48
    atoms for the smallest repeats tested here), with both elements of an alloy present
    (random alloys in the exact ratio, as these slab sizes are multiples of 4), tags 1 on the
    layers above the bottom two and FixAtoms on those."""
    assert len(ADSORBATES) >= 20
    for symbols, positions in ADSORBATES.values():
        assert set(Atoms(symbols).get_chemical_symbols()) <= {"H", "C", "N", "O"}
        assert positions[0] == (0, 0, 0) and len(positions) == len(Atoms(symbols))
    lattice = emt_lattice_constants()
    assert lattice["Cu"] == pytest.approx(3.59, abs=0.01)
    rng = np.random.default_rng(0)
    per_layer = {"(111)": 4, "(100)": 2, "(110)": 2, "(211)": 6}
    repeats = {"(111)": (2, 1), "(100)": (2, 2), "(110)": (2, 2), "(211)": (1, 2)}
    bulks = [Bulk((m,)) for m in METALS] + [
        Bulk(("Au", "Cu"), "A3B", "L12"),
        Bulk(("Al", "Pt"), "AB", "L10"),
        Bulk(("Ni", "Pt"), "AB3", "random"),
    ]
    for facet, bulk, layers, termination in itertools.product(FACETS, bulks, (3, 4), (0, 1)):
        repeat = repeats[facet]
        spec = SystemSpec("CO", bulk, facet, layers, repeat, termination, "top")
        slab = build_slab(spec, lattice, rng)
        n_layer = per_layer[facet] * repeat[0] * repeat[1]
        assert len(slab) == n_layer * layers and 20 <= len(slab) <= 60, (spec, len(slab))
        tags = slab.get_tags()
        assert (tags == 1).sum() == n_layer * (layers - 2) and set(tags.tolist()) == {0, 1}
        assert slab.positions[tags == 1, 2].min() > slab.positions[tags == 0, 2].max()
        assert np.array_equal(np.sort(slab.constraints[0].index), np.flatnonzero(tags == 0))
        if len(bulk.elements) == 2:
            n_a, n_b, _ = STOICHIOMETRIES[bulk.stoichiometry]
            counts = [slab.get_chemical_symbols().count(e) for e in bulk.elements]
            assert min(counts) > 0
            if bulk.ordering == "random":
                assert counts[0] * n_b == counts[1] * n_a, (facet, bulk, counts)


def test_sites_of_flat_facets() -> None:
    """Site finding counts each site once: per surface atom, fcc(111) has 1 top, 3 bridge and
    2 threefold hollow sites, fcc(100) 1 top, 2 bridge and 1 fourfold hollow site."""
    lattice = emt_lattice_constants()
    for facet, repeat, per_atom in (("(111)", (2, 2), (1, 3, 2)), ("(100)", (3, 3), (1, 2, 1))):
        spec = SystemSpec("O", Bulk(("Pt",)), facet, 3, repeat, 0, "top")
        slab = build_slab(spec, lattice, np.random.default_rng(0))
        n_top = int((slab.get_tags() == 1).sum())
        sites = find_sites(slab, facet, lattice["Pt"])
        counts = tuple(len(sites[k]) // n_top for k in ("top", "bridge", "hollow"))
        assert counts == per_atom and all(len(v) % n_top == 0 for v in sites.values())


def _seeds(folder: Path) -> dict[str, int]:
    """The ``seed`` attribute of each split file in ``folder``, by file name."""
    return {p.name: open_dataset(p).attrs["seed"] for p in sorted(folder.glob("*.h5"))}


def test_an_interrupted_regeneration_never_mixes_two_data_sets(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regenerating into a folder that holds a data set, interrupted after the first new split
    file is complete, leaves the old set byte for byte, other files alone, and no temporary
    file or folder, and removes what killed runs left (``.<split>.h5.*.tmp`` files, hidden
    staging folders); interrupted while the new files are moved in, it leaves only new split
    files (some missing), none of the old set."""
    out = tmp_path / "data"
    out.mkdir()
    for path in tiny.values():
        shutil.copy(path, out / path.name)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "notes.txt").write_text("mine")
    (out / ".train.h5.0123456789ab.tmp").write_bytes(b"killed run")
    (out / ".oc20emt.killed.tmp").mkdir()
    (out / ".oc20emt.killed.tmp" / "val_id.h5").write_bytes(b"killed run")
    real_close = DatasetWriter.close

    def interrupt_after_train(writer: DatasetWriter) -> Path:
        if writer.path.name != "train.h5":
            raise KeyboardInterrupt
        return real_close(writer)

    monkeypatch.setattr(DatasetWriter, "close", interrupt_after_train)
    with pytest.raises(KeyboardInterrupt):
        generate("tiny", out, seed=SEED + 1, workers=1, progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted([*before, "notes.txt"])
    assert {name: (out / name).read_bytes() for name in before} == before
    monkeypatch.undo()
    moved: list[Path] = []
    real_commit = oc20emt.commit_file

    def interrupt_third_move(tmp: Path, path: Path) -> None:
        if len(moved) == 2:
            raise KeyboardInterrupt
        moved.append(path)
        real_commit(tmp, path)

    monkeypatch.setattr(oc20emt, "commit_file", interrupt_third_move)
    with pytest.raises(KeyboardInterrupt):
        generate("tiny", out, seed=SEED + 1, workers=1, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "train.h5", "val_id.h5"]
    assert _seeds(out) == {"train.h5": SEED + 1, "val_id.h5": SEED + 1}


def test_a_negative_seed_is_refused_by_name_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A negative seed is refused naming the seed (``generate``, ``is2rs_inputs``, and the
    ``data oc20emt`` / ``data is2rs`` commands, as a usage error; so are fewer than one
    worker), and no output folder is made; an output folder under a file is named."""
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        generate("tiny", tmp_path / "out", seed=-1, progress=False)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        is2rs_inputs("tiny", -1)
    for command in (["oc20emt", "--out", str(tmp_path / "out")], ["is2rs", "--out", "x.xyz"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["data", *command, "--size", "tiny", "--seed", "-1"])
        assert exit_info.value.code == 2
        assert "--seed: must be a non-negative integer, got '-1'" in capsys.readouterr().err
        with pytest.raises(SystemExit) as exit_info:  # 0 or fewer processes: ran serially
            main(["data", *command, "--size", "tiny", "--workers", "0"])
        assert exit_info.value.code == 2
        assert "--workers: must be a positive integer, got '0'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match=r"cannot make --out .*/sub: .*afile is a file"):
        generate("tiny", tmp_path / "afile" / "sub", progress=False)


def test_is2rs_writes_the_format_of_its_output_name_and_checks_it_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``data is2rs --out X.traj`` writes an ASE trajectory (the format ASE gives the name)
    with the structures' info, tags and FixAtoms; an output that is a folder, under a file or
    in a format that cannot hold the structures is a one-line error before any structure is
    made, and leaves nothing."""
    args = ["data", "is2rs", "--size", "tiny", "--seed", str(SEED), "--splits", "test_id"]
    args += ["--workers", "1", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "in.traj")]) == 0
    (read,) = ase.io.read(tmp_path / "in.traj", ":")
    (want,) = is2rs_inputs("tiny", SEED, ["test_id"])
    assert read.info == want.info and np.array_equal(read.positions, want.positions)
    assert np.array_equal(read.get_tags(), want.get_tags())
    assert read.constraints[0].index.tolist() == want.constraints[0].index.tolist()

    def no_work(*_: object, **__: object) -> None:
        raise AssertionError("structures made before the output was checked")

    monkeypatch.setattr(oc20emt, "is2rs_inputs", no_work)
    (tmp_path / "folder.xyz").mkdir()
    (tmp_path / "file").write_text("")
    capsys.readouterr()
    for out, message in (
        ("folder.xyz", "it is a folder"),
        ("file/in.xyz", "is a file, not a folder"),
        ("in.png", "holds one structure"),
    ):
        assert main([*args, "--splits", "test_id", "test_ood_ads", "--out", str(tmp_path / out)])
        err = capsys.readouterr().err
        assert err.startswith("forcecalc: error: cannot write") and message in err
        assert err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder.xyz", "in.traj"]


def test_slab_sizes_and_random_alloy_counts_are_as_documented() -> None:
    """As benchmarks/oc20emt.md says: ``small`` draws slabs of 24, 32, 36, 48 and 54 atoms
    (its minimum of 20 never binds), ``tiny`` only the smallest repeat of each facet (24 or 36
    atoms: its maximum of 18 is below every slab); random alloys get the nearest whole
    number of atoms (a 54-atom AgPd3 slab: Ag 14, Pd 40)."""
    plan = plan_splits(SEED)
    per_layer = {"(111)": 4, "(100)": 2, "(110)": 2, "(211)": 6}
    sizes: dict[str, set[int]] = {}
    for size in ("tiny", "small"):
        task = SystemTask(0, "train", SEED, SIZES[size], plan, {}, {})
        specs = [_draw_spec(np.random.default_rng(k), "train", task) for k in range(300)]
        sizes[size] = {per_layer[s.facet] * s.repeat[0] * s.repeat[1] * s.layers for s in specs}
    assert sizes == {"tiny": {24, 36}, "small": {24, 32, 36, 48, 54}}
    spec = SystemSpec("O", Bulk(("Ag", "Pd"), "AB3", "random"), "(100)", 3, (3, 3), 0, "top")
    slab = build_slab(spec, emt_lattice_constants(), np.random.default_rng(0))
    assert slab.get_chemical_formula() == "Ag14Pd40"
