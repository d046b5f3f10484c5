"""Sampling from the decoder: CLIP image embeddings (and optionally captions) -> images in [0, 1].

    images = decode(decoder, clip.encode_image(pil_images), steps=50, guidance_scale=3.0,
                    generator=torch.Generator().manual_seed(0))             # (b, 3, s, s)

The one-call form of the decoder's stage sampling (`Decoder.sample`, the `unclip.stage.Stage` protocol): the
decoder's raw output is guided by `classifier_free_guidance` (the unconditional branch drops both the image
embedding and the text), turned into a `Denoised` by `make_denoiser` with dynamic thresholding of x0 (Imagen; with
data in [-1, 1] it equals static clipping for samples already inside the range), and walked by a registered
sampler. DDIM with eta > 0 adds fresh noise each step: that is where image variations get their variety.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unclip.clip import TextEncoding
from unclip.diffusion import Generators
from unclip.stage import CascadeState, SamplingRun

from .model import DEFAULT_THRESHOLD, Decoder

__all__ = ["decode"]


@torch.no_grad()
def decode(
    decoder: Decoder,
    image_embed: Tensor,
    text: TextEncoding | None = None,
    *,
    steps: int | None = None,
    sampler: str | None = None,
    eta: float | None = None,
    guidance_scale: float | None = None,
    threshold: str | float | None = DEFAULT_THRESHOLD,
    generator: Generators = None,
    x_T: Tensor | None = None,
    progress: bool = False,
) -> Tensor:
    """Generate images (b, 3, s, s) in [0, 1] from CLIP image embeddings image_embed (b, d).

    text: the captions' `TextEncoding` (b rows; only text_states and text_mask are used) or None (image-only
    conditioning). steps, sampler, eta, guidance_scale: None takes the decoder's own (`Decoder.default_sampling`:
    ancestral DDPM, which reconstructs SHAPES best, 50 steps, guidance 3); sampler: any registered name ("ddim" with
    eta: its noise, 0 deterministic). x_T: the starting noise (b, 3, s, s); drawn from `generator` when None (a list
    of generators: one per row).
    """
    spec = decoder.default_sampling().given(sampler=sampler, steps=steps, guidance=guidance_scale, eta=eta)
    state = CascadeState(text=text, image_embed=image_embed)
    run = SamplingRun(generator=generator, progress=progress)
    return decoder.sample(state, spec, run, x_T=x_T, threshold=threshold).images
