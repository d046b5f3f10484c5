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

import functools
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unclip.checkpoint import load_pretrained_dir, load_state_dict_strict, save_pretrained_dir
from unclip.config import config_to_dict, load_config
from unclip.diffusion import Denoiser, Generators, NoiseSchedule, make_denoiser, randn, schedule_for, threshold_hook
from unclip.images import to_signed_range, to_unit_range
from unclip.nn import UNet, timestep_embedding
from unclip.settings import StageSampling
from unclip.stage import CascadeState, Role, SamplingRun, run_sampler

from .config import UpsamplerConfig
from .degradations import corrupt

__all__ = ["KIND", "Upsampler", "corrupt_and_upsample", "save_state", "upsample_bicubic"]

KIND = "upsampler"


def upsample_bicubic(images: Tensor, scale: int) -> Tensor:
    """images (b, c, h, w) -> (b, c, h * scale, w * scale) by bicubic interpolation (not clamped)."""
    return F.interpolate(images, scale_factor=scale, mode="bicubic", align_corners=False)


def corrupt_and_upsample(config: UpsamplerConfig, low_res: Tensor, aug_level: float | Tensor,
                         generator: Generators = None) -> Tensor:
    """The network's image input, from the config alone: low_res (b, 3, h, w) in [0, 1], corrupted at aug_level
    (float or (b,)) and upsampled by `config.scale`: (b, 3, h * scale, w * scale) in about [-1, 1]. A list of k
    generators splits the rows into k equal groups, each corrupted with its own (as `unclip.diffusion.randn` draws),
    so that a group does not depend on the others."""
    assert low_res.ndim == 4 and low_res.shape[1] == 3, f"low_res must be (b, 3, h, w), got {tuple(low_res.shape)}"
    if isinstance(generator, Sequence):
        b, k = low_res.shape[0], len(generator)
        if not k or b % k:
            raise ValueError(f"{b} images do not split into equal groups for {k} generators")
        levels = aug_level.expand(b) if torch.is_tensor(aug_level) else None
        rows = [slice(i * (b // k), (i + 1) * (b // k)) for i in range(k)]
        return torch.cat([corrupt_and_upsample(config, low_res[r], aug_level if levels is None else levels[r], g)
                          for r, g in zip(rows, generator, strict=True)])
    corrupted = corrupt(low_res, aug_level, config.augmentation, blur_sigma=config.blur_sigma, generator=generator)
    return upsample_bicubic(to_signed_range(corrupted), config.scale)


class Upsampler(nn.Module):
    """UNet over [x_t | upsampled corrupted low-res image] + embedded corruption level. See the module doc.

    As a stage of the cascade (`unclip.stage.Stage`) it maps images to images `config.scale` times larger."""

    role: ClassVar[Role] = "upsampler"
    kind: ClassVar[str] = KIND
    clip_fingerprint: ClassVar[None] = None  # it reads no CLIP embedding

    def __init__(self, config: UpsamplerConfig) -> None:
        super().__init__()
        self.config = cfg = config
        out = 3 * cfg.diffusion.out_channels_factor
        self.unet = UNet(replace(cfg.unet, in_channels=6, out_channels=out, cond_dim=cfg.aug_embed_dim))

    @property
    def schedule(self) -> NoiseSchedule:
        """The noise schedule of `config.diffusion` (float64, CPU; shared, read-only)."""
        return schedule_for(self.config.diffusion)

    def conditioning(self, low_res: Tensor, aug_level: float | Tensor, generator: Generators = None) -> Tensor:
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

    # ----- the stage protocol (unclip.stage) ------------------------------------------------------------
    def default_sampling(self) -> StageSampling:
        """DDIM (the paper's upsampler sampler) with the config's `sample_steps` (27 and 15 in the paper)."""
        return StageSampling(sampler="ddim", steps=self.config.sample_steps)

    def check_sampling(self, spec: StageSampling) -> None:
        """It is not text-conditioned, so it takes no guidance: a `spec.guidance` other than 1 is a ValueError."""
        if spec.guidance != 1.0:
            raise ValueError(f"an upsampler is not guided (it reads no caption); its guidance must be 1, got "
                             f"{spec.guidance}")

    def sampler_options(self) -> dict[str, Any]:
        """The reverse-step variance the upsampler was trained for."""
        return {"variance": self.config.diffusion.variance}

    def denoiser(self, cond: Mapping[str, Any], spec: StageSampling, *,
                 threshold: str | float | None = "static") -> Denoiser:
        """The upsampler under cond = {"low_res_up": (b, 3, H, W), "aug_level": (b,)}, x0 clamped to [-1, 1]
        ("static"; a dynamic-threshold percentile or None may be asked for); `spec` as `check_sampling` allows."""
        diffusion = self.config.diffusion
        return make_denoiser(functools.partial(self, **cond), self.schedule, diffusion.objective,
                             variance=diffusion.variance, x0_hook=threshold_hook(threshold))

    def sample(self, state: CascadeState, spec: StageSampling, run: SamplingRun, *, name: str = "upsampler",
               x_T: Tensor | None = None, aug_level: float | None = None,
               threshold: str | float | None = "static") -> CascadeState:
        """`state.images` (b, 3, h, w) in [0, 1] super-resolved to (b, 3, h * scale, w * scale) in [0, 1].

        h and w: any sides for which h * scale and w * scale are multiples of `config.size_multiple`. aug_level:
        corruption level of the conditioning in [0, 1] (None: the config's `sample_aug_level`); its random choices
        come from `run.generator`, as does x_T (b, 3, H, W) when None."""
        config, low_res = self.config, state.images
        assert low_res.ndim == 4 and low_res.shape[1] == 3, f"images must be (b, 3, h, w), got {tuple(low_res.shape)}"
        b, _, h, w = low_res.shape
        H, W = h * config.scale, w * config.scale  # noqa: N806
        if H % config.size_multiple or W % config.size_multiple:
            raise ValueError(f"output side {H}x{W} is not a multiple of {config.size_multiple}; pad or crop the input")
        level = config.sample_aug_level if aug_level is None else float(aug_level)
        if not 0 <= level <= 1:
            raise ValueError(f"aug_level must lie in [0, 1], got {level}")
        param = next(self.parameters())
        cond = {"low_res_up": self.conditioning(low_res.to(param.device).float(), level, run.generator).to(param.dtype),
                "aug_level": torch.full((b,), level, device=param.device)}
        if x_T is None:
            x_T = randn((b, 3, H, W), generator=run.generator, device=param.device, dtype=param.dtype)
        x0 = run_sampler(self, name, spec, x_T, cond, run)
        return state.but(images=to_unit_range(x0.float()).clamp(0, 1))

    # ----- checkpoints ------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write config.json (kind "upsampler": the UpsamplerConfig) + model.safetensors, atomically; `dtype`
        casts the stored float weights."""
        state = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
                 for k, v in self.state_dict().items()}
        return save_state(path, self.config, state)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None) -> Upsampler:
        """Load a directory written by `save_pretrained` (or by `train-upsampler` as OUTPUT_DIR/model) onto
        `device` in `dtype` (default: float32), in eval mode."""
        meta, state = load_pretrained_dir(path, kind=KIND)
        upsampler = cls(load_config(UpsamplerConfig, meta["config"]["model"]))
        load_state_dict_strict(upsampler, state, source=path)
        return upsampler.to(device=device, dtype=dtype).eval()


def save_state(path: str | Path, config: UpsamplerConfig, state_dict: dict[str, Tensor]) -> Path:
    """Write an upsampler directory from a config and a state dict (the trainer's EMA weights, for instance)."""
    return save_pretrained_dir(path, kind=KIND, config={"model": config_to_dict(config)}, state_dict=state_dict)
