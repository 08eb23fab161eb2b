"""Training and fine-tuning of SpinConv and ForceNet (``forcecalc train`` / ``finetune``).

See ``forcecalc/train/README.md`` for the options and an example configuration.
"""

from forcecalc.train.config import TrainConfig
from forcecalc.train.data import BatchPlan, Collater, TrainBatch, open_frames
from forcecalc.train.trainer import Trainer, train

__all__ = ["BatchPlan", "Collater", "TrainBatch", "TrainConfig", "Trainer", "open_frames", "train"]
