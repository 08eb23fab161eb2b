"""OCP-format checkpoints: which normalizers apply (OCP's rule, fairchem's names and element
references) and where the model's name and options come from."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from ocp_fixtures import OCP_DATA, load_ocp_raw

from forcecalc.checkpoint import CheckpointError, Normalizers, load_checkpoint, read_checkpoint
from forcecalc.graph.batch import MAX_ATOMIC_NUMBER, Batch

#: The OC20 normalizers the fixture checkpoints save (float32 tensors, as OCP saved them).
SAVED = Normalizers(
    energy_mean=float(torch.tensor(-0.7554450631141663)),
    energy_std=float(torch.tensor(2.887317180633545)),
    forces_std=float(torch.tensor(2.887317180633545)),
)


def _entry(mean: float, std: float, spread: str = "std") -> dict[str, torch.Tensor]:
    return {"mean": torch.tensor(mean), spread: torch.tensor(std)}


def _normalizers(tmp_path: Path, raw: dict, name: str = "ckpt") -> Normalizers:
    """The normalizers read from ``raw`` written as ``{name}.pt``."""
    torch.save(raw, tmp_path / f"{name}.pt")
    return read_checkpoint(tmp_path / f"{name}.pt")[0].normalizers


def test_config_values_are_overwritten_by_the_saved_entries(tmp_path: Path) -> None:
    """With normalize_labels true each normalizer is the config's (target_mean/target_std,
    grad_target_mean/grad_target_std) unless the checkpoint saves that key, whose values win:
    a checkpoint that saves only 'target' takes its force normalizer from the config, one that
    saves none takes both; config['normalizer'] is read in place of config['dataset']."""
    raw = load_ocp_raw("forcenet_small")
    raw["config"]["dataset"].update(
        target_mean=1.0, target_std=2.0, grad_target_mean=0.0, grad_target_std=3.0
    )
    raw["normalizers"] = {"target": _entry(0.5, 4.0)}
    assert _normalizers(tmp_path, raw) == Normalizers(0.5, 4.0, 3.0)
    del raw["normalizers"]
    assert _normalizers(tmp_path, raw) == Normalizers(1.0, 2.0, 3.0)
    raw["config"]["normalizer"] = {
        "normalize_labels": True,
        "target_mean": 7.0,
        "target_std": 8.0,
        "grad_target_mean": 0.0,
        "grad_target_std": 9.0,
    }
    assert _normalizers(tmp_path, raw) == Normalizers(7.0, 8.0, 9.0)


def test_normalize_labels_false_applies_none_and_warns(tmp_path: Path) -> None:
    """normalize_labels false means no normalization, as in OCP, even where normalizers are
    saved: the raw outputs are eV and eV/Å, and a warning names the file and the entries not
    applied."""
    raw = load_ocp_raw("forcenet_small")
    raw["config"]["dataset"]["normalize_labels"] = False
    with pytest.warns(UserWarning, match=r"nolabels\.pt: .*normalize_labels'\] is false.*not"):
        assert _normalizers(tmp_path, raw, "nolabels") == Normalizers()
    del raw["normalizers"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _normalizers(tmp_path, raw, "nolabels") == Normalizers()


def test_saved_entries_apply_without_settings(tmp_path: Path) -> None:
    """A config that does not set normalize_labels (none, or no dataset at all) takes the
    saved normalizers as they are; without saved ones the outputs are unscaled."""
    raw = load_ocp_raw("forcenet_small")
    del raw["config"]["dataset"]["normalize_labels"]
    assert _normalizers(tmp_path, raw) == SAVED
    del raw["config"]["dataset"]
    assert _normalizers(tmp_path, raw) == SAVED
    raw["normalizers"] = {}
    assert _normalizers(tmp_path, raw) == Normalizers()


@pytest.mark.parametrize("spread", ["rmsd", "std"])
def test_fairchem_normalizer_names_are_read(tmp_path: Path, spread: str) -> None:
    """fairchem's keys 'energy' and 'forces' stand for 'target' and 'grad_target', with the
    deviation under 'rmsd' (or the legacy 'std'), and overwrite the config's values alike."""
    raw = load_ocp_raw("forcenet_small")
    raw["normalizers"] = {"energy": _entry(0.5, 4.0, spread), "forces": _entry(0.0, 3.0, spread)}
    assert _normalizers(tmp_path, raw) == Normalizers(0.5, 4.0, 3.0)
    del raw["config"]["dataset"]
    assert _normalizers(tmp_path, raw) == Normalizers(0.5, 4.0, 3.0)


