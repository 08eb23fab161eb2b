"""The training loop: overfitting, exact resume, crash-safe checkpoints, outputs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import bulk
from train_fixtures import (  # noqa: F401
    FORCENET_TINY,
    SPINCONV_TINY,
    assert_same_metrics,
    emt_frames,
    one_thread,
    training_frames,
)

from forcecalc.checkpoint import CheckpointError, Potential, load_checkpoint
from forcecalc.models.registry import build_model
from forcecalc.predict import predict
from forcecalc.train import TrainBatch, TrainConfig, Trainer
from forcecalc.train.data import frame_targets
from forcecalc.train.trainer import TrainingDiverged
from forcecalc.warning import ForcecalcWarning


def _config(tmp_path: Path, model: str, kwargs: dict, **changes) -> TrainConfig:
    values = {
        "model": model,
        "model_kwargs": kwargs,
        "out": str(tmp_path / "run"),
        "device": "cpu",
        "val_fraction": 0.0,
        "progress": False,
        "batch_size": 20,
        "scheduler": "cosine",
        "force_loss": "mse",
        "rotation": "none",
        **changes,
    }
    return TrainConfig(**values)


def _overfit(tmp_path: Path, frames: list, model: str, kwargs: dict, **changes) -> None:
    config = _config(tmp_path, model, kwargs, **changes)
    trainer = Trainer(config, frames, frames)
    before = trainer.evaluate(frames)["forces_mae"]
    summary = trainer.fit()
    after = summary["metrics"]["val_forces_mae"]
    assert after < before / 10, (before, after)


def test_forcenet_overfits(tmp_path):
    """A tiny ForceNet trained on 20 EMT frames (and evaluated on them, eval mode) lowers the
    force MAE at least tenfold."""
    frames = training_frames()
    _overfit(tmp_path, frames, "forcenet", FORCENET_TINY, max_steps=220, lr=5e-3, eval_every=220)


@pytest.mark.slow
def test_spinconv_overfits(tmp_path):
    """A tiny force-centric SpinConv trained on 20 EMT frames lowers the force MAE at least
    tenfold."""
    frames = training_frames()
    _overfit(
        tmp_path,
        frames,
        "spinconv",
        SPINCONV_TINY,
        max_steps=450,
        lr=1e-2,
        batch_size=10,
        eval_every=450,
        energy_coefficient=0.1,
    )


def test_energy_centric_spinconv_trains_forces_by_double_backward(tmp_path):
    """Energy-centric SpinConv: forces are an autograd derivative inside the forward; with a
    force-only loss, training still moves the parameters (double backward) and lowers the
    force loss.  Its force normalizer is the energy's (forces = -dE/dx in eV/Å)."""
    frames = training_frames()
    kwargs = {**SPINCONV_TINY, "force_estimator": "grad"}
    config = _config(
        tmp_path, "spinconv", kwargs, max_steps=6, lr=1e-2, energy_coefficient=0.0, batch_size=5
    )
    trainer = Trainer(config, frames[:5], frames[:5])
    norm = trainer.potential.info.normalizers
    assert norm.forces_std == norm.energy_std  # forces stay -dE/dx of the reported energy
    before = {k: v.clone() for k, v in trainer.potential.model.state_dict().items()}
    first = trainer.evaluate(frames[:5])["forces_mae"]
    trainer.fit()
    after = trainer.potential.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("distfc1") for k in changed)
    assert trainer.evaluate(frames[:5])["forces_mae"] < first


RESUME_MODELS = {
    "forcenet": {**FORCENET_TINY, "hidden_channels": 16, "decoder_hidden_channels": 16},
    # force-block rotations drawn afresh at every forward, from the global generator
    "spinconv": {**SPINCONV_TINY, "rotations": "random"},
}


def _resume_config(
    tmp_path: Path, name: str, max_steps: int, model: str = "forcenet"
) -> TrainConfig:
    return TrainConfig(
        model=model,
        model_kwargs=RESUME_MODELS[model],
        out=str(tmp_path / name),
        device="cpu",
        progress=False,
        batch_size=3,
        val_fraction=0.2,
        max_steps=max_steps,
        eval_every=3,
        checkpoint_every=100,
        warmup_steps=2,
        plateau_patience=0,
        ema_decay=0.9,
        rotation="auto",
    )


