"""Checkpoint reading, writing and the errors a user sees for bad files."""

from __future__ import annotations

import collections
import pickle
import re
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
from ocp_fixtures import OCP_DATA, load_ocp_raw

from forcecalc.atomic import torch_save
from forcecalc.checkpoint import (
    CheckpointError,
    Normalizers,
    Potential,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)


def test_ocp_checkpoint_is_read_with_its_normalizers() -> None:
    """OCP's layout: model name, model_attributes and the OC20 normalizers come through."""
    info, state_dict = read_checkpoint(OCP_DATA / "spinconv_small_fc.pt")
    assert info.model == "spinconv" and info.source_format == "ocp"
    assert info.model_kwargs["max_num_neighbors"] == 20
    assert info.normalizers.energy_mean == pytest.approx(-0.7554450631141663)
    assert info.normalizers.energy_std == pytest.approx(2.887317180633545)
    assert info.normalizers.forces_std == pytest.approx(2.887317180633545)
    assert not any(key.startswith("module.") for key in state_dict)


def test_double_module_prefix_is_stripped(tmp_path: Path) -> None:
    """State dicts saved through two DataParallel wrappers ('module.module.') still read."""
    raw = load_ocp_raw("forcenet_small")
    raw["state_dict"] = collections.OrderedDict(
        (f"module.{k}", v) for k, v in raw["state_dict"].items()
    )
    torch.save(raw, tmp_path / "double.pt")
    _, state_dict = read_checkpoint(tmp_path / "double.pt")
    assert "atom_map" in state_dict


@pytest.mark.parametrize("allow_unsafe", [False, True])
def test_truncated_file_names_the_problem(tmp_path: Path, allow_unsafe: bool) -> None:
    """A truncated checkpoint raises CheckpointError saying it is not a PyTorch checkpoint or
    is truncated/corrupt, with or without allow_unsafe."""
    data = (OCP_DATA / "forcenet_small.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt is not a PyTorch checkpoint \(or is"):
        read_checkpoint(tmp_path / "cut.pt", allow_unsafe=allow_unsafe)


#: Files that are no torch checkpoint: name -> content.
JUNK = {
    "byte": b"x",
    "empty": b"",
    "extxyz": (OCP_DATA / "structures.extxyz").read_bytes()[:4096],
    # 'c' is pickle's GLOBAL opcode: torch's weights-only loader reports an unsupported global.
    "text_starting_with_c": b"cell 1 2 3\npositions\n0 0 0\n",
    "plain_pickle": pickle.dumps({"state_dict": {}}, protocol=2),
    "zip_without_data_pkl": b"",
}


def _write_junk(path: Path, name: str) -> None:
    if name == "zip_without_data_pkl":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("model/weights.txt", "1 2 3")
    else:
        path.write_bytes(JUNK[name])


@pytest.mark.parametrize("allow_unsafe", [False, True])
@pytest.mark.parametrize("name", sorted(JUNK))
def test_junk_file_is_not_a_checkpoint(tmp_path: Path, name: str, allow_unsafe: bool) -> None:
    """A file that is no torch checkpoint (a byte, an empty file, an .extxyz, a plain pickle, a
    zip) raises CheckpointError saying so, with or without allow_unsafe, and never advises
    unsafe unpickling."""
    path = tmp_path / f"{name}.pt"
    _write_junk(path, name)
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint") as error:
        read_checkpoint(path, allow_unsafe=allow_unsafe)
    assert str(path) in str(error.value)
    assert "unsafe" not in str(error.value)
    if name != "plain_pickle":  # the others are not laid out as torch.save writes
        assert str(error.value).endswith("nor torch's legacy format")


class _Arbitrary:
    pass


