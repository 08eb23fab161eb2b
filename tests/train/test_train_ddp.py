"""Data-parallel training: 2 gloo processes on 127.0.0.1 equal 1 process with the same global
batch."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ase.io import read, write
from train_fixtures import (  # noqa: F401
    FORCENET_TINY,
    SPINCONV_TINY,
    assert_same_metrics,
    ocp_checkpoint,
    one_thread,
    training_frames,
)

from forcecalc.train import TrainConfig, Trainer

WORKER = Path(__file__).with_name("ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config(out: Path, batch_size: int, **changes) -> TrainConfig:
    values = {
        "out": str(out),
        "device": "cpu",
        "dtype": "float64",
        "progress": False,
        "batch_size": batch_size,
        "val_fraction": 0.0,
        "max_steps": 3,
        "eval_every": 1000,
        "rotation": "auto",
        "lr": 1e-2,
        **changes,
    }
    return TrainConfig(**values)


RUNS = {
    "forcenet-batchnorm": {
        "model": "forcenet",
        "model_kwargs": {**FORCENET_TINY, "hidden_channels": 16, "decoder_hidden_channels": 16},
    },
    "spinconv-energy-centric": {
        "model": "spinconv",
        "model_kwargs": {**SPINCONV_TINY, "force_estimator": "grad"},
    },
    "forcenet-finetune-decoder": {
        "init_checkpoint": str(ocp_checkpoint("forcenet_small")),
        "freeze_except": ["decoder"],
    },
}


#: A run stopped between two evaluations (at step 3 of 5, evaluations every 2 steps) and
#: resumed, and the same run without a stop: (name, max_steps, resumed).
RESUMED = [("whole", 5, False), ("stopped", 3, False), ("stopped", 5, True)]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    """Every run trained by 2 gloo worker processes (one launch: startup is the slow part):
    each of ``RUNS``, then those of ``RESUMED`` in order.

    Returns:
        The folder holding ``frames.extxyz`` and one output folder per run.
    """
    folder = tmp_path_factory.mktemp("ddp")
    frames_path = folder / "frames.extxyz"
    write(frames_path, training_frames()[:8])
    configs = []
    for name, changes in RUNS.items():
        if "spinconv" in name and importlib.util.find_spec("forcecalc.models.spinconv") is None:
            continue
        path = folder / f"{name}.json"
        path.write_text(json.dumps(_config(folder / name, 2, **changes).as_dict()))
        configs.append(str(path))
    for name, max_steps, resumed in RESUMED:
        config = _config(
            folder / name, 2, **RUNS["forcenet-batchnorm"], max_steps=max_steps, eval_every=2
        )
        path = folder / f"{name}-{max_steps}.json"
        path.write_text(json.dumps(config.as_dict()))
        configs.append(f"resume:{path}" if resumed else str(path))
    root = Path(__file__).resolve().parents[2]
    port = _free_port()
    processes = []
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
                [sys.executable, str(WORKER), str(frames_path), *configs],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    for rank, process in enumerate(processes):
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output.decode()[-3000:]
        (folder / f"rank{rank}.log").write_bytes(output)
    return folder


@pytest.mark.parametrize("name", list(RUNS))
def test_two_gloo_processes_equal_one(ddp_runs, name):
    """2 processes with 2 frames each per step (gloo, CPU, float64) end with the parameters,
    batch-norm statistics and optimizer moments of 1 process with 4 frames per step: the loss
    is normalized over the global batch, gradients are averaged, batch-norm statistics are
    computed over both processes (and stay frozen in frozen blocks), rotations are a function
    of the frame."""
    same_frames = read(ddp_runs / "frames.extxyz", index=":")  # the workers' frames, exactly
    single = Trainer(_config(ddp_runs / f"{name}-single", 4, **RUNS[name]), same_frames, [])
    single.fit()
    state = torch.load(ddp_runs / name / "checkpoint.pt", weights_only=True)
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


def test_two_processes_resumed_log_the_rows_of_a_run_that_never_stopped(ddp_runs):
    """A 2-process run stopped between two evaluations and resumed writes the metrics.csv
    rows of the run that did not stop: the train loss and MAEs of the interval that spans the
    resume count the steps before the stop once for each process (the running sums of every
    process are in the saved state, not process 0's alone)."""
    stopped = ddp_runs / "stopped"
    assert torch.load(stopped / "checkpoint.pt", weights_only=True)["step"] == 5
    assert_same_metrics(ddp_runs / "whole" / "metrics.csv", stopped / "metrics.csv")


def test_global_batch_norm_uses_no_deprecated_collective(ddp_runs):
    """The processes' differentiable all-reduce of batch-norm sums is forcecalc's own: torch's
    ``torch.distributed.nn.functional.all_reduce`` printed a FutureWarning ("is deprecated")
    in every process of every multi-process training run."""
    for rank in range(2):
        log = (ddp_runs / f"rank{rank}.log").read_text()
        assert "FutureWarning" not in log and "deprecated" not in log, (rank, log[-2000:])
