"""Does the upsampler beat bicubic? PSNR against the original on held-out SHAPES images.

    report = psnr_vs_bicubic(upsampler, samples=200, seed=1234, aug_levels=(0.0, 0.2))
    report["bicubic"], report["model"]["0.0"]      # mean PSNR in dB over the images

Held-out SHAPES images (triples never seen in training) are rendered at the upsampler's image_size,
area-downsampled to its low_res_size, and brought back up twice: by bicubic interpolation and by the upsampler
(conditioned at each of `aug_levels`). Each result is compared with the original render: the PSNR of every image
(peak 1, pixel values in [0, 1]) is averaged over the images; "wins" is the fraction of images on which the
model's PSNR is higher than bicubic's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from einops import reduce
from torch import Tensor

from unclip.data import make_shapes
from unclip.images import pil_to_tensor, resize_images

from .model import Upsampler, upsample_bicubic
from .sampling import upsample

__all__ = ["psnr", "psnr_vs_bicubic"]


def psnr(images: Tensor, reference: Tensor) -> Tensor:
    """Per-image PSNR in dB (peak 1) of images (b, c, h, w) in [0, 1] against reference (b, c, h, w): (b,)."""
    assert images.shape == reference.shape, f"shapes differ: {tuple(images.shape)} vs {tuple(reference.shape)}"
    mse = reduce((images.float() - reference.float()) ** 2, "b c h w -> b", "mean")
    return -10 * torch.log10(mse.clamp(min=1e-10))


@torch.no_grad()
def psnr_vs_bicubic(
    upsampler: Upsampler,
    *,
    samples: int = 200,
    seed: int = 1234,
    aug_levels: Sequence[float] = (0.0,),
    steps: int | None = None,
    sampler: str = "ddim",
    batch_size: int = 50,
    split: str = "heldout",
    progress: bool = False,
) -> dict[str, Any]:
    """PSNR of the upsampler and of bicubic upsampling against the original SHAPES images; see the module doc.

    Returns {"samples", "low_res_size", "image_size", "steps", "bicubic": dB, "model": {str(level): dB},
    "wins": {str(level): fraction of images where the model's PSNR beats bicubic's}}.
    """
    cfg = upsampler.config
    data = make_shapes(samples, split=split, seed=seed, resolution=cfg.image_size)
    originals = torch.stack([pil_to_tensor(im) for im in data["image"]])  # (n, 3, S, S) in [0, 1]
    low_res = resize_images(originals, cfg.low_res_size)  # (n, 3, s, s), area average
    bicubic = psnr(upsample_bicubic(low_res, cfg.scale).clamp(0, 1), originals)  # (n,)
    device = next(upsampler.parameters()).device
    result: dict[str, Any] = {"samples": samples, "low_res_size": cfg.low_res_size, "image_size": cfg.image_size,
                              "steps": steps or cfg.sample_steps, "sampler": sampler,
                              "bicubic": float(bicubic.mean()), "model": {}, "wins": {}}
    for level in aug_levels:
        generator = torch.Generator(device).manual_seed(seed)
        out = torch.cat([
            upsample(upsampler, low_res[i:i + batch_size].to(device), steps=steps, sampler=sampler,
                     aug_level=level, generator=generator, progress=progress).cpu()
            for i in range(0, samples, batch_size)
        ])
        model = psnr(out, originals)
        result["model"][str(float(level))] = float(model.mean())
        result["wins"][str(float(level))] = float((model > bicubic).float().mean())
    return result