@pytest.mark.parametrize("zip_format", [True, False])
def test_unsafe_pickle_is_refused_unless_allowed(tmp_path: Path, zip_format: bool) -> None:
    """A checkpoint that needs full unpickling (zip or legacy format) is refused by default,
    naming allow_unsafe and the refused global, and loads with allow_unsafe=True."""
    raw = load_ocp_raw("forcenet_small")
    raw["extra"] = _Arbitrary()
    torch.save(raw, tmp_path / "unsafe.pt", _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError, match=r"_Arbitrary.*allow_unsafe=True"):
        read_checkpoint(tmp_path / "unsafe.pt")
    info, _ = read_checkpoint(tmp_path / "unsafe.pt", allow_unsafe=True)
    assert info.model == "forcenet"


def test_unimportable_class_with_allow_unsafe_is_named(tmp_path: Path, monkeypatch) -> None:
    """With allow_unsafe, a torch file that refers to a class no module here defines raises
    CheckpointError saying its code cannot be imported (not that the file is corrupt)."""
    module = types.ModuleType("forcecalc_test_gone")
    module.Gone = type("Gone", (), {"__module__": module.__name__})
    monkeypatch.setitem(sys.modules, module.__name__, module)
    raw = load_ocp_raw("forcenet_small")
    raw["extra"] = module.Gone()
    torch.save(raw, tmp_path / "gone.pt")
    monkeypatch.delitem(sys.modules, module.__name__)
    with pytest.raises(CheckpointError, match=r"gone\.pt holds .* cannot be imported here"):
        read_checkpoint(tmp_path / "gone.pt", allow_unsafe=True)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_checkpoint_weights_only_cannot_parse_gets_the_advice(tmp_path: Path) -> None:
    """A genuine torch file that torch's weights-only loader cannot parse (pickle protocol 4)
    is refused with the allow_unsafe advice, not called corrupt, and loads with it."""
    torch.save(load_ocp_raw("forcenet_small"), tmp_path / "p4.pt", pickle_protocol=4)
    with pytest.raises(CheckpointError, match="allow_unsafe=True"):
        read_checkpoint(tmp_path / "p4.pt")
    info, _ = read_checkpoint(tmp_path / "p4.pt", allow_unsafe=True)
    assert info.model == "forcenet"


def test_unknown_model_is_named(tmp_path: Path) -> None:
    """A checkpoint of a model forcecalc does not know raises, naming that model."""
    raw = load_ocp_raw("forcenet_small")
    raw["config"]["model"] = "dimenetplusplus"
    torch.save(raw, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="'dimenetplusplus'"):
        read_checkpoint(tmp_path / "other.pt")


