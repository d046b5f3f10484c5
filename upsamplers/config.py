"""Configs of an upsampler: the model (saved with every checkpoint) and everything `train-decoder` reads for it.

    cfg = load_config(TrainUpsamplerConfig, "configs/upsamplers/shapes-32-64.yaml")
    upsampler = Upsampler(cfg.model)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from unclip.diffusion import DiffusionConfig
from unclip.nn import UNetConfig
from unclip.settings import SamplerField
from unclip.train import TrainConfig

__all__ = ["Augmentation", "UpsamplerConfig", "UpsamplerDataConfig", "UpsamplerEvalConfig", "TrainUpsamplerConfig"]

Augmentation = Literal["blur", "bsr"]


@dataclass(frozen=True)
class UpsamplerConfig:
    """A super-resolution diffusion model: low_res_size -> image_size, conditioned on the corrupted low-res image.

    The UNet section gives the architecture only: the upsampler sets its channels (3 + 3 in: x_t and the upsampled
    low-res image; 3, or 6 with a learned variance, out) and its `cond_dim` (the embedded corruption level), so
    those keys stay unset. It has no attention (`attention_resolutions: []`), so it runs at any side divisible by
    2^(levels - 1): trained on crops, sampled at full size.
    """

    low_res_size: int = 64  # side of the conditioning image (the previous stage's output)
    image_size: int = 256  # side of the generated image; a whole multiple of low_res_size
    augmentation: Augmentation = "blur"  # corruption of the conditioning image: "blur" (first stage), "bsr" (second)
    blur_sigma: float = 0.6  # "blur": Gaussian sigma (low-res pixels) at corruption level 1; level l uses l * this
    max_aug_level: float = 1.0  # training: each row's corruption level is drawn uniformly from [0, max_aug_level]
    aug_embed_dim: int = 32  # width of the sinusoidal embedding of the level (the UNet's cond vector)
    sample_aug_level: float = 0.0  # sampling: default corruption level of the conditioning image
    sample_steps: int = 27  # sampling: default sampler steps (the paper: 27 for 64 -> 256, 15 for 256 -> 1024)
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(image_size=256, attention_resolutions=()))  # see above
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)  # objective, variance, schedule

    @property
    def scale(self) -> int:
        """The upscaling factor image_size / low_res_size."""
        return self.image_size // self.low_res_size

    @property
    def size_multiple(self) -> int:
        """Generated sides must be multiples of this (the UNet's downsampling factor)."""
        return 2 ** (self.unet.num_levels - 1)

    def __post_init__(self) -> None:
        if self.low_res_size < 1 or self.image_size <= self.low_res_size or self.image_size % self.low_res_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple > 1 of low_res_size "
                             f"({self.low_res_size})")
        if self.unet.image_size != self.image_size:
            raise ValueError(f"unet.image_size ({self.unet.image_size}) must equal image_size ({self.image_size})")
        if self.unet.attention_resolutions:
            raise ValueError("an upsampler has no attention (it must run at any size): set unet.attention_resolutions"
                             " to []")
        if self.unet.cond_dim is not None or self.unet.context_dim is not None:
            raise ValueError("leave unet.cond_dim and unet.context_dim unset: the upsampler sets them")
        if (self.unet.in_channels, self.unet.out_channels) != (3, 3):
            raise ValueError("leave unet.in_channels and unet.out_channels at 3: the upsampler sets them")
        if not 0 <= self.max_aug_level <= 1 or not 0 <= self.sample_aug_level <= 1:
            raise ValueError("max_aug_level and sample_aug_level must lie in [0, 1]")
        if self.blur_sigma < 0 or self.aug_embed_dim < 2 or self.sample_steps < 1:
            raise ValueError("blur_sigma must be >= 0, aug_embed_dim >= 2 and sample_steps >= 1")


@dataclass(frozen=True)
class UpsamplerDataConfig:
    """Training images (captions are not used): SHAPES or any image-text dataset, made square at image_size."""

    source: str = "shapes"  # "shapes" (built-in training split) or a path / hub name for load_image_text_dataset
    image_column: str = "image"  # column holding the images
    caption_column: str = "caption"  # column holding the captions (must exist; unused)
    split: str = "train"  # split to read from a hub dataset
    shapes_samples: int = 20000  # SHAPES only: number of training images generated
    shapes_seed: int = 0  # SHAPES only: generation seed
    shapes_resolution: int = 256  # SHAPES only: rendering side (resized to the model's image_size if it differs)
    crop_size: int | None = None  # training crop side in high-res pixels; None: image_size // 4 (the paper's)


@dataclass(frozen=True)
class UpsamplerEvalConfig:
    """The held-out SHAPES PSNR-vs-bicubic evaluation run after training (and by `upsamplers.evaluation`)."""

    samples: int = 200  # held-out SHAPES images upsampled (0: skip the evaluation)
    aug_levels: tuple[float, ...] = (0.0,)  # corruption levels of the conditioning image, each evaluated
    steps: int | None = None  # sampler steps; None: the model's sample_steps
    sampler: SamplerField = "ddim"  # which shared sampler (any registered name)
    seed: int = 1234  # data and sampling seed
    batch_size: int = 50  # images upsampled per batch
    sample_grid: int = 8  # images in the periodic training grids (bicubic | model | original)

    def __post_init__(self) -> None:  # checked when the config is read, not after a whole training run
        bad_steps = self.steps is not None and self.steps < 1
        if self.samples < 0 or self.batch_size < 1 or self.sample_grid < 0 or bad_steps:
            raise ValueError("eval.samples and eval.sample_grid must be >= 0, eval.steps and eval.batch_size >= 1")
        if not self.aug_levels:
            raise ValueError("eval.aug_levels needs at least one level")


@dataclass(frozen=True)
class TrainUpsamplerConfig:
    """Everything `train-decoder` reads from configs/upsamplers/*.yaml for a super-resolution stage."""

    stage: Literal["upsampler"] = "upsampler"  # which cascade stage this file trains
    model: UpsamplerConfig = field(default_factory=UpsamplerConfig)  # architecture, augmentation and diffusion
    data: UpsamplerDataConfig = field(default_factory=UpsamplerDataConfig)  # training images
    train: TrainConfig = field(default_factory=TrainConfig)  # optimisation, logging, checkpoints
    eval: UpsamplerEvalConfig = field(default_factory=UpsamplerEvalConfig)  # PSNR against bicubic on SHAPES

    def __post_init__(self) -> None:
        crop, multiple = self.crop_size, math.lcm(self.model.size_multiple, self.model.scale)
        if crop > self.model.image_size or crop % multiple:
            raise ValueError(f"data.crop_size ({crop}) must be at most image_size ({self.model.image_size}) and a "
                             f"multiple of {multiple} (of the UNet's downsampling factor and of the scale)")

    @property
    def crop_size(self) -> int:
        """The training crop side in high-res pixels (data.crop_size, or image_size // 4)."""
        return self.data.crop_size or self.model.image_size // 4