@pytest.mark.parametrize("model", sorted(RESUME_MODELS))
def test_resume_continues_exactly(tmp_path, model):
    """2N steps in one run equal N steps, then ``resume`` for N more: same parameters, buffers,
    optimizer state and metrics history (the data position, augmentation, schedule, moving
    average and random states are all restored), also for a model that draws random numbers
    in its forward (SpinConv's random force-block rotations: the data loader has a generator
    of its own, so a resumed iterator does not shift the global one); metrics.csv holds the
    same rows, the train loss and MAEs of the evaluation interval that spans the resume
    included."""
    frames = training_frames()
    n = 7  # crosses an epoch boundary (16 training frames, batch 3: 6 steps per epoch)
    whole = Trainer(_resume_config(tmp_path, "whole", 2 * n, model), frames)
    whole.fit()
    first = Trainer(_resume_config(tmp_path, "split", n, model), frames)
    first.fit()
    second = Trainer(
        _resume_config(tmp_path, "split", 2 * n, model),
        frames,
        resume=tmp_path / "split" / "checkpoint.pt",
    )
    assert second.step == n
    second.fit()
    expected = whole.potential.model.state_dict()
    got = second.potential.model.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-7, equal_nan=True, msg=key)
    for a, b in zip(whole.ema.shadow, second.ema.shadow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert [r["step"] for r in whole.history] == [r["step"] for r in second.history]
    assert whole.history[-1]["val_forces_mae"] == pytest.approx(
        second.history[-1]["val_forces_mae"], rel=1e-5
    )
    assert whole.schedule.state_dict() == pytest.approx(second.schedule.state_dict())
    assert_same_metrics(tmp_path / "whole" / "metrics.csv", tmp_path / "split" / "metrics.csv")


def test_a_training_state_is_no_model_checkpoint_and_says_how_to_export(tmp_path):
    """``checkpoint.pt`` (a run's state) given where a model is expected is named as a
    training state with the files to use instead; resuming with ``max_steps`` at its step,
    as the message says, writes ``final.pt`` from it."""
    frames = training_frames()
    Trainer(_resume_config(tmp_path, "run", 2), frames).fit()
    state = tmp_path / "run" / "checkpoint.pt"
    (tmp_path / "run" / "final.pt").unlink()
    with pytest.raises(CheckpointError, match=r"state of a training run.*best.pt or final.pt"):
        load_checkpoint(state, device="cpu")
    Trainer(_resume_config(tmp_path, "run", 2), frames, resume=state).fit()
    assert load_checkpoint(tmp_path / "run" / "final.pt", device="cpu").name == "forcenet"


class _Killed(Exception):
    """Stands for a kill (the process ends without saving anything more)."""


def test_a_killed_run_resumed_logs_the_rows_of_one_that_never_stopped(tmp_path, monkeypatch):
    """A run killed between two evaluations and resumed from its last state (saved by
    ``checkpoint_every`` at a step between two evaluations) writes the metrics.csv rows of a
    run that never stopped: the train loss and MAEs of the evaluation interval that spans the
    kill average the steps before the kill too, over the right number of steps."""
    frames = training_frames()
    config = _resume_config(tmp_path, "whole", 8).updated(checkpoint_every=4)  # evals: 3, 6
    Trainer(config, frames).fit()
    killed = config.updated(out=str(tmp_path / "killed"))
    step = Trainer.train_step

    def killed_at_step_5(trainer: Trainer, batch: TrainBatch) -> None:
        if trainer.step == 5:
            raise _Killed
        step(trainer, batch)

    monkeypatch.setattr(Trainer, "train_step", killed_at_step_5)
    with pytest.raises(_Killed):
        Trainer(killed, frames).fit()
    monkeypatch.undo()
    resumed = Trainer(killed, frames, resume=tmp_path / "killed" / "checkpoint.pt")
    assert resumed.step == 4
    resumed.fit()
    assert_same_metrics(tmp_path / "whole" / "metrics.csv", tmp_path / "killed" / "metrics.csv")


def test_a_float64_run_resumes_in_float64(tmp_path):
    """Resuming a float64 run loads its weights into a float64 model: no weight is rounded to
    float32 on the way (they were: 56 of 58 tensors), so the resumed state equals the saved
    one bit for bit."""
    frames = training_frames()
    config = _resume_config(tmp_path, "f64", 2).updated(dtype="float64")
    first = Trainer(config, frames)
    first.fit()
    saved = {k: v.clone() for k, v in first.potential.model.state_dict().items()}
    resumed = Trainer(config, frames, resume=tmp_path / "f64" / "checkpoint.pt")
    for key, value in resumed.potential.model.state_dict().items():
        assert value.dtype == saved[key].dtype, key
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0, equal_nan=True, msg=key)