@pytest.mark.parametrize("model", [3, None, torch.nn.Linear(3, 3)], ids=["int", "None", "module"])
def test_a_model_that_is_no_checkpoint_is_named(model: object) -> None:
    """The calculators and ``predict`` take a checkpoint (path or name) or a loaded
    Potential; anything else is a TypeError saying so and naming what was given."""
    from forcecalc import SpinConvCalculator, predict

    name = type(model).__name__
    with pytest.raises(TypeError, match=rf"a loaded forcecalc Potential .*got {name}$"):
        SpinConvCalculator(model)
    with pytest.raises(TypeError, match=rf"got {name}$"):
        predict([], model)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    """A torch file without a state_dict is not taken for a model."""
    torch.save({"weights": torch.zeros(3)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="not a model checkpoint"):
        read_checkpoint(tmp_path / "x.pt")


def test_missing_weights_are_named(tmp_path: Path) -> None:
    """A state_dict that lacks weights raises CheckpointError listing the missing keys."""
    raw = load_ocp_raw("forcenet_small")
    del raw["state_dict"]["module.lin.weight"]
    torch.save(raw, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing weights \['lin.weight'\]"):
        load_checkpoint(tmp_path / "missing.pt", device="cpu")


def test_own_format_round_trip(tmp_path: Path) -> None:
    """OCP checkpoint -> save_checkpoint -> load_checkpoint: same weights, normalizers, kind."""
    potential = load_checkpoint(OCP_DATA / "spinconv_small_ec.pt", device="cpu")
    path = save_checkpoint(potential, tmp_path / "own.pt", metadata={"license": "MIT"})
    again = load_checkpoint(path, device="cpu")
    assert again.info.source_format == "forcecalc"
    assert again.info.normalizers == potential.info.normalizers
    assert again.info.metadata["license"] == "MIT"
    assert again.info.model_kwargs["forces"] == "compat"
    for (k1, v1), (k2, v2) in zip(
        potential.model.state_dict().items(), again.model.state_dict().items(), strict=True
    ):
        assert k1 == k2 and torch.equal(v1, v2)


def test_normalizers_default_to_identity() -> None:
    """Without normalizers the raw outputs are eV and eV/Å."""
    assert Normalizers().as_dict() == {"energy_mean": 0.0, "energy_std": 1.0, "forces_std": 1.0}


def test_wrongly_shaped_weight_is_named(tmp_path: Path) -> None:
    """A weight whose shape is not the model's raises CheckpointError naming the parameter,
    the model's shape and the checkpoint's."""
    raw = load_ocp_raw("forcenet_small")
    shape = tuple(raw["state_dict"]["module.lin.weight"].shape)
    raw["state_dict"]["module.lin.weight"] = torch.zeros(shape[0] + 1, *shape[1:])
    torch.save(raw, tmp_path / "shape.pt")
    message = f"lin.weight: model {shape}, checkpoint {(shape[0] + 1, *shape[1:])}"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_checkpoint(tmp_path / "shape.pt", device="cpu")


def test_integer_weights_are_refused(tmp_path: Path) -> None:
    """A checkpoint whose floating-point weights were saved as integers (a conversion gone
    wrong) is refused naming them: loading would cast them silently and give wrong energies
    and forces. Floating weights of another precision (float64, float16) still load."""
    raw = load_ocp_raw("forcenet_small")
    raw["state_dict"]["module.lin.weight"] = raw["state_dict"]["module.lin.weight"].long()
    torch.save(raw, tmp_path / "integers.pt")
    with pytest.raises(CheckpointError, match=r"wrong kind of number: lin\.weight: model float32"):
        load_checkpoint(tmp_path / "integers.pt", device="cpu")
    raw = load_ocp_raw("forcenet_small")
    raw["state_dict"] = {
        k: v.double() if v.is_floating_point() else v for k, v in raw["state_dict"].items()
    }
    torch.save(raw, tmp_path / "float64.pt")
    assert load_checkpoint(tmp_path / "float64.pt", device="cpu").dtype == torch.float32


def _own_format(tmp_path: Path) -> dict:
    """The raw dict of a forcecalc-format checkpoint (written from an OCP fixture)."""
    potential = load_checkpoint(OCP_DATA / "forcenet_small.pt", device="cpu")
    return torch.load(save_checkpoint(potential, tmp_path / "own.pt"), weights_only=True)


@pytest.mark.parametrize("entry", ["model", "model_kwargs", "normalizers"])
def test_own_format_missing_entry_is_named(tmp_path: Path, entry: str) -> None:
    """A forcecalc-format file without model, model_kwargs or normalizers raises
    CheckpointError naming the file and the missing entry."""
    data = _own_format(tmp_path)
    del data[entry]
    torch.save(data, tmp_path / "lacking.pt")
    with pytest.raises(CheckpointError, match=rf"lacking\.pt .*lacks .*'{entry}'"):
        read_checkpoint(tmp_path / "lacking.pt")


def test_own_format_bad_normalizers_are_named(tmp_path: Path) -> None:
    """Normalizers with other keys than energy_mean, energy_std and forces_std raise
    CheckpointError listing the keys found and expected."""
    data = _own_format(tmp_path)
    data["normalizers"] = {"energy_mean": 0.0, "scale": 1.0}
    torch.save(data, tmp_path / "norm.pt")
    with pytest.raises(CheckpointError, match=r"norm\.pt: 'normalizers' has the keys"):
        read_checkpoint(tmp_path / "norm.pt")


def test_bad_model_kwargs_name_the_file(tmp_path: Path) -> None:
    """A model_kwargs entry the model rejects raises CheckpointError (a ValueError) naming the
    file, the model and the option."""
    data = _own_format(tmp_path)
    data["model_kwargs"]["no_such_option"] = 1
    torch.save(data, tmp_path / "kwargs.pt")
    with pytest.raises(CheckpointError, match=r"kwargs\.pt: the forcenet model .*no_such_option"):
        load_checkpoint(tmp_path / "kwargs.pt", device="cpu")
    data["model_kwargs"] = [1, 2]
    torch.save(data, tmp_path / "kwargs.pt")
    with pytest.raises(CheckpointError, match=r"kwargs\.pt: 'model_kwargs' is a list"):
        read_checkpoint(tmp_path / "kwargs.pt")


def test_elements_follow_the_checkpoint_list_and_read_the_tables_once(monkeypatch) -> None:
    """A Potential's elements: those its model's tables cover, read from the tables once (on
    a GPU each read waits for the device, ~1 ms of every ASE step), unless the checkpoint lists
    its own, which are read live (fine-tuning extends the list)."""
    from forcecalc.models.forcenet import ForceNet

    potential = load_checkpoint(OCP_DATA / "forcenet_small.pt", device="cpu")
    assert potential.info.elements is None
    reads = []
    tables = ForceNet.supported_numbers
    monkeypatch.setattr(ForceNet, "supported_numbers", lambda self: reads.append(1) or tables(self))
    first = potential.elements
    assert potential.elements == first and 29 in first and len(reads) == 1
    potential.info.elements = [1, 8]
    assert potential.elements == [1, 8]
    potential.info.elements.append(29)
    assert potential.elements == [1, 8, 29]


@pytest.mark.parametrize("name", ["spinconv_small_fc", "forcenet_small"])
def test_ocp_moving_average_weights_are_the_ones_loaded(tmp_path: Path, name: str) -> None:
    """An OCP checkpoint with an exponential moving average (``ema``: OCP's trainer predicts
    with it) loads the averaged weights, mapped to the trainable parameters in the
    checkpoint's order (OCP averages those with ``requires_grad`` only: buffers and ForceNet's
    frozen tables keep their weights); an average that does not fit is an error."""
    raw = load_ocp_raw(name)
    model = load_checkpoint(OCP_DATA / f"{name}.pt", device="cpu").model
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert name != "forcenet_small" or len(names) < len(list(model.parameters()))
    weights = {k.removeprefix("module."): v for k, v in raw["state_dict"].items()}
    ordered = [k for k in weights if k in names]
    shadow = [weights[k] + 0.01 * (i + 1) for i, k in enumerate(ordered)]
    torch_save({**raw, "ema": {"decay": 0.999, "shadow_params": shadow}}, tmp_path / "ema.pt")
    info, state_dict = read_checkpoint(tmp_path / "ema.pt")
    assert info.metadata["weights"] == "ema"
    for i, key in enumerate(ordered):
        assert torch.equal(state_dict[key], weights[key] + 0.01 * (i + 1)), key
    buffers = [k for k in weights if k not in names]
    for key in buffers:  # ForceNet's element tables hold NaN for elements without data
        torch.testing.assert_close(state_dict[key], weights[key], rtol=0, atol=0, equal_nan=True)
    loaded = load_checkpoint(tmp_path / "ema.pt", device="cpu", dtype="float64").model
    assert torch.equal(dict(loaded.named_parameters())[ordered[0]], shadow[0].double())
    torch_save({**raw, "ema": {"shadow_params": shadow[:-1]}}, tmp_path / "short.pt")
    with pytest.raises(CheckpointError, match="moving-average weights"):
        read_checkpoint(tmp_path / "short.pt")


def test_element_reference_energies_are_added_per_atom(tmp_path: Path) -> None:
    """Normalizers with element reference energies add each atom's to the energy (total
    energies grow with the atoms), on the plain and the fixed-shape (CUDA-graph) forward
    alike; forces are unchanged; they survive a save and load; an element without one is
    an error naming it (and NaN on the forward itself, never a number); invalid references
    are refused."""
    from dataclasses import replace

    from ase.build import bulk, molecule

    from forcecalc.graph.batch import Batch

    plain = load_checkpoint(OCP_DATA / "spinconv_small_ec.pt", device="cpu", dtype="float64")
    references = ((6, -5.0), (8, -3.0), (29, -1.5))
    info = replace(
        plain.info, normalizers=replace(plain.info.normalizers, element_references=references)
    )
    referenced = Potential(plain.model, info)
    cell = bulk("Cu", "fcc", a=3.6, cubic=True)
    co = molecule("CO", cell=[8, 8, 8], pbc=True)
    co.positions += 4.0
    batch = Batch.from_atoms([cell, co], cutoff=plain.cutoff, dtype=torch.float64)
    a, b = plain(batch), referenced(batch)
    torch.testing.assert_close(
        b["energy"] - a["energy"], torch.tensor([-6.0, -8.0], dtype=torch.float64)
    )
    assert torch.equal(a["forces"], b["forces"])
    one = Batch.from_atoms([cell], cutoff=plain.cutoff, dtype=torch.float64)
    fixed = referenced.fixed_shape_forward(referenced.fixed_shape_inputs(one))
    torch.testing.assert_close(fixed["energy"], referenced(one)["energy"])
    save_checkpoint(referenced, tmp_path / "ref.pt")
    loaded = load_checkpoint(tmp_path / "ref.pt", device="cpu", dtype="float64")
    assert loaded.info.normalizers.element_references == references
    with pytest.raises(ValueError, match="no reference energy for element"):
        loaded.check_numbers(torch.tensor([29, 1]))
    h2 = molecule("H2", cell=[8, 8, 8], pbc=True)  # H has no reference: no number for it
    energy = referenced(Batch.from_atoms([h2], cutoff=plain.cutoff, dtype=torch.float64))["energy"]
    assert torch.isnan(energy).all()
    for bad in [((0, -1.0),), ((29, float("nan")),), ((29, -1.0), (29, -2.0))]:
        with pytest.raises(ValueError, match="element_references must be"):
            Normalizers(element_references=bad)


def test_element_references_are_added_in_float64() -> None:
    """A float32 model's energy with element references is the float64 sum of its float32
    energy and the references: total energies of hundreds of eV keep the model's absolute
    precision (float32 would round -2,000 eV to 1.2e-4 eV)."""
    from dataclasses import replace

    from ase.build import bulk

    from forcecalc.graph.batch import Batch

    plain = load_checkpoint(OCP_DATA / "spinconv_small_ec.pt", device="cpu", dtype="float32")
    info = replace(
        plain.info,
        normalizers=replace(plain.info.normalizers, element_references=((29, -250.123456789),)),
    )
    referenced = Potential(plain.model, info)
    cell = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))  # 8 atoms: -2,000.99 eV
    batch = Batch.from_atoms([cell], cutoff=plain.cutoff)
    with torch.no_grad():
        raw, total = plain(batch)["energy"], referenced(batch)["energy"]
    assert total.dtype == torch.float64
    assert (total - raw.double()).item() == pytest.approx(8 * -250.123456789, abs=1e-9)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("energy_mean", float("nan")),
        ("energy_mean", float("-inf")),
        ("energy_std", float("inf")),
        ("energy_std", 0.0),
        ("forces_std", -2.0),
        ("forces_std", float("nan")),
    ],
)
def test_normalizers_refuse_non_finite_or_non_positive_values(
    tmp_path: Path, field: str, value: float
) -> None:
    """Normalizers with a NaN or infinite mean or deviation, or a deviation <= 0, raise
    ValueError naming the field; a forcecalc-format file holding one raises CheckpointError
    naming the file and the field."""
    with pytest.raises(ValueError, match=rf"normalizer {field} must be a finite number"):
        Normalizers(**{field: value})
    data = _own_format(tmp_path)
    data["normalizers"][field] = value
    torch.save(data, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match=rf"nan\.pt: 'normalizers' .*{field} must be"):
        read_checkpoint(tmp_path / "nan.pt")