def test_fairchem_element_references_are_added_per_atom(tmp_path: Path) -> None:
    """fairchem's energy element references (a tensor indexed by atomic number under
    elementrefs/energy/element_references) become (Z, eV) pairs for Z in 1..118, zeros
    included, and each atom's is added to the energy; forces are unchanged."""
    from ase.build import bulk

    raw = load_ocp_raw("forcenet_small")
    table = torch.zeros(MAX_ATOMIC_NUMBER + 1)
    table[29], table[8] = -3.5, -1.25
    raw["elementrefs"] = {"energy": {"element_references": table}}
    torch.save(raw, tmp_path / "refs.pt")
    referenced = load_checkpoint(tmp_path / "refs.pt", device="cpu", dtype="float64")
    references = dict(referenced.info.normalizers.element_references)
    assert sorted(references) == list(range(1, MAX_ATOMIC_NUMBER + 1))
    assert references[29] == -3.5 and references[8] == -1.25 and references[1] == 0.0
    plain = load_checkpoint(OCP_DATA / "forcenet_small.pt", device="cpu", dtype="float64")
    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    batch = Batch.from_atoms([cu], cutoff=plain.cutoff, dtype=torch.float64)
    with torch.no_grad():
        a, b = plain(batch), referenced(batch)
    assert (b["energy"] - a["energy"]).item() == pytest.approx(4 * -3.5, abs=1e-9)
    assert torch.equal(a["forces"], b["forces"])
    raw["elementrefs"] = {"energy": {"element_references": [0.0, 1.0]}}
    with pytest.raises(CheckpointError, match=r"badrefs\.pt: its 'elementrefs' are not"):
        _normalizers(tmp_path, raw, "badrefs")


def test_unknown_or_doubled_saved_normalizers_are_refused(tmp_path: Path) -> None:
    """Saved normalizers whose keys are none of 'target', 'grad_target', 'energy', 'forces'
    raise CheckpointError naming the file and the keys; so does one normalizer saved under
    both its OCP and its fairchem name."""
    raw = load_ocp_raw("forcenet_small")
    raw["normalizers"] = {"stress": _entry(0.0, 1.0), "y": _entry(0.0, 1.0)}
    with pytest.raises(CheckpointError, match=r"odd\.pt: .*keys \['stress', 'y'\]"):
        _normalizers(tmp_path, raw, "odd")
    raw["normalizers"] = {"target": _entry(0.5, 4.0), "energy": _entry(0.5, 4.0)}
    with pytest.raises(CheckpointError, match=r"both 'energy' and 'target'"):
        _normalizers(tmp_path, raw, "odd")


def test_normalize_labels_without_values_is_refused(tmp_path: Path) -> None:
    """normalize_labels true with no values in the config and none saved raises
    CheckpointError naming the missing energy normalizer."""
    raw = load_ocp_raw("forcenet_small")
    raw["config"]["dataset"] = {"normalize_labels": True}
    del raw["normalizers"]
    with pytest.raises(CheckpointError, match=r"empty\.pt: .*'target' normalizer is missing"):
        _normalizers(tmp_path, raw, "empty")


def test_missing_force_normalizer_is_named(tmp_path: Path) -> None:
    """A force normalizer ('grad_target') neither saved nor in the config while the labels
    are normalized raises CheckpointError saying it is missing (not that the energy's mean,
    taken in its place, is a nonzero force mean), with or without normalize_labels set; a
    model that regresses no forces needs none."""
    raw = load_ocp_raw("forcenet_small")
    for key in ("grad_target_mean", "grad_target_std"):
        del raw["config"]["dataset"][key]
    del raw["normalizers"]["grad_target"]
    pattern = r"nograd\.pt: .*'grad_target' normalizer is missing.*grad_target_mean"
    with pytest.raises(CheckpointError, match=pattern):
        _normalizers(tmp_path, raw, "nograd")
    del raw["config"]["dataset"]["normalize_labels"]
    with pytest.raises(CheckpointError, match=pattern):
        _normalizers(tmp_path, raw, "nograd")
    raw["config"]["dataset"]["normalize_labels"] = True
    raw["config"]["model_attributes"]["regress_forces"] = False
    assert _normalizers(tmp_path, raw, "nograd") == Normalizers(SAVED.energy_mean, SAVED.energy_std)