_KILLER = """
import os, signal, sys
import torch
real_save = torch.save
calls = [0]

def save(obj, stream, *args, **kwargs):
    calls[0] += 1
    if calls[0] == {kill_at}:
        stream.write(b"half a checkpoint")
        stream.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, stream, *args, **kwargs)

torch.save = save
torch.set_num_threads(1)
from forcecalc.train import TrainConfig, Trainer
config = TrainConfig.from_file(sys.argv[1])
Trainer(config).fit()
"""


def test_kill_during_checkpoint_write_keeps_previous(tmp_path):
    """A process killed (SIGKILL) while writing ``checkpoint.pt`` leaves the previous one
    intact and loadable; the next run removes the half-written temp file and resumes."""
    frames = training_frames()
    from ase.io import write

    data = tmp_path / "frames.extxyz"
    write(data, frames[:8])
    config = TrainConfig(
        data=[str(data)],
        model="forcenet",
        model_kwargs={**FORCENET_TINY, "hidden_channels": 8, "decoder_hidden_channels": 8},
        out=str(tmp_path / "run"),
        device="cpu",
        progress=False,
        batch_size=2,
        val_fraction=0.0,
        max_steps=8,
        eval_every=1000,
        checkpoint_every=2,
    )
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config.as_dict()))
    script = tmp_path / "killer.py"
    script.write_text(textwrap.dedent(_KILLER.format(kill_at=2)))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    process = subprocess.run(
        [sys.executable, str(script), str(config_file)], env=env, capture_output=True
    )
    assert process.returncode == -signal.SIGKILL, process.stderr.decode()[-2000:]
    state_path = tmp_path / "run" / "checkpoint.pt"
    leftovers = list(state_path.parent.glob(".checkpoint.pt.*.tmp"))
    assert leftovers, "the kill should have left the temp file behind"
    state = torch.load(state_path, weights_only=True)
    assert state["step"] == 2
    trainer = Trainer(config, resume=state_path)
    assert trainer.step == 2
    assert not list(state_path.parent.glob(".checkpoint.pt.*.tmp"))
    trainer.fit()
    assert torch.load(state_path, weights_only=True)["step"] == 8


def test_outputs_metrics_and_final_checkpoint(tmp_path):
    """A run writes metrics.csv/json (energy MAE, force MAE, force cosine, EFwT per
    evaluation), config.yaml, best.pt and final.pt; final.pt loads with ``load_checkpoint``
    (forcecalc format, fitted normalizers, metadata, the training data's elements: Pt is
    refused) and predicts what the trained model predicts."""
    frames = training_frames()
    config = _resume_config(tmp_path, "run", 6)
    trainer = Trainer(config, frames)
    summary = trainer.fit()
    out = tmp_path / "run"
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["step"] for r in rows] == [3, 6]
    for key in ("val_energy_mae", "val_forces_mae", "val_forces_cos", "val_efwt", "train_loss"):
        assert key in rows[0]
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "val_efwt" in header
    assert (out / "config.yaml").exists() and (out / "best.pt").exists()
    potential = load_checkpoint(summary["final"], device="cpu")
    assert potential.info.source_format == "forcecalc"
    assert potential.info.normalizers == trainer.potential.info.normalizers
    meta = potential.info.metadata["training"]
    assert meta["config"]["max_steps"] == 6
    assert meta["data"]["train_frames"] == 16
    assert meta["metrics"]["step"] == 6
    assert {"device", "torch", "processes"} <= set(meta["hardware"])
    assert potential.elements == [8, 29]  # from scratch: the training data's elements
    with pytest.raises(ValueError, match=r"no parameters for element\(s\) Pt"):
        potential.check_elements([bulk("Pt", cubic=True)])
    with trainer.ema.applied():
        reference = predict(frames[:4], trainer.potential.eval())
    reloaded = predict(frames[:4], potential)
    for a, b in zip(reference, reloaded, strict=True):
        assert a["energy"] == pytest.approx(b["energy"], abs=1e-5)
        torch.testing.assert_close(a["forces"], b["forces"], atol=1e-5, rtol=1e-5)


