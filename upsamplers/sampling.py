"""Sampling from an upsampler: low-resolution images in [0, 1] -> images `scale` times larger, in [0, 1].

    high = upsample(upsampler, low, generator=torch.Generator().manual_seed(0))    # (b, 3, h * s, w * s)
    high = upsample(upsampler, low, steps=50, sampler="dpmpp_2m", aug_level=0.2)

The conditioning image is corrupted at `aug_level` (the config's `sample_aug_level` by default; with the BSR
augmentation its random choices come from `generator`), upsampled and held fixed while a shared sampler walks
x_T -> x0 at the full target side (the UNet is convolutional, whatever crop it was trained on). The network's
output goes through `make_denoiser` with x0 clamped to [-1, 1] ("static"; a dynamic-threshold percentile or None
may be asked for instead). No guidance: the upsamplers are unconditional on text, as in the paper.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unclip.diffusion import SamplerName, config_denoiser, randn, sample
from unclip.images import to_unit_range

from .model import Upsampler

__all__ = ["upsample", "upsampler_denoiser"]


def upsampler_denoiser(upsampler: Upsampler, *, threshold: str | float | None = "static"):
    """The upsampler as a `Denoiser` (x_t, t, low_res_up=..., aug_level=...) -> Denoised, with an x0 hook.

    threshold: "static" (clamp x0 to [-1, 1]), a percentile in (0, 1] for dynamic thresholding, or None.
    """
    return config_denoiser(upsampler, upsampler.schedule, upsampler.config.diffusion, threshold=threshold)


@torch.no_grad()
def upsample(
    upsampler: Upsampler,
    low_res: Tensor,
    *,
    steps: int | None = None,
    sampler: SamplerName = "ddim",
    aug_level: float | None = None,
    eta: float = 0.0,
    threshold: str | float | None = "static",
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Super-resolve low_res (b, 3, h, w) in [0, 1] to (b, 3, h * scale, w * scale) in [0, 1].

    h and w: any sides for which h * scale and w * scale are multiples of `config.size_multiple`. steps: sampler
    steps (None: the config's `sample_steps`, 27 or 15 in the paper's configs). sampler: "ddim" (eta: its noise),
    "ddpm" or "dpmpp_2m". aug_level: corruption level of the conditioning in [0, 1] (None: the config's
    `sample_aug_level`). generator: the starting noise and any random corruption (same seed, same images).
    """
    cfg = upsampler.config
    assert low_res.ndim == 4 and low_res.shape[1] == 3, f"low_res must be (b, 3, h, w), got {tuple(low_res.shape)}"
    b, _, h, w = low_res.shape
    H, W = h * cfg.scale, w * cfg.scale  # noqa: N806
    if H % cfg.size_multiple or W % cfg.size_multiple:
        raise ValueError(f"output side {H}x{W} is not a multiple of {cfg.size_multiple}; pad or crop the input")
    level = cfg.sample_aug_level if aug_level is None else float(aug_level)
    if not 0 <= level <= 1:
        raise ValueError(f"aug_level must lie in [0, 1], got {level}")
    was_training = upsampler.training
    upsampler.eval()
    try:
        param = next(upsampler.parameters())
        device, dtype = param.device, param.dtype
        cond = {
            "low_res_up": upsampler.conditioning(low_res.to(device).float(), level, generator).to(dtype),
            "aug_level": torch.full((b,), level, device=device),
        }
        x_T = randn((b, 3, H, W), generator=generator, device=device, dtype=dtype)
        x0 = sample(sampler, upsampler_denoiser(upsampler, threshold=threshold), x_T, upsampler.schedule,
                    steps or cfg.sample_steps, eta=eta, variance=cfg.diffusion.variance, generator=generator,
                    cond=cond, progress=progress, label=f"upsampler {_side(h, w)}->{_side(H, W)}")
        return to_unit_range(x0.float()).clamp(0, 1)
    finally:
        upsampler.train(was_training)


def _side(h: int, w: int) -> str:
    """An image size for the progress bar: "64" when square, "64x96" otherwise."""
    return str(h) if h == w else f"{h}x{w}"
