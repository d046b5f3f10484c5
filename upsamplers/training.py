"""Upsampler training as a task for the shared Trainer (used by `train-decoder` with `stage: upsampler`).

Each batch: high-resolution images (b, 3, S, S) in [0, 1] (S = image_size); their low-resolution versions made
by area-downsampling to low_res_size; each row corrupted at a level drawn uniformly from [0, max_aug_level]
(Gaussian blur or BSR, `degradations.py`) and upsampled back to S. Then one random crop per row (crop_size, by
default S / 4, at an offset aligned to the low-res pixel grid) is cut from the same place of the image and of
its conditioning, and the shared diffusion loss is taken on the crop at a uniformly drawn timestep, the level
being given to the model. All randomness comes from the global torch RNG, which the trainer checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.data import Dataset

from unclip.config import config_to_dict
from unclip.data import ImageTextDataset, collate_image_text, make_shapes
from unclip.data.sources import training_rows
from unclip.diffusion import q_sample, sample_timesteps, training_loss
from unclip.images import SquareImage, resize_images, to_signed_range
from unclip.train import unwrap_model

from .config import TrainUpsamplerConfig
from .model import Upsampler, save_state, upsample_bicubic
from .sampling import upsample

__all__ = ["UpsamplerTrainTask", "random_crops"]


def random_crops(images: list[Tensor], size: int, align: int = 1) -> list[Tensor]:
    """The same random size x size window of each row of every tensor in `images` (each (b, c, H, W)).

    Offsets are multiples of `align` and drawn from the global torch RNG; returns tensors (b, c, size, size).
    """
    b, _, h, w = images[0].shape
    assert all(x.shape[0] == b and x.shape[-2:] == (h, w) for x in images), "the tensors must share b, H and W"
    top = torch.randint(0, (h - size) // align + 1, (b,)) * align
    left = torch.randint(0, (w - size) // align + 1, (b,)) * align
    return [torch.stack([x[i, :, top[i]:top[i] + size, left[i]:left[i] + size] for i in range(b)]) for x in images]


class UpsamplerTrainTask:
    """Trains an `Upsampler` on random crops of images with corrupted low-resolution conditioning."""

    def __init__(self, cfg: TrainUpsamplerConfig) -> None:
        self.cfg = cfg
        self.model: nn.Module = Upsampler(cfg.model)
        self._dataset: Dataset | None = None
        self._grid: Tensor | None = None

    def train_dataset(self) -> Dataset:
        data = self.cfg.data
        self._dataset = ImageTextDataset(training_rows(data), SquareImage(self.cfg.model.image_size),
                                         image_column=data.image_column, caption_column=data.caption_column)
        return self._dataset

    def collate_fn(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_image_text(items)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg.model
        upsampler: Upsampler = unwrap_model(model)
        images = batch["images"]  # (b, 3, S, S) in [0, 1]
        b, device = images.shape[0], images.device
        with torch.no_grad():
            low_res = resize_images(images, cfg.low_res_size)  # (b, 3, s, s), area average
            level = torch.rand(b) * cfg.max_aug_level  # (b,)
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))  # BSR's own choices
            cond = upsampler.conditioning(low_res, level, generator)  # (b, 3, S, S)
            x0, cond = random_crops([to_signed_range(images), cond], self.cfg.crop_size, align=cfg.scale)
        t = sample_timesteps(b, upsampler.schedule, device=device)
        noise = torch.randn_like(x0)
        x_t = q_sample(upsampler.schedule, x0, t, noise)
        out = model(x_t, t, low_res_up=cond, aug_level=level.to(device))
        loss, metrics = training_loss(cfg.diffusion, out, x0, x_t, t, noise, upsampler.schedule)
        metrics["aug_level"] = float(level.mean())
        return loss, metrics

    # ----- side outputs -------------------------------------------------------------------------------------
    def _grid_images(self) -> Tensor:
        """k images (k, 3, S, S) in [0, 1]: held-out SHAPES, or the first training images of another source."""
        if self._grid is None:
            k, side = self.cfg.eval.sample_grid, self.cfg.model.image_size
            if self.cfg.data.source == "shapes":
                rows = make_shapes(k, split="heldout", seed=self.cfg.eval.seed, resolution=side)
                self._grid = torch.stack([SquareImage(side)(im) for im in rows["image"]])
            else:
                dataset = self._dataset if self._dataset is not None else self.train_dataset()
                self._grid = torch.stack([dataset[i]["image"] for i in range(k)])
        return self._grid

    def sample_images(self, model: nn.Module, step: int) -> Tensor:
        """Triplets (bicubic, upsampled by the model, original) of k images at full size: (3k, 3, S, S) in [0, 1]."""
        upsampler: Upsampler = unwrap_model(model)
        device = next(upsampler.parameters()).device
        images, ev = self._grid_images(), self.cfg.eval
        low_res = resize_images(images, self.cfg.model.low_res_size)
        out = upsample(upsampler, low_res.to(device), steps=ev.steps, sampler=ev.sampler,
                       generator=torch.Generator(device).manual_seed(ev.seed)).cpu()
        columns = [upsample_bicubic(low_res, self.cfg.model.scale).clamp(0, 1), out, images]
        return rearrange(torch.stack(columns), "c k ch h w -> (k c) ch h w")

    def export(self, model: nn.Module, out_dir: Path, state_dict: dict[str, Tensor]) -> None:
        """Write the trained upsampler: `state_dict` is the full weights (the EMA's when EMA is on)."""
        save_state(out_dir, self.cfg.model, state_dict)

    def config_dict(self) -> dict[str, Any]:
        return config_to_dict(self.cfg)
