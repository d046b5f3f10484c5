"""Upsampler training as a task for the shared Trainer (used by `train-decoder` with `stage: upsampler`).

Each training sample: a high-resolution image (3, S, S) in [0, 1] (S = image_size); its low-resolution version made
by area-downsampling to low_res_size, corrupted at a level drawn uniformly from [0, max_aug_level] (Gaussian blur or
BSR, `degradations.py`) and upsampled back to S; then one random crop (crop_size, by default S / 4, at an offset
aligned to the low-res pixel grid) cut from the same place of the image and of its conditioning. The shared
diffusion loss is taken on the crop at a uniformly drawn timestep, the level being given to the model.

Where the work happens: everything up to the crops (`training_crops`) is done by `collate_fn`, which the trainer's
DataLoader runs in its worker processes when `train.num_workers` > 0 (in the main process, just before the step,
when it is 0). The conditioning needs the config, not the weights (`corrupt_and_upsample`), so the workers hold no
model. The training step receives ready tensors, x0 (b, 3, c, c) in [-1, 1], low_res_up (b, 3, c, c) and aug_level
(b,) (c = crop_size), and draws only the timesteps and the noise: no CPU degradation stalls the accelerator.

Randomness: every dataset item carries an `aug_seed`, drawn from the global torch RNG inside `dataset[i]`, which the
trainer seeds per sample from (train.seed, stream position) (`unclip.train.data`); the collate draws the levels, the
degradation and the crops from one generator seeded from the aug_seeds of its batch. So a batch's augmentation is a
function of (seed, the stream positions of its samples) alone: the same with any number of workers (none of it comes
from a worker's RNG), and after a resume, which restarts the stream at the saved position with the same batches
(same world size and batch size, as the trainer's exact resume needs anyway). Timesteps and noise come from the
global torch RNG in the step, which the trainer checkpoints: a resumed run is bit-identical to an unbroken one.
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
from unclip.train.data import mix_seed

from .config import TrainUpsamplerConfig, UpsamplerConfig
from .model import Upsampler, corrupt_and_upsample, save_state, upsample_bicubic
from .sampling import upsample

__all__ = ["UpsamplerTrainTask", "random_crops", "training_crops"]


def random_crops(images: list[Tensor], size: int, align: int = 1,
                 generator: torch.Generator | None = None) -> list[Tensor]:
    """The same random size x size window of each row of every tensor in `images` (each (b, c, H, W)).

    Offsets are multiples of `align`, drawn from `generator` (CPU; None: the global torch RNG); returns tensors
    (b, c, size, size).
    """
    b, _, h, w = images[0].shape
    assert all(x.shape[0] == b and x.shape[-2:] == (h, w) for x in images), "the tensors must share b, H and W"
    top = torch.randint(0, (h - size) // align + 1, (b,), generator=generator) * align
    left = torch.randint(0, (w - size) // align + 1, (b,), generator=generator) * align
    return [torch.stack([x[i, :, top[i]:top[i] + size, left[i]:left[i] + size] for i in range(b)]) for x in images]


def training_crops(config: UpsamplerConfig, images: Tensor, crop_size: int,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The training inputs (x0, low_res_up, aug_level) made from images (b, 3, S, S) in [0, 1] (CPU).

    In order from `generator` (None: the global torch RNG): the levels (b,), uniform in [0, max_aug_level]; the
    degradation of the area-downsampled images at those levels (`corrupt_and_upsample`, upsampled back to S); one
    crop per row, aligned to the low-res grid, of the images in [-1, 1] (x0) and of the conditioning (low_res_up),
    both (b, 3, crop_size, crop_size).
    """
    b, side = images.shape[0], config.image_size
    assert images.shape[1:] == (3, side, side), f"images must be (b, 3, {side}, {side}), got {tuple(images.shape)}"
    low_res = resize_images(images, config.low_res_size)  # (b, 3, s, s), area average
    level = torch.rand(b, generator=generator) * config.max_aug_level  # (b,)
    cond = corrupt_and_upsample(config, low_res, level, generator)  # (b, 3, S, S)
    x0, cond = random_crops([to_signed_range(images), cond], crop_size, align=config.scale, generator=generator)
    return x0, cond, level


class _WithAugSeed(Dataset):
    """The items of `dataset` with an "aug_seed" drawn from the global torch RNG (seeded per sample by the trainer)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        seed = int(torch.randint(0, 2**62, ()))
        return {**self.dataset[i], "aug_seed": seed}


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
        return _WithAugSeed(self._dataset)

    def collate_fn(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Ready training inputs (made in the DataLoader workers): x0 and low_res_up (b, 3, c, c), aug_level (b,),
        index (b,), num_skipped and skip_reasons, by `training_crops` with a generator seeded from the items'
        aug_seeds."""
        batch, crop = collate_image_text(items), self.cfg.crop_size
        if len(batch["index"]):
            generator = torch.Generator().manual_seed(mix_seed(*batch["aug_seed"].tolist()))
            x0, cond, level = training_crops(self.cfg.model, batch["images"], crop, generator)
        else:  # every item was bad: an empty batch, which the trainer skips
            x0, cond, level = torch.empty(0, 3, crop, crop), torch.empty(0, 3, crop, crop), torch.empty(0)
        return {"x0": x0, "low_res_up": cond, "aug_level": level, "index": batch["index"],
                "num_skipped": batch["num_skipped"], "skip_reasons": batch["skip_reasons"]}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """The diffusion loss on a `collate_fn` batch, whose crops, conditioning and levels are ready."""
        upsampler: Upsampler = unwrap_model(model)
        x0, cond, level = batch["x0"], batch["low_res_up"], batch["aug_level"]  # (b, 3, c, c) x 2, (b,)
        t = sample_timesteps(x0.shape[0], upsampler.schedule, device=x0.device)
        noise = torch.randn_like(x0)
        x_t = q_sample(upsampler.schedule, x0, t, noise)
        out = model(x_t, t, low_res_up=cond, aug_level=level)
        loss, metrics = training_loss(self.cfg.model.diffusion, out, x0, x_t, t, noise, upsampler.schedule)
        metrics["aug_level"] = level.mean()
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
