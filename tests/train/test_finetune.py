"""Fine-tuning from OCP-format checkpoints, with frozen blocks; elements new to a checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ase.calculators.singlepoint import SinglePointCalculator
from train_fixtures import SPINCONV_TINY, ocp_checkpoint, one_thread, training_frames  # noqa: F401

from forcecalc.calculator import load_calculator
from forcecalc.checkpoint import (
    CheckpointInfo,
    Normalizers,
    Potential,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from forcecalc.models.registry import build_model
from forcecalc.predict import predict
from forcecalc.train import TrainConfig, Trainer
from forcecalc.train.data import frame_targets, random_split
from forcecalc.train.optim import freeze_except
from forcecalc.warning import ForcecalcWarning

CASES = [
    ("forcenet_small", ["decoder"]),
    ("spinconv_small_fc", ["force_output_block"]),
    ("spinconv_small_ec", ["energyembeddingblock"]),
]


@pytest.mark.parametrize(("name", "trainable"), CASES, ids=[c[0] for c in CASES])
def test_finetune_from_ocp_checkpoint_freezes_the_rest(tmp_path, name, trainable):
    """Fine-tuning an OCP-format checkpoint with ``freeze_except`` changes only the named
    blocks: every other parameter and buffer (batch-norm statistics included) is bit-identical
    after training and in the files written; the checkpoint's normalizers are kept;
    ``final.pt`` (forcecalc format) reloads to the same predictions and records where it
    started from."""
    frames = training_frames()
    path = ocp_checkpoint(name)
    info, _ = read_checkpoint(path)
    config = TrainConfig(
        init_checkpoint=str(path),
        freeze_except=trainable,
        out=str(tmp_path / "run"),
        device="cpu",
        progress=False,
        batch_size=3,
        val_fraction=0.0,
        max_steps=2,
        eval_every=1000,
        lr=1e-3,
    )
    trainer = Trainer(config, frames[:6])
    before = {k: v.clone() for k, v in trainer.potential.model.state_dict().items()}
    summary = trainer.fit()
    after = trainer.potential.model.state_dict()

    def selected(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in trainable)

    frozen = [k for k in before if not selected(k)]
    assert frozen
    for key in frozen:
        assert torch.equal(before[key], after[key]) or (
            before[key].isnan().any()
            and torch.equal(before[key].nan_to_num(), after[key].nan_to_num())
        ), key
    assert any(not torch.equal(before[k], after[k]) for k in before if selected(k))
    assert trainer.potential.info.normalizers == info.normalizers

    final = load_checkpoint(summary["final"], device="cpu")
    written = final.model.state_dict()
    for key in frozen:  # as written too: exporting fills no frozen element-pair table
        assert torch.equal(before[key].nan_to_num(), written[key].nan_to_num()), key
    assert final.info.normalizers == info.normalizers
    assert final.info.metadata["init_checkpoint"]["format"] == "ocp"
    reference = predict(frames[:3], trainer.potential.eval())
    for a, b in zip(reference, predict(frames[:3], final), strict=True):
        assert a["energy"] == pytest.approx(b["energy"], abs=1e-5)
        torch.testing.assert_close(a["forces"], b["forces"], atol=1e-5, rtol=1e-5)


def test_freeze_except_rejects_unknown_block():
    """A ``freeze_except`` name that selects no parameter is an error naming the model's
    modules."""
    model = torch.nn.Sequential()
    model.add_module("encoder", torch.nn.Linear(2, 2))
    model.add_module("head", torch.nn.Linear(2, 1))
    with pytest.raises(ValueError, match="encoder, head"):
        freeze_except(model, ["force_output_block"])
    assert freeze_except(model, ["head"]) == ["head.weight", "head.bias"]
    assert not model.encoder.weight.requires_grad


def _spinconv_checkpoint(path: Path, elements: list[int], **changes) -> Path:
    """A freshly initialised tiny SpinConv saved in forcecalc's format, accepting ``elements``."""
    torch.manual_seed(0)
    kwargs = {**SPINCONV_TINY, **changes}
    info = CheckpointInfo(
        model="spinconv",
        model_kwargs=kwargs,
        normalizers=Normalizers(),
        source_format="forcecalc",
        elements=elements,
    )
    return save_checkpoint(Potential(build_model("spinconv", kwargs), info), path)


