"""The shared trainer behind every `train-*` script (see `trainer.py` for the task protocol).

    from unclip.train import TrainConfig, Trainer
    result = Trainer(task, TrainConfig(max_steps=10_000), "runs/decoder").train()
"""

from __future__ import annotations

from .config import TrainConfig
from .data import epoch_permutation
from .device import end_process, unwrap_model
from .ema import EMA
from .logging import RunLogger, save_image_grid
from .lr import build_lr_scheduler, build_optimizer, lr_factor
from .state import find_latest_checkpoint, load_training_checkpoint, save_training_checkpoint
from .trainer import NonFiniteLossError, Trainer, TrainResult, TrainTask

__all__ = [
    "TrainConfig",
    "Trainer",
    "TrainTask",
    "TrainResult",
    "NonFiniteLossError",
    "EMA",
    "RunLogger",
    "save_image_grid",
    "build_optimizer",
    "build_lr_scheduler",
    "lr_factor",
    "epoch_permutation",
    "find_latest_checkpoint",
    "load_training_checkpoint",
    "save_training_checkpoint",
    "unwrap_model",
    "end_process",
]