def _forward(potential: Potential) -> dict[str, torch.Tensor]:
    """The potential's outputs for a small Cu-O cell (float64 positions)."""
    from ase.build import bulk

    from forcecalc.graph.batch import Batch

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms[0].symbol = "O"
    atoms.rattle(0.05, seed=3)
    batch = Batch.from_atoms([atoms], cutoff=potential.cutoff, dtype=potential.dtype)
    with torch.set_grad_enabled(potential.energy_gradient):
        return {k: v.detach() for k, v in potential(batch).items()}


@pytest.mark.parametrize("as_numpy", [False, True])
def test_tensor_model_options_survive_a_save(tmp_path: Path, as_numpy: bool) -> None:
    """A model option given as a tensor or numpy array (SpinConv's rotations) is saved, as
    nested lists of its exact values: the loaded model gives bit-identical outputs, and the
    file loads with the safe loader."""
    from forcecalc.models.spinconv import ocp_random_rotations

    rotations = ocp_random_rotations(3, generator=torch.Generator().manual_seed(123))
    given = rotations.numpy() if as_numpy else rotations
    path = OCP_DATA / "spinconv_small_fc.pt"
    potential = load_checkpoint(path, device="cpu", dtype="float64", rotations=given)
    default = load_checkpoint(path, device="cpu", dtype="float64")
    save_checkpoint(potential, tmp_path / "rot.pt")
    again = load_checkpoint(tmp_path / "rot.pt", device="cpu", dtype="float64")
    before, after = _forward(potential), _forward(again)
    assert not torch.equal(before["forces"], _forward(default)["forces"])
    assert torch.equal(before["forces"], after["forces"])
    assert torch.equal(before["energy"], after["energy"])
    saved = torch.load(tmp_path / "rot.pt", weights_only=True)
    assert saved["model_kwargs"]["rotations"] == rotations.tolist()


