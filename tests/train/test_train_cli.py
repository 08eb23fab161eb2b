"""The training config file and the ``train`` / ``finetune`` subcommands."""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml
from ase.io import write
from train_fixtures import FORCENET_TINY, ocp_checkpoint, one_thread, training_frames  # noqa: F401

from forcecalc.train.cli import FINETUNE_DEFAULTS, add_train_commands, build_config
from forcecalc.train.config import TrainConfig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forcecalc")
    add_train_commands(parser.add_subparsers(dest="command"))
    return parser


def test_every_option_is_a_flag():
    """Each config option has a ``--flag`` on ``train`` and on ``finetune`` (which takes the
    starting checkpoint as its argument instead of ``--init-checkpoint``, and its model from
    that checkpoint: no ``--model``)."""
    parser = _parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("train", "finetune"):
        dests = {action.dest for action in subparsers.choices[command]._actions}
        missing = {f.name for f in fields(TrainConfig)} - dests
        assert missing == (set() if command == "train" else {"init_checkpoint", "model"}), command


def test_config_file_and_flags(tmp_path):
    """Values come from the defaults, then (finetune) a lower learning rate, then the YAML or
    JSON file, then the flags; unknown options and invalid choices are errors."""
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(yaml.safe_dump({"batch_size": 4, "model_kwargs": {"cutoff": 5.0}}))
    args = _parser().parse_args(
        ["train", "--config", str(config_file), "--batch-size", "16", "--no-amsgrad",
         "--clip-grad-norm", "none", "--data", "a.h5", "b.extxyz"]
    )  # fmt: skip
    config, resume = build_config(args)
    assert resume is None
    assert config.batch_size == 16 and config.model_kwargs == {"cutoff": 5.0}
    assert config.amsgrad is False and config.clip_grad_norm is None
    assert config.data == ["a.h5", "b.extxyz"]
    args = _parser().parse_args(["finetune", "ckpt.pt", "--data", "a.h5"])
    assert build_config(args, base={"lr": 1e-4})[0].lr == 1e-4
    json_file = tmp_path / "cfg.json"
    json_file.write_text(json.dumps({"lr": 3e-4}))
    assert TrainConfig.from_file(json_file).lr == 3e-4
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_dict({"learning_rate": 1.0})
    with pytest.raises(ValueError, match="given twice: max-epochs and max_epochs"):
        TrainConfig.from_dict({"max-epochs": 2, "max_epochs": 3})  # the later one won
    with pytest.raises(ValueError, match="force_loss must be one of"):
        TrainConfig(force_loss="huber")


@pytest.mark.parametrize(
    ("suffix", "text"),
    [
        (".yaml", "max_steps: 1\nbatch_size: 4\nmax_steps: 2\n"),
        (".yaml", "model_kwargs:\n  cutoff: 5.0\n  cutoff: 6.0\n"),
        (".json", '{"max_steps": 1, "batch_size": 4, "max_steps": 2}'),
    ],
)
def test_a_config_file_that_sets_an_option_twice_is_refused(tmp_path, suffix, text):
    """A key given twice in a YAML or JSON config file (at any depth) is an error naming it
    and the file, as the same option under two spellings is (YAML and JSON readers keep the
    last value silently: the run trained with a value the user may not have meant)."""
    path = tmp_path / f"cfg{suffix}"
    path.write_text(text)
    with pytest.raises(
        ValueError, match=rf"^{re.escape(str(path))}: .*'(max_steps|cutoff)' is given twice"
    ):
        TrainConfig.from_file(path)


def test_train_then_resume_from_the_command_line(tmp_path, capsys):
    """``forcecalc train`` trains on a file and writes ``final.pt``; ``--resume`` with a larger
    ``--max-steps`` continues the same run (its own options) from ``checkpoint.pt``, also
    where ``--resume`` names the run's folder."""
    data = tmp_path / "frames.extxyz"
    write(data, training_frames()[:6])
    out = tmp_path / "run"
    kwargs = json.dumps({**FORCENET_TINY, "hidden_channels": 8, "decoder_hidden_channels": 8})
    args = _parser().parse_args(
        ["train", "--data", str(data), "--model", "forcenet", "--model-kwargs", kwargs,
         "--out", str(out), "--device", "cpu", "--batch-size", "2", "--max-steps", "2",
         "--val-fraction", "0.34", "--no-progress"]
    )  # fmt: skip
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["step"] == 2 and "val_forces_mae" in printed
    assert (out / "final.pt").exists()
    args = _parser().parse_args(["train", "--resume", "--out", str(out), "--max-steps", "4"])
    assert args.func(args) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4 and state["config"]["batch_size"] == 2
    # the run's folder as STATE: its training state (it was called a corrupt checkpoint)
    args = _parser().parse_args(["train", "--resume", str(out), "--max-steps", "5"])
    assert args.func(args) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 5


