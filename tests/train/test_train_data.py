"""Training data: every source reads the same frames, splits, collation, weights, batch plans."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write
from train_fixtures import one_thread, training_frames  # noqa: F401

from forcecalc.train.data import (
    AseDbFrames,
    AseFileFrames,
    BatchPlan,
    Collater,
    ExtxyzFrames,
    TrajectoryFrames,
    atom_weights,
    frame_targets,
    labelled_numbers,
    open_frames,
    open_source,
    random_split,
    shard,
)


def _same_frame(a, b, atol: float = 1e-6) -> None:
    np.testing.assert_allclose(a.positions, b.positions, atol=atol)
    np.testing.assert_array_equal(a.numbers, b.numbers)
    np.testing.assert_allclose(a.cell.array, b.cell.array, atol=atol)
    np.testing.assert_array_equal(a.pbc, b.pbc)
    np.testing.assert_array_equal(a.get_tags(), b.get_tags())
    energy_a, forces_a = frame_targets(a)
    energy_b, forces_b = frame_targets(b)
    assert energy_a == pytest.approx(energy_b, abs=1e-6)
    np.testing.assert_allclose(forces_a, forces_b, atol=1e-5)
    from forcecalc.graph.batch import fixed_mask

    np.testing.assert_array_equal(fixed_mask(a), fixed_mask(b))


@pytest.mark.parametrize("suffix", [".extxyz", ".db", ".traj", ".h5"])
def test_every_file_source_gives_the_frames_back(tmp_path, suffix):
    """extxyz (lazily indexed), ASE db, ASE trajectory and our HDF5 give back each frame's
    positions, cell, pbc, tags, FixAtoms, energy and forces (forces on fixed atoms included), in
    any access order."""
    frames = training_frames()[:5]
    path = tmp_path / f"frames{suffix}"
    if suffix == ".h5":
        import forcecalc.data as data

        data.write_dataset(path, data.FrameBatch.from_atoms(frames))
    elif suffix == ".db":
        from ase.db import connect

        with connect(path) as db:
            for atoms in frames:
                db.write(atoms)
    else:
        write(path, frames)
    source = open_source(path)
    expected_type = {".extxyz": ExtxyzFrames, ".db": AseDbFrames, ".traj": TrajectoryFrames}
    if suffix in expected_type:
        assert isinstance(source, expected_type[suffix])
    assert len(source) == 5
    for index in (3, 0, 4, 1):
        _same_frame(source[index], frames[index])


def test_other_ase_formats_and_concatenation(tmp_path):
    """Any other file ASE reads is read whole on first access; several sources concatenate in
    order, and ``locate`` names the source of each frame."""
    frames = training_frames()
    write(tmp_path / "a.extxyz", frames[:3])
    write(tmp_path / "b.json", frames[3:5], format="json")
    source = open_source(tmp_path / "b.json")
    assert isinstance(source, AseFileFrames)
    both = open_frames([tmp_path / "a.extxyz", tmp_path / "b.json"])
    assert len(both) == 5
    assert both.locate(4) == (1, 1)
    _same_frame(both[4], frames[4])
    in_memory = open_frames(frames[:2])
    assert len(in_memory) == 2 and in_memory[1] is frames[1]
    with pytest.raises(FileNotFoundError):
        open_frames([tmp_path / "missing.extxyz"])


def test_a_frame_that_cannot_be_parsed_is_named(tmp_path):
    """A frame whose body is broken (its comment line, which opening the file checks, is fine)
    is an error naming the file and the frame when it is read, not the parser's bare error;
    a file read whole names the file."""
    frames = training_frames()[:3]
    write(tmp_path / "frames.extxyz", frames)
    lines = (tmp_path / "frames.extxyz").read_text().splitlines()
    second = len(frames[0]) + 2 + 2  # the first atom line of frame 1
    lines[second] = "Cu not-a-number 0.0 0.0"
    (tmp_path / "frames.extxyz").write_text("\n".join(lines) + "\n")
    source = open_source(tmp_path / "frames.extxyz")
    _same_frame(source[0], frames[0])
    with pytest.raises(ValueError, match=r"frames.extxyz: frame 1 cannot be read"):
        source[1]
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"cannot read .*broken.json"):
        len(open_source(tmp_path / "broken.json"))


def test_unlabelled_frame_is_named():
    """A frame without energy or forces is an error naming the frame and what is missing."""
    atoms = training_frames()[0].copy()
    with pytest.raises(ValueError, match=r"frame 7 .* no energy"):
        frame_targets(atoms, 7)


def test_random_split_is_seeded_disjoint_and_complete():
    """The random split is a function of the seed, its parts are disjoint and cover all frames,
    a positive fraction holds out at least one frame of two or more, and never every frame
    (a single frame with ``val_fraction`` 0.6 left none to train on: an unclear error)."""
    frames = list(range(20))
    train, val = random_split(frames, 0.2, seed=3)
    again, _ = random_split(frames, 0.2, seed=3)
    other, _ = random_split(frames, 0.2, seed=4)
    assert len(val) == 4 and len(train) == 16
    assert sorted([*train, *val]) == frames
    assert list(train) == list(again) and list(train) != list(other)
    assert len(random_split(frames, 0.01, seed=0)[1]) == 1
    for fraction in (0.6, 0.99):  # a frame is always left to train on
        assert [len(part) for part in random_split(frames[:1], fraction, seed=0)] == [1, 0]
        assert [len(part) for part in random_split(frames[:2], fraction, seed=0)] == [1, 1]


def test_collate_builds_graph_and_targets():
    """The collate function returns the neighbor graph of the frames (float64) and their
    targets: ``energy [n_systems]``, ``forces [n_atoms, 3]``, the frame indices; moved to a
    float32 model, the labels are float32 and the positions stay float64, as every inference
    path gives them."""
    frames = training_frames()[:3]
    batch = Collater(cutoff=4.0)([(5, frames[0]), (9, frames[1]), (2, frames[2])])
    assert batch.graph.n_systems == 3 and batch.graph.n_atoms == 27
    assert batch.graph.n_edges > 0 and batch.graph.positions.dtype == torch.float64
    assert batch.index.tolist() == [5, 9, 2]
    np.testing.assert_allclose(batch.energy.numpy(), [frame_targets(a)[0] for a in frames])
    np.testing.assert_allclose(batch.forces[9:18].numpy(), frame_targets(frames[1])[1])
    assert batch.graph.fixed.sum() == 12
    moved = batch.to("cpu", torch.float32)  # labels in the model's dtype, geometry float64
    assert moved.forces.dtype == torch.float32 and moved.energy.dtype == torch.float32
    assert moved.graph.positions.dtype == torch.float64 and moved.graph.cell.dtype == torch.float64


def test_atom_weights_from_fixatoms_or_tags():
    """Force-loss weights: 1 for free atoms and ``fixed_weight`` for FixAtoms atoms, or per OC20
    tag when ``tag_weights`` is given."""
    graph = Collater(cutoff=4.0)([(0, training_frames()[0])]).graph
    weights = atom_weights(graph, 0.05, None)
    assert torch.equal(weights[graph.fixed], torch.full((4,), 0.05, dtype=torch.float64))
    assert torch.equal(weights[~graph.fixed], torch.ones(5, dtype=torch.float64))
    by_tag = atom_weights(graph, 0.05, [0.0, 1.0, 2.0])
    assert by_tag[-1] == 0.0  # the adsorbate has tag 0 in ASE's numbering
    assert torch.equal(by_tag[:4], torch.full((4,), 2.0, dtype=torch.float64))  # bottom: tag 2


def test_batch_plan_splits_global_batches_over_ranks():
    """Each step's global batch is the same for any number of processes (ranks take disjoint
    slices of it, covering it); epochs reshuffle; the last short batch is split as evenly as
    possible; ``start`` resumes inside an epoch."""
    single = BatchPlan(23, batch_size=6, seed=1, world_size=1)
    ranks = [BatchPlan(23, batch_size=3, seed=1, rank=r, world_size=2) for r in range(2)]
    expected = list(single)
    parts = [list(plan) for plan in ranks]
    assert len(expected) == len(parts[0]) == len(parts[1]) == 4
    for step, batch in enumerate(expected):
        assert parts[0][step] + parts[1][step] == batch
    assert [len(p) for p in (parts[0][-1], parts[1][-1])] == [3, 2]
    single.set_epoch(1)
    assert list(single) != expected
    single.set_epoch(0, start=2)
    assert list(single) == expected[2:] and len(single) == 2
    assert list(BatchPlan(3, 1, world_size=2).global_batches(0))[-1].size == 2  # 1 left: dropped
    assert [list(shard(10, r, 3)) for r in range(3)] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def _partly_labelled(frames: list, index: int, missing: str) -> list:
    """Copies of ``frames`` in which frame ``index`` lacks its ``missing`` label."""
    out = []
    for k, atoms in enumerate(frames):
        energy, forces = frame_targets(atoms)
        labels = {"energy": energy, "forces": forces}
        if k == index:
            del labels[missing]
        copy = atoms.copy()
        copy.calc = SinglePointCalculator(copy, **labels)
        out.append(copy)
    return out


def _write(path, frames: list) -> None:
    if path.suffix == ".h5":
        import forcecalc.data as data

        data.write_dataset(path, data.FrameBatch.from_atoms(frames))
    elif path.suffix == ".db":
        from ase.db import connect

        with connect(path) as db:
            for atoms in frames:
                db.write(atoms)
    else:
        write(path, frames, format="json" if path.suffix == ".json" else None)


@pytest.mark.parametrize("missing", ["energy", "forces"])
@pytest.mark.parametrize("suffix", [".extxyz", ".db", ".traj", ".h5", ".json"])
def test_unlabelled_frames_are_found_when_the_data_is_opened(tmp_path, suffix, missing):
    """Every frame's labels are checked before training: a frame without energy or forces is
    an error naming its file and its index within that file (not within the concatenated or
    split data), and what it lacks; labelled data gives its atomic numbers per file."""
    frames = training_frames()[:4]
    good = tmp_path / "good.extxyz"
    write(good, frames[:3])
    bad = tmp_path / f"bad{suffix}"
    _write(bad, _partly_labelled(frames, 2, missing))
    opened = open_frames([good, bad])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(bad))}: frame 2\b.* no {missing}"):
        labelled_numbers(opened)
    fine = tmp_path / f"fine{suffix}"
    _write(fine, frames)
    assert labelled_numbers(open_frames([good, fine])) == {str(good): {8, 29}, str(fine): {8, 29}}


@pytest.mark.parametrize("label", ["energy", "forces"])
@pytest.mark.parametrize("suffix", [".extxyz", ".db", ".traj", ".h5", ".json"])
def test_labels_that_are_not_finite_are_found_when_the_data_is_opened(tmp_path, suffix, label):
    """A frame whose energy is NaN or one of whose forces is inf is an error when the data is
    opened, before training, naming its file and its index within that file (extended XYZ
    and ASE db, whose frames are not read then, included); HDF5 and sqlite store such a
    label as none, and the error says it is missing."""
    frames = training_frames()[:4]
    good = tmp_path / "good.extxyz"
    write(good, frames[:3])
    labelled = []
    for k, atoms in enumerate(frames):
        energy, forces = frame_targets(atoms)
        if k == 2 and label == "energy":
            energy = float("nan")
        elif k == 2:
            forces = forces.copy()
            forces[3, 1] = np.inf
        copy = atoms.copy()
        copy.calc = SinglePointCalculator(copy, energy=energy, forces=forces)
        labelled.append(copy)
    bad = tmp_path / f"bad{suffix}"
    _write(bad, labelled)
    expected = rf"^{re.escape(str(bad))}: frame 2\b.*({label} not finite|no {label})"
    with pytest.raises(ValueError, match=expected):
        labelled_numbers(open_frames([good, bad]))


def test_an_energy_that_is_no_number_is_named_with_its_frame(tmp_path):
    """An extended XYZ energy that is text (``energy=abc2.5``, which ASE's reader keeps as a
    string) is an error naming the file and the frame when the data is opened, and when the
    frame is read (a TypeError traceback from the label check, before)."""
    path = tmp_path / "frames.extxyz"
    write(path, training_frames()[:3])
    lines = path.read_text().splitlines(keepends=True)
    second = len(training_frames()[0]) + 2 + 1  # the comment line of frame 1
    lines[second] = re.sub(r"energy=\S+", "energy=abc2.5", lines[second])
    path.write_text("".join(lines))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: frame 1: the energy 'abc2.5'"):
        labelled_numbers(open_frames([path]))
    with pytest.raises(ValueError, match=r"^frame 1 \(Cu8O\): the energy 'abc2.5' is not a number"):
        frame_targets(ExtxyzFrames(path)[1], 1)


def test_labels_of_other_positions_are_refused():
    """A frame whose atoms moved after their energy and forces were computed carries labels
    of another structure: an error naming the frame and what changed (as
    ``atoms.get_potential_energy()`` refuses them), where they were trained on silently."""
    frame = training_frames()[0]
    moved = frame.copy()
    moved.calc = frame.calc  # the labels of ``frame``, attached to moved atoms
    moved.positions[3, 2] += 0.3
    with pytest.raises(
        ValueError, match=r"^frame 5 \(Cu8O\): its labels are of other atoms .*positions"
    ):
        frame_targets(moved, 5)
    with pytest.raises(ValueError, match=r"frame 1 .*its labels are of other atoms"):
        labelled_numbers([frame, moved])
    assert frame_targets(frame)[0] == frame.get_potential_energy()