def test_metadata_is_saved_as_what_the_safe_loader_reads(tmp_path: Path) -> None:
    """save_checkpoint writes metadata (its own and the potential's, such as OCP's
    val_metrics) as plain values: numpy scalars and arrays as numbers and lists, paths as
    strings, dates as ISO strings, tensors as tensors, so that the file loads without
    allow_unsafe; a value of another kind is a ValueError naming it, and nothing is written."""
    import datetime

    import numpy as np

    potential = load_checkpoint(OCP_DATA / "forcenet_small.pt", device="cpu")
    potential.info.metadata["val_metrics"] = {"forces_mae": {"metric": np.float32(0.5)}}
    metadata = {
        "mae": np.float64(0.01),
        "maes": np.array([0.1, 0.2]),
        "count": np.int64(3),
        "data": Path("/data/train.h5"),
        "when": datetime.datetime(2024, 1, 2, 3, 4, 5),
        "scale": torch.tensor([1.5, 2.5]),
        "pairs": [(np.int64(6), 7)],
    }
    path = save_checkpoint(potential, tmp_path / "meta.pt", metadata=metadata)
    saved = load_checkpoint(path, device="cpu").info.metadata
    assert saved["val_metrics"] == {"forces_mae": {"metric": 0.5}}
    assert saved["mae"] == 0.01 and saved["maes"] == [0.1, 0.2] and saved["count"] == 3
    assert saved["data"] == "/data/train.h5" and saved["when"] == "2024-01-02T03:04:05"
    assert torch.equal(saved["scale"], torch.tensor([1.5, 2.5]))
    assert saved["pairs"] == [(6, 7)] and type(saved["pairs"][0][0]) is int
    with pytest.raises(ValueError, match=r"metadata\['bad'\]\[0\]: a .*_Arbitrary"):
        save_checkpoint(potential, tmp_path / "bad.pt", metadata={"bad": [_Arbitrary()]})
    assert not (tmp_path / "bad.pt").exists()


