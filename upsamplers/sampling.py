"""Sampling from an upsampler: low-resolution images in [0, 1] -> images `scale` times larger, in [0, 1].

    high = upsample(upsampler, low, generator=torch.Generator().manual_seed(0))    # (b, 3, h * s, w * s)
    high = upsample(upsampler, low, steps=50, sampler="dpmpp_2m", aug_level=0.2)

The one-call form of the upsampler's stage sampling (`Upsampler.sample`, the `unclip.stage.Stage` protocol): the
conditioning image is corrupted at `aug_level` (the config's `sample_aug_level` by default; with the BSR
augmentation its random choices come from `generator`), upsampled and held fixed while a registered sampler walks
x_T -> x0 at the full target side (the UNet is convolutional, whatever crop it was trained on). x0 is clamped to
[-1, 1] ("static"; a dynamic-threshold percentile or None may be asked for instead). No guidance: the upsamplers
are unconditional on text, as in the paper.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unclip.diffusion import Generators
from unclip.stage import CascadeState, SamplingRun

from .model import Upsampler

__all__ = ["upsample"]


@torch.no_grad()
def upsample(
    upsampler: Upsampler,
    low_res: Tensor,
    *,
    steps: int | None = None,
    sampler: str | None = None,
    aug_level: float | None = None,
    eta: float | None = None,
    threshold: str | float | None = "static",
    generator: Generators = None,
    progress: bool = False,
) -> Tensor:
    """Super-resolve low_res (b, 3, h, w) in [0, 1] to (b, 3, h * scale, w * scale) in [0, 1].

    steps, sampler, eta: None takes the upsampler's own (`Upsampler.default_sampling`: DDIM with the config's
    `sample_steps`, 27 or 15 in the paper's configs); sampler: any registered name ("ddim": eta is its noise).
    aug_level: corruption level of the conditioning in [0, 1] (None: the config's `sample_aug_level`). generator: the
    starting noise and any random corruption (same seed, same images; a list: one per image or group of rows).
    """
    spec = upsampler.default_sampling().given(sampler=sampler, steps=steps, eta=eta)
    b, _, h, w = low_res.shape
    H, W = h * upsampler.config.scale, w * upsampler.config.scale  # noqa: N806
    run = SamplingRun(generator=generator, progress=progress)
    state = upsampler.sample(CascadeState(images=low_res), spec, run, name=f"upsampler {_side(h, w)}->{_side(H, W)}",
                             aug_level=aug_level, threshold=threshold)
    return state.images


def _side(h: int, w: int) -> str:
    """An image size for the progress bar: "64" when square, "64x96" otherwise."""
    return str(h) if h == w else f"{h}x{w}"
