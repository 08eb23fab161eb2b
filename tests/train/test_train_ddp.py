"""Data-parallel training: 2 gloo processes on 127.0.0.1 equal 1 process with the same global
batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ase.io import read, write
from train_fixtures import FORCENET_TINY, SPINCONV_TINY, one_thread, training_frames  # noqa: F401

from forcecalc.train import TrainConfig, Trainer

WORKER = Path(__file__).with_name("ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config(out: Path, model: str, kwargs: dict, batch_size: int) -> TrainConfig:
    return TrainConfig(
        model=model,
        model_kwargs=kwargs,
        out=str(out),
        device="cpu",
        dtype="float64",
        progress=False,
        batch_size=batch_size,
        val_fraction=0.0,
        max_steps=3,
        eval_every=1000,
        rotation="auto",
        lr=1e-2,
    )


def _launch(tmp_path: Path, runs: list[tuple[Path, Path]]) -> None:
    """Start 2 worker processes per run (all runs at once) and wait for them."""
    root = Path(__file__).resolve().parents[2]
    processes = []
    for config_path, frames_path in runs:
        port = _free_port()
        for rank in range(2):
            env = {
                **os.environ,
                "PYTHONPATH": str(root),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "WORLD_SIZE": "2",
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "OMP_NUM_THREADS": "1",
            }
            processes.append(
                subprocess.Popen(
                    [sys.executable, str(WORKER), str(config_path), str(frames_path)],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
            )
    for process in processes:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output.decode()[-3000:]


@pytest.mark.parametrize(
    ("model", "kwargs"),
    [
        ("forcenet", {**FORCENET_TINY, "hidden_channels": 16, "decoder_hidden_channels": 16}),
        ("spinconv", {**SPINCONV_TINY, "force_estimator": "grad"}),
    ],
    ids=["forcenet-batchnorm", "spinconv-energy-centric"],
)
def test_two_gloo_processes_equal_one(tmp_path, model, kwargs):
    """2 processes with 2 frames each per step (gloo, CPU, float64) end with the parameters,
    batch-norm statistics and optimizer moments of 1 process with 4 frames per step: the loss
    is normalized over the global batch, gradients are averaged, batch-norm statistics are
    computed over both processes, and rotations are a function of the frame."""
    frames = training_frames()
    if model == "spinconv":
        pytest.importorskip("forcecalc.models.spinconv")
    frames_path = tmp_path / "frames.extxyz"
    write(frames_path, frames[:8])
    config = _config(tmp_path / "ddp", model, kwargs, batch_size=2)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config.as_dict()))
    _launch(tmp_path, [(config_path, frames_path)])

    same_frames = read(frames_path, index=":")  # the workers' frames, to the last digit
    single = Trainer(_config(tmp_path / "single", model, kwargs, batch_size=4), same_frames, [])
    single.fit()
    state = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 3
    expected = single.potential.model.state_dict()
    assert set(state["model"]) == set(expected)
    # A bias right before a batch norm has a zero gradient up to rounding, which Adam scales to
    # steps of ~1e-8; every other parameter agrees to ~1e-14.  atol 1e-6 is 1e-4 of one step.
    for key, value in expected.items():
        torch.testing.assert_close(
            state["model"][key], value, rtol=1e-7, atol=1e-6, equal_nan=True, msg=key
        )
    moments = single.optimizer.state_dict()["state"]
    for index, entry in state["optimizer"]["state"].items():
        torch.testing.assert_close(
            entry["exp_avg"], moments[index]["exp_avg"], rtol=1e-6, atol=1e-9
        )