def test_numpy_values_in_a_checkpoint_need_unsafe_loading(tmp_path: Path) -> None:
    """An OCP checkpoint whose metrics hold numpy scalars (as training scripts leave them) is
    refused by the safe loader with the way to load it: numpy's pickled dtype state can
    mark raw bytes as object pointers, so forcecalc does not allow numpy globals in the
    weights-only unpickler (torch leaves them off its own list); allow_unsafe loads it."""
    import numpy as np

    raw = load_ocp_raw("forcenet_small")
    raw["val_metrics"] = {"energy_mae": {"metric": np.float64(0.3), "numel": np.int64(5)}}
    torch.save(raw, tmp_path / "numpy.pt")
    with pytest.raises(CheckpointError, match=r"numpy.*allow_unsafe=True"):
        read_checkpoint(tmp_path / "numpy.pt")
    info, _ = read_checkpoint(tmp_path / "numpy.pt", allow_unsafe=True)
    assert info.metadata["val_metrics"]["energy_mae"]["metric"] == 0.3


def _damage(path: Path, target: Path) -> str:
    """Copy ``path`` to ``target`` with 64 bytes zeroed in the middle of its largest record
    (torch does not check the CRC-32s: it would load the file); return the record's name."""
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
    raw = bytearray(path.read_bytes())
    header = record.header_offset
    name_length = int.from_bytes(raw[header + 26 : header + 28], "little")
    extra_length = int.from_bytes(raw[header + 28 : header + 30], "little")
    middle = header + 30 + name_length + extra_length + record.file_size // 2
    assert any(raw[middle : middle + 64])
    raw[middle : middle + 64] = bytes(64)
    target.write_bytes(raw)
    return record.filename


