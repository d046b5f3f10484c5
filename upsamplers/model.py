"""The upsampler (DALL-E 2, section 2.1 and appendix C): a convolutional diffusion UNet for super-resolution.

    upsampler = Upsampler(UpsamplerConfig(low_res_size=16, image_size=32, unet=UNetConfig(...)))
    cond = upsampler.conditioning(low_res, aug_level)                 # (b, 3, 32, 32) in [-1, 1]
    eps = upsampler(x_t, t, low_res_up=cond, aug_level=aug_level)     # (b, 3, 32, 32)
    upsampler.save_pretrained("runs/up/model"); Upsampler.from_pretrained("runs/up/model")

The low-resolution image, corrupted at a level l in [0, 1] (`degradations.corrupt`), is upsampled to the target
side (bicubic) and concatenated with x_t as three extra input channels (guided-diffusion's SuperResModel). The
level is embedded sinusoidally (as a timestep l * 1000) and added to the timestep embedding through the UNet's
`cond`. There is no text and no attention: the network is fully convolutional, so it trains on crops of
`low_res_up` and x_t and samples whole images of any side divisible by `config.size_multiple`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unclip.checkpoint import load_pretrained_dir, load_state_dict_strict, save_pretrained_dir
from unclip.config import config_to_dict, load_config
from unclip.diffusion import NoiseSchedule, schedule_for
from unclip.images import to_signed_range
from unclip.nn import UNet, timestep_embedding

from .config import UpsamplerConfig
from .degradations import corrupt

__all__ = ["KIND", "Upsampler", "corrupt_and_upsample", "save_state", "upsample_bicubic"]

KIND = "upsampler"


def upsample_bicubic(images: Tensor, scale: int) -> Tensor:
    """images (b, c, h, w) -> (b, c, h * scale, w * scale) by bicubic interpolation (not clamped)."""
    return F.interpolate(images, scale_factor=scale, mode="bicubic", align_corners=False)


def corrupt_and_upsample(config: UpsamplerConfig, low_res: Tensor, aug_level: float | Tensor,
                         generator: torch.Generator | None = None) -> Tensor:
    """The network's image input, from the config alone: low_res (b, 3, h, w) in [0, 1], corrupted at aug_level
    (float or (b,)) and upsampled by `config.scale`: (b, 3, h * scale, w * scale) in about [-1, 1]."""
    assert low_res.ndim == 4 and low_res.shape[1] == 3, f"low_res must be (b, 3, h, w), got {tuple(low_res.shape)}"
    corrupted = corrupt(low_res, aug_level, config.augmentation, blur_sigma=config.blur_sigma, generator=generator)
    return upsample_bicubic(to_signed_range(corrupted), config.scale)


class Upsampler(nn.Module):
    """UNet over [x_t | upsampled corrupted low-res image] + embedded corruption level. See the module doc."""

    def __init__(self, config: UpsamplerConfig) -> None:
        super().__init__()
        self.config = cfg = config
        out = 3 * cfg.diffusion.out_channels_factor
        self.unet = UNet(replace(cfg.unet, in_channels=6, out_channels=out, cond_dim=cfg.aug_embed_dim))

    @property
    def schedule(self) -> NoiseSchedule:
        """The noise schedule of `config.diffusion` (float64, CPU; shared, read-only)."""
        return schedule_for(self.config.diffusion)

    def conditioning(self, low_res: Tensor, aug_level: float | Tensor,
                     generator: torch.Generator | None = None) -> Tensor:
        """`corrupt_and_upsample` with this upsampler's config (no weights are involved)."""
        return corrupt_and_upsample(self.config, low_res, aug_level, generator)

    def forward(self, x_t: Tensor, t: Tensor, *, low_res_up: Tensor, aug_level: Tensor) -> Tensor:
        """The raw UNet output (b, 3 or 6, H, W) for x_t (b, 3, H, W) at timesteps t (b,).

        low_res_up: (b, 3, H, W) the upsampled corrupted conditioning (`conditioning`, or a crop of it).
        aug_level: (b,) the corruption level of each row, in [0, 1].
        """
        b = x_t.shape[0]
        assert low_res_up.shape == x_t.shape, (
            f"low_res_up must match x_t {tuple(x_t.shape)}, got {tuple(low_res_up.shape)}")
        assert aug_level.shape == (b,), f"aug_level must be (b,) = ({b},), got {tuple(aug_level.shape)}"
        level = timestep_embedding(aug_level.to(x_t.device) * 1000, self.config.aug_embed_dim)  # (b, e)
        return self.unet(torch.cat([x_t, low_res_up.to(x_t.dtype)], dim=1), t, cond=level.to(x_t.dtype))

    # ----- checkpoints ------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> Path:
        """Write config.json (kind "upsampler": the UpsamplerConfig) + model.safetensors, atomically."""
        return save_state(path, self.config, self.state_dict())

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> Upsampler:
        """Load a directory written by `save_pretrained` (or by `train-decoder` as OUTPUT_DIR/model)."""
        meta, state = load_pretrained_dir(path, kind=KIND)
        upsampler = cls(load_config(UpsamplerConfig, meta["config"]["model"]))
        load_state_dict_strict(upsampler, state, source=path)
        return upsampler.to(map_location).eval()


def save_state(path: str | Path, config: UpsamplerConfig, state_dict: dict[str, Tensor]) -> Path:
    """Write an upsampler directory from a config and a state dict (the trainer's EMA weights, for instance)."""
    return save_pretrained_dir(path, kind=KIND, config={"model": config_to_dict(config)}, state_dict=state_dict)