def test_finetune_from_the_command_line(tmp_path):
    """``forcecalc finetune CHECKPOINT --freeze-except BLOCK`` fine-tunes an OCP checkpoint."""
    data = tmp_path / "frames.extxyz"
    write(data, training_frames()[:4])
    out = tmp_path / "ft"
    args = _parser().parse_args(
        ["finetune", str(ocp_checkpoint("forcenet_small")), "--data", str(data),
         "--freeze-except", "decoder", "--out", str(out), "--device", "cpu",
         "--batch-size", "2", "--max-steps", "1", "--val-fraction", "0", "--no-progress"]
    )  # fmt: skip
    assert args.func(args) == 0
    saved = torch.load(out / "final.pt", weights_only=True)
    assert saved["metadata"]["training"]["config"]["freeze_except"] == ["decoder"]
    assert saved["metadata"]["training"]["config"]["lr"] == 1e-4


def test_finetune_keeps_its_learning_rate_unless_the_file_or_a_flag_sets_it(tmp_path):
    """``finetune --config FILE``: options the file does not name keep finetune's defaults
    (lr 1e-4), not ``train``'s; an ``lr`` in the file, then an ``--lr`` flag, override it."""
    without_lr = tmp_path / "cfg.yaml"
    without_lr.write_text(yaml.safe_dump({"batch_size": 4}))
    with_lr = tmp_path / "lr.yaml"
    with_lr.write_text("lr: 3e-4\n")  # PyYAML reads 3e-4 as a string
    base = FINETUNE_DEFAULTS

    def config(*extra: str) -> TrainConfig:
        args = _parser().parse_args(["finetune", "ckpt.pt", "--data", "a.h5", *extra])
        return build_config(args, base=base)[0]

    assert config("--config", str(without_lr)).lr == 1e-4
    assert config("--config", str(without_lr)).batch_size == 4
    assert config("--config", str(with_lr)).lr == 3e-4
    assert config("--config", str(with_lr), "--lr", "2e-5").lr == 2e-5


def test_numbers_written_as_text_are_converted(tmp_path):
    """Numbers YAML leaves as strings (``1e-3``, ``1e4``) become the option's type; ``none``
    switches an optional option off; a path becomes a string."""
    path = tmp_path / "cfg.yaml"
    path.write_text("lr: 1e-3\nmax_steps: 1e4\nclip_grad_norm: none\nbatch_size: '4'\n")
    config = TrainConfig.from_file(path)
    assert config.lr == 1e-3 and isinstance(config.lr, float)
    assert config.max_steps == 10000 and isinstance(config.max_steps, int)
    assert config.clip_grad_norm is None and config.batch_size == 4
    assert TrainConfig(data=tmp_path / "a.h5", out=tmp_path).data == [str(tmp_path / "a.h5")]


BAD_VALUES = [
    ("lr", "fast"),
    ("lr", "-1e-3"),
    ("lr", 0),
    ("batch_size", 2.5),
    ("batch_size", 0),
    ("eval_batch_size", 0),
    ("max_steps", 0),
    ("max_steps", -3),
    ("max_epochs", -1),
    ("max_epochs", 0),
    ("max_time", float("inf")),
    ("energy_coefficient", -1.0),
    ("force_coefficient", -1.0),
    ("fixed_atom_weight", -0.05),
    ("tag_weights", [0.05, -1.0, 1.0]),
    ("tag_weights", [1.0, 1.0]),
    ("weight_decay", float("nan")),
    ("clip_grad_norm", -1.0),
    ("clip_grad_norm", 0),
    ("warmup_steps", -1),
    ("warmup_factor", 1.5),
    ("eval_every", -1),
    ("checkpoint_every", 2.5),
    ("checkpoint_every", 0),
    ("ema_decay", 1.5),
    ("ema_decay", 0),
    ("plateau_factor", 1.5),
    ("plateau_factor", 0),
    ("plateau_patience", -1),
    ("min_lr", -1e-6),
    ("normalizer_frames", 0),
    ("val_fraction", 1.0),
    ("val_max_frames", 0),
    ("seed", -1),
    ("split_seed", "abc"),
    ("num_workers", -2),
    ("amsgrad", "yes"),
    ("data", 3),
    ("model_kwargs", "cutoff=5"),
    ("dtype", "float16"),
]