def _with_nickel(frames: list, atoms: int | slice = 1) -> list:
    """``frames`` with their ``atoms`` (by default atom 1, a Cu) turned into Ni, labels kept."""
    out = []
    for frame in frames:
        changed = frame.copy()
        changed.numbers[atoms] = 28
        energy, forces = frame_targets(frame)
        changed.calc = SinglePointCalculator(changed, energy=energy, forces=forces)
        out.append(changed)
    return out


def _finetune_config(tmp_path: Path, checkpoint: str | Path) -> TrainConfig:
    return TrainConfig(
        init_checkpoint=str(checkpoint),
        out=str(tmp_path / "run"),
        device="cpu",
        progress=False,
        batch_size=2,
        val_fraction=0.0,
        max_steps=1,
        rotation="none",
    )


def test_finetune_on_a_new_element_extends_the_checkpoint_elements(tmp_path):
    """Fine-tuning a checkpoint that lists its elements (Cu, O) on frames with an element it
    lacks but its tables cover (Ni) writes a final.pt listing the union (O, Ni, Cu), records
    the starting checkpoint's list, and the calculator built from it evaluates the new
    element."""
    checkpoint = _spinconv_checkpoint(tmp_path / "start.pt", [8, 29])
    frames = _with_nickel(training_frames()[:4])
    summary = Trainer(_finetune_config(tmp_path, checkpoint), frames).fit()
    final = load_checkpoint(summary["final"], device="cpu")
    assert final.info.elements == [8, 28, 29]
    assert final.info.metadata["init_checkpoint"]["elements"] == [8, 29]
    atoms = frames[0].copy()
    atoms.calc = load_calculator(summary["final"], device="cpu")
    assert np.isfinite(atoms.get_potential_energy())
    assert np.isfinite(atoms.get_forces()).all()


def test_finetune_refuses_an_element_the_model_cannot_represent(tmp_path):
    """A training element outside the model's tables (Cu for a SpinConv whose tables stop at
    Z = 28) is refused when the run starts, naming the element and the model's range, before
    anything is written."""
    checkpoint = _spinconv_checkpoint(tmp_path / "start.pt", [8, 28], max_num_elements=29)
    with pytest.raises(ValueError, match=r"element\(s\) Cu that the spinconv model cannot.*1-28"):
        Trainer(_finetune_config(tmp_path, checkpoint), training_frames()[:4])
    assert not (tmp_path / "run" / "final.pt").exists()


def test_finetune_refuses_a_validation_element_the_model_cannot_represent(tmp_path):
    """Separate validation data are checked as the training data, when the run starts: Cu
    for tables that stop at Z = 28 is named with the model's range (it stopped the run one
    epoch in, with no checkpoint written, for SpinConv; ForceNet logged NaN errors)."""
    checkpoint = _spinconv_checkpoint(tmp_path / "start.pt", [8, 28], max_num_elements=29)
    nickel = _with_nickel(training_frames()[:4], atoms=slice(None))
    with pytest.raises(ValueError, match=r"validation data .* Cu that the spinconv model"):
        Trainer(_finetune_config(tmp_path, checkpoint), nickel, training_frames()[:2])
    assert not (tmp_path / "run").exists()


def test_a_validation_element_neither_trained_nor_listed_is_warned_of(tmp_path):
    """Validation frames with an element the tables cover but neither the checkpoint lists
    nor the training data hold (Ni for a Cu/O model) run, with a warning naming it: their
    errors measure untrained parameters."""
    checkpoint = _spinconv_checkpoint(tmp_path / "start.pt", [8, 29])
    val = _with_nickel(training_frames()[:2])
    with pytest.warns(ForcecalcWarning, match=r"validation data has element\(s\) Ni that"):
        Trainer(_finetune_config(tmp_path, checkpoint), training_frames()[:4], val)


