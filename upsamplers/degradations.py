"""Noise-conditioning augmentation: seeded, deterministic corruptions of the low-resolution conditioning image.

    blurred = gaussian_blur(low_res, sigma=0.6)                                        # (b, 3, h, w)
    degraded = bsr_degrade(low_res, level=0.5, generator=torch.Generator().manual_seed(0))
    corrupted = corrupt(low_res, levels, "blur", blur_sigma=0.6, generator=g)        # what the upsampler sees

DALL-E 2 (appendix C) corrupts the conditioning image while training the upsamplers, Gaussian blur for the first
and a BSR degradation (Zhang et al. 2021, "Designing a practical degradation model") for the second, so that they
tolerate the previous stage's imperfect outputs. A corruption level l in [0, 1] sets the strength and is given to
the model, so sampling can pick one (Imagen's noise conditioning augmentation). Level 0 is the identity for both.
All images are (b, 3, h, w) in [0, 1]; every random choice comes from the `generator` argument (same seed, same
output), drawn on the generator's device; a level is a float or a (b,) tensor (one per row).
"""

from __future__ import annotations

import io
import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from PIL import Image
from torch import Tensor

from unclip.images import pil_to_tensor, tensor_to_pil

from .config import Augmentation

__all__ = ["gaussian_blur", "anisotropic_blur", "bsr_degrade", "corrupt", "BSR_MAX"]

# The strength of each BSR step at level 1 (each row draws its own fraction of it, uniformly):
BSR_MAX = {
    "blur_sigma": 1.5,  # Gaussian blur sigma along each of the kernel's axes, pixels
    "down_factor": 2.0,  # the image is resized down by up to this factor and back (area, bilinear or bicubic)
    "noise_std": 0.08,  # additive Gaussian noise std in [0, 1] units
    "jpeg_quality": 30,  # lowest JPEG quality (level 0: no JPEG; level l: quality between 95 and 95 - l * 65)
}
_DOWN_MODES = ("area", "bilinear", "bicubic")


def _per_row(value: float | Tensor, b: int) -> Tensor:
    """A float or (b,) tensor as a (b,) float32 CPU tensor."""
    out = torch.as_tensor(value, dtype=torch.float32).detach().cpu()
    out = out.expand(b) if out.ndim == 0 else out
    assert out.shape == (b,), f"expected a float or a (b,) = ({b},) tensor, got {tuple(out.shape)}"
    return out


def gaussian_blur(images: Tensor, sigma: float | Tensor) -> Tensor:
    """Separable Gaussian blur of images (b, c, h, w) with per-row sigma (float or (b,), pixels), reflect padding.

    sigma 0 leaves a row exactly unchanged. Each row's kernel spans ceil(3 sigma) pixels each side (at most the image
    side - 1), so a row's result does not depend on the other rows.
    """
    b, c, h, w = images.shape
    sigma = _per_row(sigma, b)
    assert (sigma >= 0).all(), "sigma must be >= 0"
    radius = min(max(1, math.ceil(3 * float(sigma.max()))), h - 1, w - 1)
    if radius < 1 or float(sigma.max()) == 0:
        return images
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x[None] ** 2) / (2 * sigma.clamp(min=1e-6)[:, None] ** 2))  # (b, k); sigma 0: a delta
    kernel = kernel * (x[None].abs() <= torch.ceil(3 * sigma)[:, None].clamp(min=1))  # each row's own 3-sigma span
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).to(images.device, images.dtype)
    kernel = repeat(kernel, "b k -> (b c) k", c=c)
    flat = rearrange(images, "b c h w -> 1 (b c) h w")
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, rearrange(kernel, "n k -> n 1 k 1"), groups=b * c)  # vertical
    flat = F.conv2d(flat, rearrange(kernel, "n k -> n 1 1 k"), groups=b * c)  # horizontal
    return rearrange(flat, "1 (b c) h w -> b c h w", b=b)


def _jpeg(image: Tensor, quality: int) -> Tensor:
    """One image (3, h, w) in [0, 1] through a JPEG encode/decode at `quality` (PIL, 4:2:0 chroma)."""
    buffer = io.BytesIO()
    tensor_to_pil(image).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return pil_to_tensor(Image.open(buffer)).to(image.device, image.dtype)


def _resize_down_up(image: Tensor, factor: float, mode: str) -> Tensor:
    """One image (3, h, w): resized down by `factor` with `mode`, then back to (h, w) with bicubic."""
    h, w = image.shape[-2:]
    small = (max(1, round(h / factor)), max(1, round(w / factor)))
    if small == (h, w):
        return image
    kwargs = {} if mode == "area" else {"align_corners": False, "antialias": True}
    down = F.interpolate(image[None], size=small, mode=mode, **kwargs)
    return F.interpolate(down, size=(h, w), mode="bicubic", align_corners=False)[0]


