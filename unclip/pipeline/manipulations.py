"""Image manipulations of DALL-E 2 section 3, on the bipartite latent (z_i, x_T) of an image.

    variations = vary(pipe, image, n=4, eta=1.0)                       # section 3.1
    frames = interpolate(pipe, image_a, image_b, n=5)                  # section 3.2
    frames = text_diff(pipe, image, "a photo of a cat", "a photo of a dog", n=5)   # section 3.3

An image is encoded as z_i, its CLIP image embedding (b, d), and x_T, the decoder latent that DDIM inversion
under z_i gives (b, 3, s, s): decoding (z_i, x_T) with DDIM eta = 0 gives the image back, closely at guidance 1 (the
inversion runs unguided), approximately at the decoder's guidance (the default). Every function returns
PIL images at the pipeline's output side (the decoder's output runs through the upsamplers, with the pipeline's
sampling settings for them). The decoding is DDIM whatever the pipeline's decoder sampler; its steps and guidance
are the pipeline's unless given.

Input images (PIL images, file paths or a (b, 3, h, w) tensor in [0, 1]) are read as the data loader reads training
images (`unclip.images.to_rgb`: EXIF orientation, transparency onto white, 16-bit grey...) and cut to their centred
square, as the decoder's and CLIP's training images are (`unclip.images.as_image_batch`): a wide image loses its
sides, it is not stretched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import repeat
from PIL import Image
from torch import Tensor

from ..images import ImageLike, as_image_batch, tensor_to_pil
from ..settings import Sampling
from ..stage import CascadeState, SamplingRun
from .pipeline import UnclipPipeline, image_generators

__all__ = ["BipartiteLatent", "encode_image", "vary", "interpolate", "text_diff", "slerp"]

ImageInput = ImageLike | Sequence[ImageLike] | Tensor  # PIL images, file paths, or (b, 3, h, w) in [0, 1]


def slerp(a: Tensor, b: Tensor, t: Tensor | float) -> Tensor:
    """Spherical interpolation between a and b (..., k) at fractions t (broadcastable, 0 -> a, 1 -> b).

    Interpolates along the great circle through the two directions; the norm is interpolated linearly (so unit
    vectors stay unit and Gaussian latents keep a typical norm). Falls back to lerp for (anti)parallel inputs.
    """
    t = torch.as_tensor(t, dtype=a.dtype, device=a.device)
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua, ub = a / na, b / nb
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1, 1)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    safe = sin.abs() > 1e-6
    wa = torch.where(safe, torch.sin((1 - t) * omega) / sin.where(safe, torch.ones_like(sin)), 1 - t)
    wb = torch.where(safe, torch.sin(t * omega) / sin.where(safe, torch.ones_like(sin)), t)
    return (wa * ua + wb * ub) * ((1 - t) * na + t * nb)


class BipartiteLatent:
    """(z_i (b, d) unit-norm CLIP image embeddings, x_T (b, 3, s, s) decoder latents) of b images."""

    def __init__(self, image_embed: Tensor, x_T: Tensor) -> None:
        self.image_embed, self.x_T = image_embed, x_T


@torch.no_grad()
def encode_image(pipe: UnclipPipeline, images: ImageInput, *, steps: int | None = None,
                 progress: bool = False) -> BipartiteLatent:
    """The bipartite latent of images (PIL, file paths or a (b, 3, h, w) tensor in [0, 1], each cut to its centred
    square: see the module docstring); `steps` of DDIM inversion (default: the decoder's sampling steps)."""
    pixels = as_image_batch(images).to(pipe.device)
    image_embed = pipe.clip.encode_image(pixels).to(pipe.device, pipe.dtype)  # (b, d)
    with pipe.autocast():
        x_T = pipe.decoder.invert(pixels.to(pipe.dtype), image_embed,
                                  steps=steps or pipe.sampling.of("decoder").steps, progress=progress)
    return BipartiteLatent(image_embed, x_T)


def _settings(pipe: UnclipPipeline, steps: int | None, guidance_scale: float | None, eta: float = 0.0) -> Sampling:
    """The pipeline's sampling with the decoder on DDIM at `eta` and the given steps / guidance (checked here,
    before any work)."""
    return pipe.resolve_sampling({"decoder.sampler": "ddim", "decoder.eta": eta, "decoder.steps": steps,
                                  "decoder.guidance": guidance_scale})


def _decode(pipe: UnclipPipeline, image_embed: Tensor, x_T: Tensor, s: Sampling, *, seed: int | None,
            progress: bool) -> list[Image.Image]:
    generator = image_generators(len(image_embed), pipe.device, seed)  # one per image: n does not change image i
    run = SamplingRun(generator=generator, progress=progress)
    with pipe.autocast():
        state = CascadeState(image_embed=image_embed)
        base = pipe.decoder.sample(state, s.of("decoder"), run, name="decoder", x_T=x_T).images
    return [tensor_to_pil(im) for im in pipe.upsample(base, sampling=s, generator=generator, progress=progress)]


@torch.no_grad()
def vary(pipe: UnclipPipeline, image: ImageLike | Tensor, n: int = 4, *, eta: float = 1.0, steps: int | None = None,
         guidance_scale: float | None = None, seed: int | None = 0, progress: bool = False) -> list[Image.Image]:
    """n variations of one image: its (z_i, x_T) decoded with DDIM `eta` (0: about the image itself, closest at
    guidance_scale 1; 1 varies freely)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    s = _settings(pipe, steps, guidance_scale, eta)
    latent = encode_image(pipe, image, steps=s.of("decoder").steps, progress=progress)
    embed = repeat(latent.image_embed[:1], "1 d -> n d", n=n)
    x_T = repeat(latent.x_T[:1], "1 c h w -> n c h w", n=n)
    return _decode(pipe, embed, x_T, s, seed=seed, progress=progress)


@torch.no_grad()
def interpolate(pipe: UnclipPipeline, image_a: ImageLike | Tensor, image_b: ImageLike | Tensor, n: int = 5, *,
                steps: int | None = None, guidance_scale: float | None = None, seed: int | None = 0,
                progress: bool = False) -> list[Image.Image]:
    """n images between two (both ends included): slerp of the CLIP image embeddings and of the inverted decoder
    latents, decoded with DDIM eta = 0 (DALL-E 2 section 3.2). seed: of the upsamplers' noise (the decoding itself is
    deterministic); None: unseeded."""
    if n < 2:
        raise ValueError(f"n must be >= 2 to include both ends, got {n}")
    s = _settings(pipe, steps, guidance_scale)
    a = encode_image(pipe, image_a, steps=s.of("decoder").steps, progress=progress)
    b = encode_image(pipe, image_b, steps=s.of("decoder").steps, progress=progress)
    t = torch.linspace(0, 1, n, device=pipe.device, dtype=pipe.dtype)[:, None]  # (n, 1)
    embed = F.normalize(slerp(a.image_embed[:1], b.image_embed[:1], t), dim=-1)  # (n, d)
    x_a, x_b = a.x_T[:1].flatten(1), b.x_T[:1].flatten(1)  # (1, 3 s s)
    x_T = slerp(x_a, x_b, t).reshape(n, *a.x_T.shape[1:])
    return _decode(pipe, embed, x_T, s, seed=seed, progress=progress)


@torch.no_grad()
def text_diff(pipe: UnclipPipeline, image: ImageLike | Tensor, from_text: str, to_text: str, n: int = 5, *,
              max_angle: float = 0.5, steps: int | None = None, guidance_scale: float | None = None,
              seed: int | None = 0, progress: bool = False) -> list[Image.Image]:
    """Edit an image towards a text change (DALL-E 2 section 3.3): z_d = normalize(z_t(to) - z_t(from)),
    z_theta = slerp(z_i, z_d, theta) for theta from 0 to `max_angle` (the paper: 0.25 to 0.5), decoded from
    the image's inverted latent x_T with DDIM eta = 0. n images, the first the (approximate) reconstruction.
    seed: of the upsamplers' noise (the decoding itself is deterministic); None: unseeded."""
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    if not 0 < max_angle <= 1:
        raise ValueError(f"max_angle is a slerp fraction in (0, 1] (the paper: 0.25 to 0.5), got {max_angle}")
    s = _settings(pipe, steps, guidance_scale)
    text = pipe.clip.encode_text([from_text, to_text]).text_embed.to(pipe.device, pipe.dtype)  # (2, d)
    if (text[1] - text[0]).float().norm() < 1e-6:
        raise ValueError(f"{from_text!r} and {to_text!r} have the same CLIP text embedding: no direction to edit in")
    latent = encode_image(pipe, image, steps=s.of("decoder").steps, progress=progress)
    z_d = F.normalize(text[1] - text[0], dim=-1)[None]  # (1, d)
    theta = torch.linspace(0, max_angle, n, device=pipe.device, dtype=pipe.dtype)[:, None]  # (n, 1)
    embed = F.normalize(slerp(latent.image_embed[:1], z_d, theta), dim=-1)  # (n, d)
    x_T = repeat(latent.x_T[:1], "1 c h w -> n c h w", n=n)
    return _decode(pipe, embed, x_T, s, seed=seed, progress=progress)