def test_evaluation_after_a_last_step_off_the_evaluation_grid(tmp_path):
    """When the last step is not an evaluation step, the run still evaluates it: a metrics row
    marked ``final`` (also in final.pt's metadata), and best.pt if it scores best; the
    resumable history keeps only the regular evaluations (resuming stays exact)."""
    frames = training_frames()
    trainer = Trainer(_resume_config(tmp_path, "run", 7), frames)
    summary = trainer.fit()
    out = tmp_path / "run"
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["step"] for r in rows] == [3, 6, 7]
    assert rows[-1]["final"] is True and "final" not in rows[0]
    assert summary["metrics"]["step"] == 7
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert [r["step"] for r in state["history"]] == [3, 6]
    scores = [r["val_forces_mae"] for r in rows]
    assert state["best"] == pytest.approx(min(scores))
    best = load_checkpoint(out / "best.pt", device="cpu").info.metadata["training"]["metrics"]
    assert best["step"] == rows[scores.index(min(scores))]["step"]


def test_data_loader_workers_change_nothing(tmp_path):
    """Graphs built in data-loader worker processes (from a lazily read extxyz file) give the
    same run, to the bit, as graphs built in the training process."""
    from ase.io import write

    data = tmp_path / "frames.extxyz"
    write(data, training_frames()[:8])
    results = []
    for workers in (0, 2):
        config = _resume_config(tmp_path, f"workers{workers}", 4).updated(
            data=[str(data)], num_workers=workers, val_fraction=0.0
        )
        trainer = Trainer(config)
        trainer.fit()
        results.append(trainer.potential.model.state_dict())
    for key, value in results[0].items():
        assert torch.equal(value.nan_to_num(), results[1][key].nan_to_num()), key


