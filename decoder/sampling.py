"""Sampling from the decoder: CLIP image embeddings (and optionally captions) -> images in [0, 1].

    images = decode(decoder, clip.encode_image(pil_images), steps=50, guidance_scale=3.0,
                    generator=torch.Generator().manual_seed(0))             # (b, 3, s, s)

Built from the shared pieces: the decoder's raw output is guided by `cfg` (the unconditional branch drops both
the image embedding and the text), turned into a `Denoised` by `make_denoiser` with dynamic thresholding of x0
(Imagen; with data in [-1, 1] it equals static clipping for samples already inside the range), and walked by a
shared sampler. DDIM with eta > 0 adds fresh noise each step: that is where image variations get their variety.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from unclip.clip import TextEncoding
from unclip.diffusion import (
    cfg,
    dynamic_threshold,
    make_denoiser,
    randn,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    static_clip,
    timestep_subset,
)
from unclip.images import to_unit_range

from .model import Decoder

__all__ = ["Sampler", "decode", "decoder_denoiser", "resize_images"]

Sampler = Literal["ddim", "ddpm", "dpmpp_2m"]


def decoder_denoiser(decoder: Decoder, guidance_scale: float = 1.0, *, threshold: str | float | None = 0.995):
    """The decoder as a guided `Denoiser` (x_t, t, **cond) -> Denoised, with x0 thresholding.

    threshold: a percentile in (0, 1] for dynamic thresholding, "static" for clamping to [-1, 1], None for none.
    """
    hook: Callable[[Tensor], Tensor] | None
    if threshold is None:
        hook = None
    elif threshold == "static":
        hook = static_clip
    else:
        hook = functools.partial(dynamic_threshold, percentile=float(threshold))
    diffusion = decoder.config.diffusion
    guided = cfg(decoder, guidance_scale, learned_variance=decoder.learned_variance)
    return make_denoiser(guided, decoder.schedule, diffusion.objective, variance=diffusion.variance, x0_hook=hook)


@torch.no_grad()
def decode(
    decoder: Decoder,
    image_embed: Tensor,
    text: TextEncoding | None = None,
    *,
    steps: int = 50,
    sampler: Sampler = "ddim",
    eta: float = 0.0,
    guidance_scale: float = 3.0,
    threshold: str | float | None = 0.995,
    generator: torch.Generator | None = None,
    x_T: Tensor | None = None,
    progress: bool = False,
) -> Tensor:
    """Generate images (b, 3, s, s) in [0, 1] from CLIP image embeddings image_embed (b, d).

    text: the captions' `TextEncoding` (b rows; only text_tokens and text_mask are used) or None (image-only
    conditioning). sampler: "ddim" (eta: its noise, 0 deterministic), "ddpm" (ancestral, on `steps` respaced
    timesteps) or "dpmpp_2m". x_T: the starting noise (b, 3, s, s); drawn from `generator` when None.
    """
    was_training = decoder.training
    decoder.eval()
    try:
        param = next(decoder.parameters())
        device, dtype = param.device, param.dtype
        b, s = image_embed.shape[0], decoder.config.image_size
        assert image_embed.shape == (b, decoder.config.embed_dim), (
            f"image_embed must be (b, {decoder.config.embed_dim}), got {tuple(image_embed.shape)}")
        cond: dict[str, Tensor] = {"image_embed": image_embed.to(device, dtype)}
        if text is not None:
            assert text.text_tokens.shape[0] == b, f"text has {text.text_tokens.shape[0]} rows, expected {b}"
            cond["text_tokens"] = text.text_tokens.to(device, dtype)
            cond["text_mask"] = text.text_mask.to(device)
        if x_T is None:
            x_T = randn((b, 3, s, s), generator=generator, device=device, dtype=dtype)
        assert x_T.shape == (b, 3, s, s), f"x_T must be (b, 3, {s}, {s}), got {tuple(x_T.shape)}"
        denoiser = decoder_denoiser(decoder, guidance_scale, threshold=threshold)
        schedule, variance = decoder.schedule, decoder.config.diffusion.variance
        if sampler == "ddim":
            x0 = sample_ddim(denoiser, x_T, schedule, steps, eta=eta, generator=generator, cond=cond,
                             progress=progress)
        elif sampler == "ddpm":
            timesteps = timestep_subset(schedule.num_timesteps, steps)
            x0 = sample_ddpm(denoiser, x_T, schedule, timesteps=timesteps, variance=variance, generator=generator,
                             cond=cond, progress=progress)
        elif sampler == "dpmpp_2m":
            x0 = sample_dpmpp_2m(denoiser, x_T, schedule, steps, cond=cond, progress=progress)
        else:
            raise ValueError(f"unknown sampler {sampler!r}; expected 'ddim', 'ddpm' or 'dpmpp_2m'")
        return to_unit_range(x0.float()).clamp(0, 1)
    finally:
        decoder.train(was_training)


def resize_images(images: Tensor, size: int) -> Tensor:
    """(b, 3, h, w) -> (b, 3, size, size): area averaging for integer downscales, antialiased bicubic otherwise."""
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    if h % size == 0 and w % size == 0:
        return F.interpolate(images, size=(size, size), mode="area")
    return F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