def anisotropic_blur(image: Tensor, sigma_x: float, sigma_y: float, angle: float) -> Tensor:
    """One image (c, h, w) blurred by a Gaussian with std `sigma_x` along the direction `angle` (radians) and
    `sigma_y` across it (pixels), reflect padding; both sigmas 0 return it unchanged. BSR's blur kernel."""
    c, h, w = image.shape
    if max(sigma_x, sigma_y) == 0:
        return image
    radius = min(max(1, math.ceil(3 * max(sigma_x, sigma_y))), h - 1, w - 1)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(x, x, indexing="ij")
    u, v = xx * math.cos(angle) + yy * math.sin(angle), -xx * math.sin(angle) + yy * math.cos(angle)
    kernel = torch.exp(-0.5 * ((u / max(sigma_x, 1e-3)) ** 2 + (v / max(sigma_y, 1e-3)) ** 2))  # (k, k)
    kernel = repeat(kernel / kernel.sum(), "kh kw -> c 1 kh kw", c=c).to(image.device, image.dtype)
    padded = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")
    return F.conv2d(padded, kernel, groups=c)[0]


def bsr_degrade(images: Tensor, level: float | Tensor, generator: torch.Generator | None = None) -> Tensor:
    """BSR degradation (Zhang et al. 2021) of images (b, 3, h, w) in [0, 1] -> (b, 3, h, w) in [0, 1], at
    level(s) in [0, 1].

    Each row gets three steps in its own random order: an anisotropic Gaussian blur (random sigmas and angle), a
    down-and-up resize (area, bilinear or bicubic), additive Gaussian noise (the same on every channel for 40% of
    rows, as grey sensor noise, else per channel); then JPEG compression, as images are compressed last. Each
    strength is a uniform fraction of `BSR_MAX` scaled by the row's level. Every random choice comes from
    `generator`, consumed the same way whatever the level; level 0 returns the row unchanged.
    """
    b = images.shape[0]
    level = _per_row(level, b)
    assert ((level >= 0) & (level <= 1)).all(), "levels must lie in [0, 1]"
    device = generator.device if generator is not None else images.device
    draws = torch.rand(b, 8, generator=generator, device=device).cpu()  # per row: see _bsr_row
    order = torch.rand(b, 3, generator=generator, device=device).argsort(dim=1).cpu()  # (b, 3) per-row step order
    noise = torch.randn(images.shape, generator=generator, device=device).to(images.device, images.dtype)
    rows = [_bsr_row(images[i], float(level[i]), draws[i].tolist(), order[i].tolist(), noise[i]) if level[i] > 0
            else images[i] for i in range(b)]
    return torch.stack(rows)


def _bsr_row(x: Tensor, level: float, draws: list[float], order: list[int], noise: Tensor) -> Tensor:
    """One image (3, h, w) through BSR at `level` > 0; draws: 8 uniforms (blur sigma x, sigma y, angle, resize
    factor, resize mode, noise std, grey noise, JPEG quality); order: the permutation of (blur, resize, noise)."""
    sigma_x, sigma_y = (level * (0.1 + 0.9 * d) * BSR_MAX["blur_sigma"] for d in draws[:2])
    factor = 1 + level * draws[3] * (BSR_MAX["down_factor"] - 1)
    mode = _DOWN_MODES[int(draws[4] * len(_DOWN_MODES)) % len(_DOWN_MODES)]
    noise = noise[:1].expand_as(x) if draws[6] < 0.4 else noise  # grey (40% of rows) or colour noise
    for step in order:
        if step == 0:
            x = anisotropic_blur(x, sigma_x, sigma_y, math.pi * draws[2])
        elif step == 1:
            x = _resize_down_up(x, factor, mode)
        else:
            x = (x + noise * level * draws[5] * BSR_MAX["noise_std"]).clamp(0, 1)
    return _jpeg(x.clamp(0, 1), round(95 - level * draws[7] * (95 - BSR_MAX["jpeg_quality"])))


def corrupt(images: Tensor, level: float | Tensor, kind: Augmentation, *, blur_sigma: float = 0.6,
            generator: torch.Generator | None = None) -> Tensor:
    """The upsampler's corruption of its conditioning images (b, 3, h, w) in [0, 1] at level(s) in [0, 1].

    "blur": Gaussian blur with sigma = level * blur_sigma (deterministic); "bsr": `bsr_degrade`.
    """
    if kind == "blur":
        return gaussian_blur(images, _per_row(level, images.shape[0]) * blur_sigma)
    if kind == "bsr":
        return bsr_degrade(images, level, generator)
    raise ValueError(f"unknown augmentation {kind!r}; expected 'blur' or 'bsr'")