def test_max_time_stops_the_run(tmp_path):
    """A wall-clock limit (``max_time``, e.g. a cluster job's) ends a one-process run after
    the step that spends it (it was checked every 10 steps: a run of slow steps overshot the
    job's limit by up to 9 of them), with the resumable state and ``final.pt`` written; the
    schedule still spans ``max_steps``."""
    config = _resume_config(tmp_path, "timed", 40).updated(max_time=1e-9, eval_every=0)
    summary = Trainer(config, training_frames()).fit()
    assert summary["step"] == 1
    assert Path(summary["final"]).exists()
    state = torch.load(tmp_path / "timed" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 1
    with pytest.raises(ValueError, match="max_time"):
        config.updated(max_time=0.0)


def test_exported_spinconv_fills_distance_scaling_of_pairs_absent_from_training(tmp_path):
    """Trained on Cu/O slabs and pure Au slabs (no Cu-Au edge), the written model's Cu-Au and
    Au-Cu distance scalings are the mean of the trained Cu-Cu and Au-Au ones (listed in the
    metadata); the live model is left alone."""
    from ase.build import fcc111
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    gold = []
    for seed in range(4):
        slab = fcc111("Au", (2, 2, 2), vacuum=5.0)
        slab.rattle(0.1, seed=seed)
        slab.calc = EMT()
        energy, forces = slab.get_potential_energy(), slab.get_forces()
        slab.calc = SinglePointCalculator(slab, energy=energy, forces=forces)
        gold.append(slab)
    frames = training_frames()[:8] + gold
    config = _config(tmp_path, "spinconv", SPINCONV_TINY, max_steps=2, eval_every=2, lr=1e-2)
    trainer = Trainer(config, frames, frames)
    summary = trainer.fit()
    written = load_checkpoint(summary["final"], device="cpu")
    assert sorted(map(tuple, written.info.metadata["training"]["filled_pairs"])) == [
        (29, 79),
        (79, 29),
    ]
    n = written.model.dist_block.max_num_elements
    for name in ("dist_scalar", "dist_offset"):
        table = getattr(written.model.dist_block, name).weight.view(n, n)
        live = getattr(trainer.potential.model.dist_block, name).weight.detach().view(n, n)
        mean = 0.5 * (table[29, 29] + table[79, 79])
        assert table[29, 79] == mean and table[79, 29] == mean
        assert abs(float(live[29, 79])) <= 1e-4


def test_exported_spinconv_keeps_pairs_trained_inside_the_initial_range(tmp_path):
    """A short, gentle run leaves pairs it trained (O->Cu: every frame has Cu-O edges) inside
    the range that marks an untrained pair, while others (Cu-Cu, Cu->O) lie outside; they are
    known trained from their gradients, so the written model keeps them: it is the model that
    was evaluated (O->Cu was overwritten with Cu->O's values, and the model written differed
    from the one whose metrics were logged)."""
    frames = training_frames()[:4]
    config = _config(tmp_path, "spinconv", SPINCONV_TINY, max_steps=2, eval_every=2, lr=1e-6)
    trainer = Trainer(config, frames, frames)
    ((name, block),) = trainer.distance_blocks.items()
    n = block.max_num_elements
    with torch.no_grad():  # Cu-Cu and Cu->O as a longer run leaves them, O->Cu not yet
        block.dist_scalar.weight.view(n, n)[[29, 29], [29, 8]] = torch.tensor([0.5, 0.3])
    summary = trainer.fit()
    trained = trainer.trained_pairs[name].view(n, n)
    assert trained[8, 29] and trained[29, 8] and trained[29, 29]
    live = block.dist_scalar.weight.detach().view(n, n)
    assert abs(float(live[8, 29])) <= 1e-4  # inside the range: a magnitude test calls it untrained
    written = load_checkpoint(summary["final"], device="cpu")
    assert "filled_pairs" not in written.info.metadata["training"]
    torch.testing.assert_close(
        dict(written.model.named_parameters())[f"{name}.dist_scalar.weight"],
        dict(trainer.potential.model.named_parameters())[f"{name}.dist_scalar.weight"],
    )


def test_a_first_batch_without_force_weight_is_warned_of(tmp_path):
    """``tag_weights`` 0 for tag 0 on frames without OC20 tags (ASE files: every tag 0) would
    train on energies alone without a word; the first step says so and why.  The frames'
    usual tags are fine."""
    untagged = [atoms.copy() for atoms in training_frames()[:4]]
    for atoms, frame in zip(untagged, training_frames()[:4], strict=True):
        atoms.set_tags(0)
        atoms.calc = frame.calc
    config = _resume_config(tmp_path, "tags", 1).updated(tag_weights=[0.0, 1.0, 1.0])
    with pytest.warns(ForcecalcWarning, match=r"force-loss weight 0.*tag_weights \[0.0, 1.0"):
        Trainer(config, untagged).fit()
    config = config.updated(out=str(tmp_path / "tagged"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ForcecalcWarning)
        Trainer(config, training_frames()[:4]).fit()


def test_a_diverged_run_stops_without_writing_its_weights(tmp_path):
    """A loss that stops being finite (lr 1e3, no clipping) stops the run with an error
    naming the steps, before any state, model or metrics of the diverged weights are written
    (it trained on to the end, exited 0 and wrote a final.pt of NaN weights)."""
    config = _resume_config(tmp_path, "diverged", 6).updated(
        lr=1e3, clip_grad_norm=None, warmup_steps=0, ema_decay=None
    )
    with pytest.raises(TrainingDiverged, match=r"not finite \(NaN or inf\) in steps 1-3"):
        Trainer(config, training_frames()[:6]).fit()
    assert sorted(p.name for p in (tmp_path / "diverged").iterdir()) == ["config.yaml"]


def test_validation_data_that_is_training_data_is_warned_of(tmp_path):
    """A file given as both training and validation data (the same path, however spelt) is
    warned of: its errors measure the fit, not unseen frames."""
    from ase.io import write

    data = tmp_path / "frames.extxyz"
    write(data, training_frames()[:4])
    config = _resume_config(tmp_path, "run", 1).updated(
        data=[str(data)], val_data=[str(tmp_path / "." / "frames.extxyz")]
    )
    with pytest.warns(ForcecalcWarning, match=r"validation data .*frames.extxyz is training data"):
        Trainer(config)


def test_tag_weights_refuse_tags_that_are_not_oc20s(tmp_path):
    """``tag_weights`` weigh OC20's tags 0, 1, 2; ASE's slab builders tag layers 1, 2, 3, ...
    (a 3-layer slab: tag 3 at the bottom), which were clamped to 2 without a word (the fixed
    bottom layer weighed as an adsorbate; OCP gives them 0).  Such a frame is an error naming
    it and its tags."""
    frames = emt_frames(n=4, layers=3)
    config = _resume_config(tmp_path, "tags", 1).updated(tag_weights=[0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"^frame \d+ has tags \[3\]: tag_weights weighs"):
        Trainer(config, frames).fit()


def test_training_force_mae_counts_free_atoms_as_validation(tmp_path):
    """The logged training force MAE is over free atoms, as the validation one (OC20's):
    one step on all frames equals the starting model's free-atom MAE on them (it counted
    the fixed atoms too, 19% off on these slabs)."""
    frames = training_frames()[:6]
    config = _resume_config(tmp_path, "mae", 1).updated(
        batch_size=6, val_fraction=0.0, ema_decay=None, rotation="none", normalizers="keep"
    )
    config = config.updated(init_checkpoint="forcenet", model="forcenet", model_kwargs={})
    trainer = Trainer(config, frames)
    start = predict(frames, trainer.potential.eval())
    summary = trainer.fit()
    errors = []
    for result, frame in zip(start, frames, strict=True):
        free = np.ones(len(frame), dtype=bool)
        free[frame.constraints[0].index] = False
        errors.append(np.abs(result["forces"] - frame_targets(frame)[1])[free])
    logged = summary["metrics"]["train_forces_mae"]
    assert logged == pytest.approx(np.concatenate(errors).mean(), rel=1e-6)


def _float64_run(tmp_path: Path) -> tuple[Trainer, list]:
    frames = training_frames()[:4]
    config = _resume_config(tmp_path, "f64", 2).updated(
        dtype="float64", ema_decay=None, val_fraction=0.0, rotation="none"
    )
    trainer = Trainer(config, frames)
    trainer.fit()
    return trainer, frames


def _assert_same_predictions(reference: list, other: list) -> None:
    for a, b in zip(reference, other, strict=True):
        assert a["energy"] == pytest.approx(b["energy"], abs=1e-12, rel=0)
        torch.testing.assert_close(a["forces"], b["forces"], atol=1e-12, rtol=0)


def test_float64_run_saves_float64_weights(tmp_path):
    """A float64 run writes best.pt and final.pt with float64 weights, final.pt's bit for bit
    the trained model's: a float64 model given them predicts the trained model's energies and
    forces to 1e-12."""
    trainer, frames = _float64_run(tmp_path)
    trained = trainer.potential.model.state_dict()
    for name in ("best.pt", "final.pt"):
        saved = torch.load(tmp_path / "f64" / name, weights_only=True)
        floats = {v.dtype for v in saved["state_dict"].values() if v.is_floating_point()}
        assert floats == {torch.float64}, name
    for key, value in saved["state_dict"].items():
        assert torch.equal(value.nan_to_num(), trained[key].nan_to_num()), key
    model = build_model(saved["model"], saved["model_kwargs"]).to(torch.float64)
    model.load_state_dict(saved["state_dict"])
    rebuilt = Potential(model, trainer.potential.info).eval()
    _assert_same_predictions(predict(frames, trainer.potential.eval()), predict(frames, rebuilt))


def test_float64_final_checkpoint_loads_with_the_trained_numbers(tmp_path):
    """final.pt of a float64 run, loaded with ``load_checkpoint(dtype="float64")``, predicts
    the trained model's energies and forces to 1e-12."""
    trainer, frames = _float64_run(tmp_path)
    reloaded = load_checkpoint(tmp_path / "f64" / "final.pt", device="cpu", dtype="float64")
    _assert_same_predictions(predict(frames, trainer.potential.eval()), predict(frames, reloaded))


def test_empty_or_unlabelled_data_files_are_named(tmp_path):
    """A training or validation file with no frames, or with a frame lacking forces, stops the
    run when it starts, naming the file (and the frame's index within that file)."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    frames = training_frames()[:4]
    data = tmp_path / "frames.extxyz"
    write(data, frames)
    empty = tmp_path / "empty.extxyz"
    empty.write_text("")
    unlabelled = frames[1].copy()
    unlabelled.calc = SinglePointCalculator(unlabelled, energy=1.0)
    partly = tmp_path / "partly.extxyz"
    write(partly, [frames[0], unlabelled])
    config = _resume_config(tmp_path, "run", 1).updated(data=[str(data)], val_fraction=0.0)
    with pytest.raises(ValueError, match=rf"validation data {re.escape(str(empty))} has no frames"):
        Trainer(config.updated(val_data=[str(empty)]))
    with pytest.raises(ValueError, match=rf"training data {re.escape(str(empty))} has no frames"):
        Trainer(config.updated(data=[str(data), str(empty)]))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(partly))}: frame 1 has no forces"):
        Trainer(config.updated(data=[str(data), str(partly)]))
    assert not (tmp_path / "run" / "final.pt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error(tmp_path):
    """``device="cuda"`` where CUDA is not available is a ``ValueError`` saying so, raised
    before any data is read."""
    config = _resume_config(tmp_path, "run", 1).updated(device="cuda", data=["missing.h5"])
    with pytest.raises(ValueError, match="'cuda' requested but CUDA is not available"):
        Trainer(config)


def test_keeping_normalizers_needs_a_checkpoint(tmp_path):
    """``normalizers="keep"`` without an init checkpoint is an error (it trained with the
    identity normalizers)."""
    config = _resume_config(tmp_path, "run", 1).updated(normalizers="keep")
    with pytest.raises(ValueError, match="normalizers='keep' keeps a checkpoint's normalizers"):
        Trainer(config, training_frames())


def test_energy_references_are_fitted_per_element(tmp_path):
    """``energy_references="fit"``: the normalizers get a reference energy per element, the
    least-squares fit of the energies on the element counts (exact here, where the energies
    are per-element sums, over CuO and Cu cells of 1 to 4 repeats), and the written model
    keeps them; it needs normalizers that are fitted."""
    from ase.calculators.singlepoint import SinglePointCalculator

    from forcecalc.train.trainer import fit_normalizers

    frames = []
    structures = [bulk("CuO", "rocksalt", a=4.2), bulk("Cu", "fcc", a=3.6, cubic=True)]
    for k, repeat in enumerate([(1, 1, 1), (2, 1, 1), (3, 1, 1), (2, 2, 1)]):
        atoms = structures[k % 2].repeat(repeat)
        atoms.rattle(0.05, seed=k)
        counts = np.bincount(atoms.numbers, minlength=30)
        energy = -3.5 * counts[29] - 4.25 * counts[8]
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=np.zeros((len(atoms), 3)))
        frames.append(atoms)
    norm = fit_normalizers(frames, 100, 0, references=True)
    assert dict(norm.element_references) == pytest.approx({8: -4.25, 29: -3.5})
    with pytest.raises(ValueError, match="do not determine a reference energy"):
        fit_normalizers(frames[::2], 100, 0, references=True)  # CuO only: one ratio
    assert abs(norm.energy_mean) < 1e-9
    config = _resume_config(tmp_path, "refs", 1).updated(
        energy_references="fit", val_fraction=0.0, rotation="none"
    )
    summary = Trainer(config, frames).fit()
    written = load_checkpoint(summary["final"], device="cpu")
    assert dict(written.info.normalizers.element_references) == pytest.approx({8: -4.25, 29: -3.5})
    finetune = TrainConfig(
        init_checkpoint=str(Path(__file__).parents[1] / "data" / "ocp" / "forcenet_small.pt"),
        energy_references="fit",
        out=str(tmp_path / "finetune"),
        device="cpu",
        progress=False,
    )  # fine-tuning keeps the checkpoint's normalizers unless told to fit them
    with pytest.raises(ValueError, match="energy_references='fit' fits them with the normalizers"):
        Trainer(finetune, frames)


def test_resuming_another_run_is_said(tmp_path):
    """Resuming with other data or batch size than the saved run's warns that the result is
    not a continuation of that run (it was silent)."""
    frames = training_frames()
    Trainer(_resume_config(tmp_path, "run", 2), frames).fit()
    state = tmp_path / "run" / "checkpoint.pt"
    with pytest.warns(UserWarning, match="resuming with other batch_size than the saved run"):
        Trainer(_resume_config(tmp_path, "run", 4).updated(batch_size=4), frames, resume=state)


def test_energy_targets_are_computed_in_float64():
    """The normalized energy targets subtract the element references from total energies in
    float64, before the cast to the model's dtype: a -2,000 eV total keeps the model's
    precision (in float32 the subtraction would be off by ~1e-4 eV)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    from forcecalc.checkpoint import Normalizers
    from forcecalc.train.data import Collater
    from forcecalc.train.trainer import energy_targets

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))  # 8 atoms
    total = 8 * -250.123456789 + 0.987654321
    atoms.calc = SinglePointCalculator(atoms, energy=total, forces=np.zeros((8, 3)))
    norm = Normalizers(energy_mean=0.5, energy_std=2.0, element_references=((29, -250.123456789),))
    batch = Collater(cutoff=4.0)([(0, atoms)])
    targets = energy_targets(batch, norm)
    assert targets.dtype == torch.float64
    expected = (total - 8 * -250.123456789 - 0.5) / 2.0
    assert float(targets[0]) == pytest.approx(expected, abs=1e-10)
    in_float32 = (np.float32(total) - np.float32(8 * -250.123456789) - 0.5) / 2.0
    assert abs(in_float32 - expected) > 1e-6  # what the cast first would have given


def test_validation_elements_without_a_reference_energy_are_refused(tmp_path):
    """With per-element energy references, validation frames holding an element that has
    none are refused at the start, naming it (their energy errors were NaN, and with
    ``monitor: energy_mae`` no best checkpoint was ever kept)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    def labelled(atoms):
        atoms.calc = SinglePointCalculator(
            atoms, energy=-3.0 * len(atoms), forces=np.zeros((len(atoms), 3))
        )
        return atoms

    cells = [bulk("CuO", "rocksalt", a=4.2), bulk("Cu", "fcc", a=3.6, cubic=True)]
    train = [labelled(cells[k % 2].repeat((k + 1, 1, 1))) for k in range(4)]
    val = [labelled(bulk("Ni", "fcc", a=3.52, cubic=True))]
    config = _resume_config(tmp_path, "refs", 1).updated(energy_references="fit", rotation="none")
    with pytest.raises(ValueError, match=r"the validation data has element\(s\) \[28\] without"):
        Trainer(config, train, val)
    assert not (tmp_path / "refs").exists()


def test_a_new_run_into_a_run_folder_needs_overwrite(tmp_path, monkeypatch):
    """Starting a new run (not ``--resume``) where another run left its files is an error
    saying how to continue or replace it (a warning only, before: an interrupted new run left
    the two runs' files mixed, the old one no longer resumable); with ``overwrite`` the old
    run's files are removed once the new run's first step has succeeded, so that a new run
    interrupted then leaves its own files only."""
    frames = training_frames()
    Trainer(_resume_config(tmp_path, "run", 1), frames).fit()
    assert (tmp_path / "run" / "final.pt").exists()
    with pytest.raises(ValueError, match=r"holds another training run \(checkpoint.pt, best.pt"):
        Trainer(_resume_config(tmp_path, "run", 1), frames)

    def interrupted(self: Trainer) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Trainer(_resume_config(tmp_path, "run", 1), frames, overwrite=True).fit()
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.yaml"]
