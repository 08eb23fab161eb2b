"""Fine-tuning from OCP-format checkpoints, with frozen blocks."""

from __future__ import annotations

import pytest
import torch
from train_fixtures import ocp_checkpoint, one_thread, training_frames  # noqa: F401

from forcecalc.checkpoint import load_checkpoint, read_checkpoint
from forcecalc.predict import predict
from forcecalc.train import TrainConfig, Trainer
from forcecalc.train.optim import freeze_except

CASES = [
    ("forcenet_small", ["decoder"]),
    ("spinconv_small_fc", ["force_output_block"]),
    ("spinconv_small_ec", ["energyembeddingblock"]),
]


@pytest.mark.parametrize(("name", "trainable"), CASES, ids=[c[0] for c in CASES])
def test_finetune_from_ocp_checkpoint_freezes_the_rest(tmp_path, name, trainable):
    """Fine-tuning an OCP-format checkpoint with ``freeze_except`` changes only the named
    blocks: every other parameter and buffer (batch-norm statistics included) is bit-identical
    after training; the checkpoint's normalizers are kept; ``final.pt`` (forcecalc format)
    reloads to the same predictions and records where it started from."""
    frames = training_frames()
    if name.startswith("spinconv"):
        pytest.importorskip("forcecalc.models.spinconv")
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
