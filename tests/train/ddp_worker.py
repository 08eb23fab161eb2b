"""One process of the 2-process gloo test (``test_train_ddp.py``): reads the run's config and
frames, trains, and lets rank 0 write the training state.  Started with torchrun's variables
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``)."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from ase.io import read

from forcecalc.train import TrainConfig, Trainer


def main(config_path: str, frames_path: str) -> None:
    torch.set_num_threads(1)
    frames = read(frames_path, index=":")
    Trainer(TrainConfig.from_file(config_path), frames, []).fit()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