@pytest.mark.parametrize(("key", "value"), BAD_VALUES, ids=[f"{k}={v}" for k, v in BAD_VALUES])
def test_bad_option_values_are_named_errors(tmp_path, key, value):
    """Each option of the wrong type or out of its range is a ``ValueError`` naming the option
    and the value, from Python and from a config file (the message then names the file)."""
    with pytest.raises(ValueError, match=rf"^{key}\b.*got"):
        TrainConfig(**{key: value})
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({key: value}))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: {key}\b.*got"):
        TrainConfig.from_file(path)


def test_a_run_that_fails_its_set_up_leaves_no_folder(tmp_path, monkeypatch, capsys):
    """`forcecalc train` on frames without labels fails with one line and leaves no empty
    output folder behind (the folder is made once the set-up has passed its checks); an
    output path under a file is refused before anything is read."""
    from ase.build import fcc111

    from forcecalc.cli import main

    monkeypatch.chdir(tmp_path)
    write("nolabel.extxyz", fcc111("Cu", size=(2, 2, 2), vacuum=5.0))
    assert main(["train", "--data", "nolabel.extxyz", "--out", "run", "--device", "cpu"]) == 2
    assert "forcecalc: error:" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(["train", "--data", "nolabel.extxyz", "--out", "nolabel.extxyz/run"]) == 2
    assert "nolabel.extxyz is a file" in capsys.readouterr().err


@pytest.mark.parametrize("broken", ["nan-position", "unparseable-position"])
def test_a_bad_frame_found_while_training_leaves_no_output_behind(
    tmp_path, monkeypatch, capsys, broken
):
    """A frame that opening the data cannot find bad (a NaN position; a position ASE cannot
    parse), read first by the first step (fine-tuning reads no frame to fit normalizers),
    fails the run with one line naming its file and its index within that file; a run that
    fails before its first step leaves no output folder it made behind (two levels here),
    and a folder that was there before as it was (no config.yaml written; with --overwrite,
    the previous run's files are removed only once the first step has succeeded)."""
    from forcecalc.cli import main

    monkeypatch.chdir(tmp_path)
    frames = training_frames()[:3]
    write("good.extxyz", frames[:2])
    write("bad.extxyz", frames)
    lines = Path("bad.extxyz").read_text().splitlines()
    first_atom = 2 * (len(frames[0]) + 2) + 2  # frame 2's first atom line
    fields = lines[first_atom].split()
    fields[1] = "nan" if broken == "nan-position" else "not-a-number"
    lines[first_atom] = " ".join(fields)
    Path("bad.extxyz").write_text("\n".join(lines) + "\n")
    Path("old").mkdir()
    Path("old/config.yaml").write_text("a previous run's options\n")
    args = ["finetune", str(ocp_checkpoint("forcenet_small")), "--data", "good.extxyz",
            "bad.extxyz", "--device", "cpu", "--batch-size", "5", "--val-fraction", "0",
            "--max-steps", "1", "--no-progress", "--overwrite"]  # fmt: skip
    for out in ("new/run", "old"):
        assert main([*args, "--out", out]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1, err
        assert err.startswith("forcecalc: error: bad.extxyz: frame 2"), err
    assert sorted(os.listdir(tmp_path)) == ["bad.extxyz", "good.extxyz", "old"]
    assert os.listdir("old") == ["config.yaml"]
    assert Path("old/config.yaml").read_text() == "a previous run's options\n"


def test_an_output_folder_the_system_cannot_make_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """An ``--out`` folder under a writable folder that the system still cannot make (a name
    of 300 characters, too long for the file system; a path through a broken symbolic link)
    is a one-line error naming the folder and the reason, before the data is read, and
    leaves no folder behind (not the ones made on the way to the failing one)."""
    from forcecalc.cli import main

    monkeypatch.chdir(tmp_path)
    write("frames.extxyz", training_frames()[:2])
    Path("link").symlink_to("nowhere")
    long_out = "made/" + "x" * 300
    cases = {
        long_out: os.strerror(errno.ENAMETOOLONG),
        "link/run": "link is a broken symbolic link",
    }
    for out, reason in cases.items():
        code = main(["train", "--data", "frames.extxyz", "--out", out, "--device", "cpu"])
        assert code == 2
        assert capsys.readouterr().err == (
            f"forcecalc: error: cannot write the run into {out}: {reason}\n"
        )
    assert sorted(os.listdir(tmp_path)) == ["frames.extxyz", "link"]


def test_a_missing_config_file_is_named(tmp_path, capsys):
    """``train --config FILE`` where FILE does not exist, or is a folder, is a one-line error
    naming the config file (not a bare ``[Errno 2]`` about some path), exit code 2."""
    from forcecalc.cli import main

    for path, problem in [(tmp_path / "none.yaml", "does not exist"), (tmp_path, "is a folder")]:
        assert main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
        assert capsys.readouterr().err == f"forcecalc: error: config file {path} {problem}\n"