@pytest.mark.parametrize("allow_unsafe", [False, True])
def test_damaged_record_is_named(tmp_path: Path, allow_unsafe: bool) -> None:
    """A zip-format checkpoint whose record does not match its CRC-32 (bytes zeroed inside a
    tensor, which torch.load reads silently as other weights) raises CheckpointError naming
    the file and the record, and advising to download or copy it again."""
    record = _damage(OCP_DATA / "forcenet_small.pt", tmp_path / "damaged.pt")
    pattern = rf"damaged\.pt is damaged: its record '{re.escape(record)}' .*copy it again"
    with pytest.raises(CheckpointError, match=pattern):
        read_checkpoint(tmp_path / "damaged.pt", allow_unsafe=allow_unsafe)


def test_archive_written_without_checksums_loads(tmp_path: Path) -> None:
    """A checkpoint written with torch's CRC-32s turned off (all stored as 0:
    torch.serialization.set_crc32_options(False)) is not taken for a damaged one."""
    raw = load_ocp_raw("forcenet_small")
    computed = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(raw, tmp_path / "nocrc.pt")
    finally:
        torch.serialization.set_crc32_options(computed)
    with zipfile.ZipFile(tmp_path / "nocrc.pt") as archive:
        assert all(info.CRC == 0 for info in archive.infolist())
    assert read_checkpoint(tmp_path / "nocrc.pt")[0].model == "forcenet"


@pytest.mark.parametrize(
    ("elements", "named"),
    [(["Cu"], "'Cu'"), ([29, 200], "200"), ([0, 8], "0"), ([29, 8.0], "8.0"), ("Cu", "str")],
)
def test_own_format_elements_are_atomic_numbers(tmp_path: Path, elements, named: str) -> None:
    """A forcecalc-format file whose 'elements' are not integers in 1..118 raises
    CheckpointError when read, naming the file and the bad entries."""
    data = _own_format(tmp_path)
    data["elements"] = elements
    torch.save(data, tmp_path / "elements.pt")
    with pytest.raises(CheckpointError, match=rf"elements\.pt: 'elements' .*{re.escape(named)}"):
        read_checkpoint(tmp_path / "elements.pt")
    data["elements"] = [8, 29]
    torch.save(data, tmp_path / "elements.pt")
    assert read_checkpoint(tmp_path / "elements.pt")[0].elements == [8, 29]
