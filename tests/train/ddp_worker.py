"""One process of the 2-process gloo test (``test_train_ddp.py``): trains every run named on
the command line, one after the other, in the same process group; rank 0 writes each run's
training state.  Started with torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``).

Usage: ``python ddp_worker.py FRAMES CONFIG [CONFIG ...]``; a ``CONFIG`` written
``resume:PATH`` continues the run in its ``out`` folder (from its ``checkpoint.pt``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from ase.io import read

from forcecalc.train import TrainConfig, Trainer
from forcecalc.train.distributed import leave_process_group


def main(frames_path: str, *config_paths: str) -> None:
    torch.set_num_threads(1)
    frames = read(frames_path, index=":")
    for path in config_paths:
        resume = path.startswith("resume:")
        config = TrainConfig.from_file(path.removeprefix("resume:"))
        state = Path(config.out) / "checkpoint.pt" if resume else None
        Trainer(config, frames, [], resume=state).fit()
    leave_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