@pytest.mark.parametrize(
    ("role", "field", "value"),
    [
        ("target", "std", float("nan")),
        ("target", "std", 0.0),
        ("target", "mean", float("inf")),
        ("grad_target", "std", -1.0),
    ],
)
def test_non_finite_or_non_positive_normalizers_are_refused(
    tmp_path: Path, role: str, field: str, value: float
) -> None:
    """A saved normalizer with a NaN or infinite mean or deviation, or a deviation <= 0,
    raises CheckpointError naming the file and the field (not NaN energies or forces)."""
    raw = load_ocp_raw("forcenet_small")
    raw["normalizers"][role][field] = torch.tensor(value)
    name = {"target": "energy", "grad_target": "forces"}[role] + f"_{field}"
    with pytest.raises(CheckpointError, match=rf"bad\.pt: normalizer {name} must be a finite"):
        _normalizers(tmp_path, raw, "bad")


def test_model_given_as_a_dict_with_its_options(tmp_path: Path) -> None:
    """config['model'] as fairchem writes it, {'name': ..., **options}, names the model and
    gives its options (merged with model_attributes where both are given): the same model,
    weights and outputs as OCP's layout; a key the two give different values is an error."""
    raw = load_ocp_raw("forcenet_small")
    torch.save(raw, tmp_path / "ocp.pt")
    expected = read_checkpoint(tmp_path / "ocp.pt")[0]
    attributes = raw["config"].pop("model_attributes")
    raw["config"]["model"] = {"name": "forcenet", **attributes}
    torch.save(raw, tmp_path / "dict.pt")
    info, _ = read_checkpoint(tmp_path / "dict.pt")
    assert (info.model, info.model_kwargs) == (expected.model, expected.model_kwargs)
    assert info.normalizers == expected.normalizers
    load_checkpoint(tmp_path / "dict.pt", device="cpu")
    raw["config"]["model"] = {"name": "forcenet", "hidden_channels": 64}
    raw["config"]["model_attributes"] = {
        k: v for k, v in attributes.items() if k != "hidden_channels"
    }
    torch.save(raw, tmp_path / "split.pt")
    assert read_checkpoint(tmp_path / "split.pt")[0].model_kwargs == expected.model_kwargs
    raw["config"]["model_attributes"]["cutoff"] = 5.0
    raw["config"]["model"]["cutoff"] = 6.0
    torch.save(raw, tmp_path / "clash.pt")
    with pytest.raises(CheckpointError, match=r"clash\.pt: .*different values for 'cutoff'"):
        read_checkpoint(tmp_path / "clash.pt")


def test_missing_model_attributes_are_named(tmp_path: Path) -> None:
    """An OCP config with a model name and no model_attributes raises CheckpointError naming
    the missing config['model_attributes'] when read (not a default-size model that then
    fails on the weights' shapes)."""
    raw = load_ocp_raw("forcenet_small")
    del raw["config"]["model_attributes"]
    torch.save(raw, tmp_path / "noattrs.pt")
    with pytest.raises(CheckpointError, match=r"noattrs\.pt lacks config\['model_attributes'\]"):
        read_checkpoint(tmp_path / "noattrs.pt")


def test_an_energy_only_model_is_refused_by_name(tmp_path: Path) -> None:
    """An OCP SpinConv trained for energies only (``regress_forces: False``) is refused when
    loaded, saying it predicts no forces (not a KeyError at the first force call)."""
    raw = load_ocp_raw("spinconv_small_ec")
    raw["config"]["model_attributes"]["regress_forces"] = False
    torch.save(raw, tmp_path / "energy_only.pt")
    with pytest.raises(CheckpointError, match=r"predicts energies only \(regress_forces=False\)"):
        load_checkpoint(tmp_path / "energy_only.pt")
