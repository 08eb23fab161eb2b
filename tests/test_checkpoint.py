"""Checkpoint reading, writing and the errors a user sees for bad files."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch
from ocp_fixtures import OCP_DATA, load_ocp_raw

from forcecalc.atomic import torch_save
from forcecalc.checkpoint import (
    CheckpointError,
    Normalizers,
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


def test_truncated_file_names_the_problem(tmp_path: Path) -> None:
    """A truncated checkpoint raises CheckpointError saying it could not be read."""
    data = (OCP_DATA / "forcenet_small.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt could not be read"):
        read_checkpoint(tmp_path / "cut.pt")


class _Arbitrary:
    pass


def test_unsafe_pickle_is_refused_unless_allowed(tmp_path: Path) -> None:
    """A checkpoint that needs full unpickling is refused by default, naming allow_unsafe."""
    raw = load_ocp_raw("forcenet_small")
    raw["extra"] = _Arbitrary()
    torch.save(raw, tmp_path / "unsafe.pt")
    with pytest.raises(CheckpointError, match="allow_unsafe=True"):
        read_checkpoint(tmp_path / "unsafe.pt")
    info, _ = read_checkpoint(tmp_path / "unsafe.pt", allow_unsafe=True)
    assert info.model == "forcenet"


def test_unknown_model_is_named(tmp_path: Path) -> None:
    """A checkpoint of a model forcecalc does not know raises, naming that model."""
    raw = load_ocp_raw("forcenet_small")
    raw["config"]["model"] = "dimenetplusplus"
    torch.save(raw, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="'dimenetplusplus'"):
        read_checkpoint(tmp_path / "other.pt")


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


def test_atomic_save_keeps_previous_file_on_failure(tmp_path: Path, monkeypatch) -> None:
    """A write that fails midway leaves the previous file intact and no temp file behind."""
    target = tmp_path / "ckpt.pt"
    torch_save({"a": 1}, target)

    def broken_save(obj, stream) -> None:
        stream.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        torch_save({"a": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_normalizers_default_to_identity() -> None:
    """Without normalizers the raw outputs are eV and eV/Å."""
    assert Normalizers().as_dict() == {"energy_mean": 0.0, "energy_std": 1.0, "forces_std": 1.0}
