"""Contrastive CLIP training as a task for the shared Trainer (used by `train-clip`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import save_pretrained_dir
from ..config import ConfigError, config_to_dict
from ..data.image_text import ImageTextDataset, collate_image_text
from ..data.sources import training_rows
from ..train import TrainConfig
from .config import ClipConfig
from .model import KIND, Clip, contrastive_loss

__all__ = ["ClipDataConfig", "TrainClipConfig", "ClipTrainTask"]

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps its learned temperature at 100


@dataclass(frozen=True)
class ClipDataConfig:
    """Image-text training data: the built-in SHAPES set, or a local/hub dataset."""

    source: str = "shapes"  # "shapes" (built-in, training split) or a path / hub name for load_image_text_dataset
    image_column: str = "image"  # column holding the images
    caption_column: str = "caption"  # column holding the captions
    split: str = "train"  # split to read from a hub dataset
    shapes_samples: int = 20000  # SHAPES only: number of training images generated
    shapes_seed: int = 0  # SHAPES only: generation seed
    shapes_resolution: int = 64  # SHAPES only: image side in pixels


@dataclass(frozen=True)
class TrainClipConfig:
    """Everything `train-clip` reads from `configs/clip/*.yaml`."""

    model: ClipConfig  # architecture and optional starting weights
    data: ClipDataConfig = field(default_factory=ClipDataConfig)  # training data
    train: TrainConfig = field(default_factory=TrainConfig)  # optimisation, logging, checkpoints
    eval_samples: int = 500  # SHAPES only: held-out images for the final zero-shot evaluation (0: skip)


class ClipTrainTask:
    """Trains an open_clip model with open_clip's contrastive loss and a learnable temperature."""

    def __init__(self, cfg: TrainClipConfig) -> None:
        if cfg.train.init_from is not None:
            raise ConfigError("train-clip starts from the weights of model.checkpoint (a CLIP directory or an "
                              "open_clip file) or model.pretrained, not train.init_from")
        self.cfg = cfg
        self.clip = Clip.from_config(cfg.model)
        self.model: nn.Module = self.clip.model
        self.model.requires_grad_(True).train()

    def train_dataset(self) -> ImageTextDataset:
        data = self.cfg.data
        hf = training_rows(data)
        return ImageTextDataset(hf, self.clip.image_transform, image_column=data.image_column,
                                caption_column=data.caption_column)

    def collate_fn(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate_image_text(items)
        if batch["captions"]:
            batch["tokens"], _ = self.clip.tokenize(batch["captions"], rows=batch["index"])
        return batch

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        inner = getattr(model, "module", model)
        with torch.no_grad():
            inner.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        out = model(image=batch["images"], text=batch["tokens"])
        image_features, text_features, logit_scale = (
            (out["image_features"], out["text_features"], out["logit_scale"]) if isinstance(out, dict) else out[:3]
        )
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        loss = contrastive_loss(image_features, text_features, logit_scale, rank=rank, world_size=world)
        with torch.no_grad():
            logits = image_features @ text_features.T  # (b, b)
            target = torch.arange(len(logits), device=logits.device)
            acc = (logits.argmax(dim=1) == target).float().mean()  # 0-d tensors: read when the trainer logs
        return loss, {"i2t_acc": acc, "temperature": logit_scale.detach().float().mean()}

    def export(self, model: nn.Module, out_dir: Path, state_dict: dict[str, torch.Tensor]) -> None:
        """Write the trained model in our pretrained format: `state_dict` is the full weights."""
        save_pretrained_dir(out_dir, kind=KIND, config=self.clip.pretrained_config(), state_dict=state_dict)

    def config_dict(self) -> dict[str, Any]:
        return config_to_dict(self.cfg)
