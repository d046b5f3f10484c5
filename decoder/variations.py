"""Image variations (DALL-E 2, section 3.1): image -> CLIP image embedding -> decoder, n times.

    grid = image_variations(decoder, clip, pil_images, n=4, eta=1.0, seed=0)   # (b, 4, 3, s, s) in [0, 1]

The embedding keeps what CLIP saw (shape, colours, ...); DDIM with eta > 0 re-randomises the rest. With
`invert=True` the start noise x_T is not drawn but obtained by DDIM-inverting the source image (its centred
square, resized to the decoder's side) under its own embedding: the paper's bipartite latent (z_i, x_T). Then eta = 0
gives about the source back (closely at guidance_scale 1, as the inversion runs unguided; approximately at the
default 3) and larger eta strays further from it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange, repeat
from PIL import Image
from torch import Tensor

from unclip.clip import Clip
from unclip.diffusion import randn, seeded_generators
from unclip.images import as_image_batch

from .model import Decoder
from .sampling import decode

__all__ = ["image_variations"]


@torch.no_grad()
def image_variations(
    decoder: Decoder,
    clip: Clip,
    images: Sequence[Image.Image] | Tensor,
    n: int = 4,
    *,
    eta: float = 1.0,
    steps: int = 50,
    guidance_scale: float = 3.0,
    invert: bool = False,
    seed: int | None = 0,
    progress: bool = False,
) -> Tensor:
    """n variations of each image: (b, n, 3, s, s) in [0, 1], with s the decoder's side.

    images: PIL images or a (b, 3, h, w) tensor in [0, 1], each cut to its centred square as training images are
    (`unclip.images.as_image_batch`). eta: DDIM noise (> 0 for variety). invert: start
    from the DDIM inversion of each image instead of fresh noise. seed: all randomness (None: nondeterministic).
    """
    device = next(decoder.parameters()).device
    pixels = as_image_batch(images).to(device)  # (b, 3, h, w) in [0, 1]
    b, s = pixels.shape[0], decoder.config.image_size
    image_embed = clip.encode_image(pixels).to(device)  # (b, d)
    generator = seeded_generators(b * n, seed, device) if seed is not None else None  # one per output image
    embed = repeat(image_embed, "b d -> (b n) d", n=n)
    if invert:
        x_T = repeat(decoder.invert(pixels, image_embed, steps=steps, progress=progress),
                     "b c h w -> (b n) c h w", n=n)
    else:
        x_T = randn((b * n, 3, s, s), generator=generator, device=device)
    out = decode(decoder, embed, None, steps=steps, sampler="ddim", eta=eta, guidance_scale=guidance_scale,
                 generator=generator, x_T=x_T, progress=progress)
    return rearrange(out, "(b n) c h w -> b n c h w", n=n)