def test_an_element_only_in_the_held_out_split_is_a_validation_element(tmp_path):
    """With a random split, the held-out frames' elements are validation elements: Ni found
    only in them is warned of and not added to the checkpoint's elements (it was listed as
    trained, and the model then answered for Ni with parameters no Ni frame trained), as
    when the same frames come as separate validation data."""
    checkpoint = _spinconv_checkpoint(tmp_path / "start.pt", [8, 29])
    frames = training_frames()[:6]
    _, held_out = random_split(frames, 0.34, 3)
    for k in held_out.indices:
        frames[k] = _with_nickel([frames[k]])[0]
    config = _finetune_config(tmp_path, checkpoint).updated(val_fraction=0.34, split_seed=3)
    with pytest.warns(ForcecalcWarning, match=r"validation data has element\(s\) Ni that"):
        trainer = Trainer(config, frames)
    assert trainer.potential.info.elements == [8, 29]


def test_finetune_applies_model_kwargs_and_records_the_checkpoint_model(tmp_path):
    """Fine-tuning takes ``model_kwargs`` as options over the checkpoint's own (here an OCP
    energy-centric checkpoint switched to conservative forces, as the MD recipe needs; they
    were ignored), and records the checkpoint's model, not the config's default."""
    config = _finetune_config(tmp_path, ocp_checkpoint("spinconv_small_ec"))
    trainer = Trainer(
        config.updated(model_kwargs={"forces": "conservative"}), training_frames()[:3]
    )
    assert trainer.potential.model.forces == "conservative"
    assert trainer.config.model == "spinconv"


def test_finetuned_checkpoint_keeps_the_license_and_energy_definition(tmp_path):
    """A checkpoint fine-tuned from a shipped one keeps its license and energy definition
    (they were dropped) and names where it started; with the normalizers refitted on the
    training data, its energies are those data's, and it says so (it kept claiming OC20-EMT's
    adsorption energy)."""
    started = load_checkpoint("forcenet", device="cpu").info.metadata
    summary = Trainer(_finetune_config(tmp_path, "forcenet"), training_frames()[:3]).fit()
    written = load_checkpoint(summary["final"], device="cpu").info.metadata
    assert written["license"] == started["license"] and written["energy"] == started["energy"]
    assert written["init_checkpoint"]["name"] == "forcenet"
    config = _finetune_config(tmp_path / "refit", "forcenet").updated(normalizers="fit")
    refitted = load_checkpoint(Trainer(config, training_frames()[:3]).fit()["final"]).info
    assert refitted.metadata["license"] == started["license"]
    assert refitted.metadata["energy"].startswith("the training data's energy labels")
    assert refitted.metadata["energy"].endswith(f"predicted: {started['energy']})")


def test_non_finite_labels_are_named():
    """A frame whose energy or forces are NaN (extxyz, database or Atoms lists alike) is an
    error naming it, not a NaN loss."""
    frame = training_frames()[0]
    energy, forces = frame_targets(frame)
    atoms = frame.copy()
    forces = forces.copy()
    forces[1, 2] = np.nan
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    with pytest.raises(ValueError, match=r"frame 4 \(.*\): forces not finite"):
        frame_targets(atoms, 4)


@pytest.mark.parametrize(("mode", "kept"), [("auto", True), ("keep", True), ("train", False)])
def test_fine_tuning_keeps_the_batch_norm_statistics(tmp_path, mode: str, kept: bool):
    """Fine-tuning keeps the checkpoint's batch-norm running statistics by default (those its
    weights were trained with; a few small batches overwrote ForceNet's decoder statistics and
    made its forces 10x worse), while the norms' weights still train; ``norm_statistics:
    train`` updates them."""
    from forcecalc.checkpoint import load_checkpoint as load

    checkpoint = Path(__file__).parents[1] / "data" / "ocp" / "forcenet_small.pt"
    start = load(checkpoint, device="cpu").model
    norms = [n for n, m in start.named_modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert norms  # the fixture's decoder has one
    config = _finetune_config(tmp_path, checkpoint).updated(max_steps=3, norm_statistics=mode)
    trainer = Trainer(config, training_frames()[:4])
    trainer.fit()
    tuned = dict(trainer.potential.model.named_modules())
    before = dict(start.named_modules())
    for name in norms:
        same = torch.equal(tuned[name].running_mean, before[name].running_mean)
        assert same == kept, name
