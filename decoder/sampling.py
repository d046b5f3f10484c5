"""Sampling from the decoder: CLIP image embeddings (and optionally captions) -> images in [0, 1].

    images = decode(decoder, clip.encode_image(pil_images), steps=50, guidance_scale=3.0,
                    generator=torch.Generator().manual_seed(0))             # (b, 3, s, s)

Built from the shared pieces: the decoder's raw output is guided by `cfg` (the unconditional branch drops both
the image embedding and the text), turned into a `Denoised` by `make_denoiser` with dynamic thresholding of x0
(Imagen; with data in [-1, 1] it equals static clipping for samples already inside the range), and walked by a
shared sampler. DDIM with eta > 0 adds fresh noise each step: that is where image variations get their variety.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unclip.clip import TextEncoding
from unclip.diffusion import SamplerName, cfg, config_denoiser, randn, sample
from unclip.images import resize_images, to_unit_range

from .model import Decoder

__all__ = ["Sampler", "decode", "decoder_denoiser", "guided_decoder", "resize_images"]

Sampler = SamplerName  # "ddim", "ddpm" or "dpmpp_2m"


def guided_decoder(decoder: Decoder, guidance_scale: float):
    """The decoder's raw output under classifier-free guidance: (x_t, t, **cond) -> (b, 3 or 6, s, s).

    The conditional and unconditional rows run as one batch of 2b on an accelerator and as two batches of b on
    the CPU, where one UNet forward of 2b measured up to 30% slower than two of b (BENCHMARKS.md, "Decoder UNet")
    and never more than 3% faster.
    """
    on_cpu = next(decoder.parameters()).device.type == "cpu"
    return cfg(decoder, guidance_scale, learned_variance=decoder.learned_variance, split=on_cpu)


def decoder_denoiser(decoder: Decoder, guidance_scale: float = 1.0, *, threshold: str | float | None = 0.995):
    """The decoder as a guided `Denoiser` (x_t, t, **cond) -> Denoised, with x0 thresholding.

    threshold: a percentile in (0, 1] for dynamic thresholding, "static" for clamping to [-1, 1], None for none.
    """
    guided = guided_decoder(decoder, guidance_scale)
    return config_denoiser(guided, decoder.schedule, decoder.config.diffusion, threshold=threshold)


@torch.no_grad()
def decode(
    decoder: Decoder,
    image_embed: Tensor,
    text: TextEncoding | None = None,
    *,
    steps: int = 50,
    sampler: Sampler = "ddpm",
    eta: float = 0.0,
    guidance_scale: float = 3.0,
    threshold: str | float | None = 0.995,
    generator: torch.Generator | None = None,
    x_T: Tensor | None = None,
    progress: bool = False,
) -> Tensor:
    """Generate images (b, 3, s, s) in [0, 1] from CLIP image embeddings image_embed (b, d).

    text: the captions' `TextEncoding` (b rows; only text_tokens and text_mask are used) or None (image-only
    conditioning). sampler: "ddpm" (ancestral, on `steps` respaced timesteps; the default, it reconstructs SHAPES
    best), "ddim" (eta: its noise, 0 deterministic), "dpmpp_2m" or "dpmpp_2m_sde". x_T: the starting noise
    (b, 3, s, s); drawn from `generator` when None.
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
        x0 = sample(sampler, denoiser, x_T, decoder.schedule, steps, eta=eta,
                    variance=decoder.config.diffusion.variance, generator=generator, cond=cond, progress=progress,
                    label="decoder")
        return to_unit_range(x0.float()).clamp(0, 1)
    finally:
        decoder.train(was_training)

