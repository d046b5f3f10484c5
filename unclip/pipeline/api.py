"""The public one-call API: `unclip.generate`, `unclip.vary`, `unclip.interpolate`, `unclip.text_diff`.

    import unclip
    images = unclip.generate("a red circle on a blue background", num_images=4, seed=0)   # list of PIL images
    variations = unclip.vary(images[0], n=4)

Each takes `pipeline=` (a pipeline directory or an `UnclipPipeline`; default: the shipped SHAPES model) and
`device=` (default: CUDA when available).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..images import ImageLike
from . import manipulations
from .default import load_pipeline
from .pipeline import UnclipPipeline

__all__ = ["generate", "vary", "interpolate", "text_diff"]

PipelineSpec = str | Path | UnclipPipeline | None


def generate(text: str | Sequence[str], num_images: int = 1, *, pipeline: PipelineSpec = None,
             device: str | torch.device | None = None, seed: int | None = None, **settings: Any) -> list[Image.Image]:
    """Text -> images: num_images PIL images per caption (caption-major). `settings`: the sampling settings as
    keywords (`decoder_guidance=4`, `prior_sampler="ddim"`, `upsampler_steps=[3, 2]`, `best_of=4`, ...), or
    `sampling={"decoder.guidance": 4}`, and generator, callback, progress (see `UnclipPipeline.generate`)."""
    return load_pipeline(pipeline, device=device).generate(text, num_images, seed=seed, **settings)


def vary(image: ImageLike, n: int = 4, *, pipeline: PipelineSpec = None, device: str | torch.device | None = None,
         **kwargs: Any) -> list[Image.Image]:
    """n variations of an image (a PIL image or a file path, read as training images are and cut to its centred
    square; eta=1.0 by default, eta=0 gives about the image itself). See `manipulations.vary`."""
    return manipulations.vary(load_pipeline(pipeline, device=device), image, n, **kwargs)


def interpolate(image_a: ImageLike, image_b: ImageLike, n: int = 5, *, pipeline: PipelineSpec = None,
                device: str | torch.device | None = None, **kwargs: Any) -> list[Image.Image]:
    """n images from image_a to image_b (both included); `seed=` (default 0) makes runs repeat. See
    `manipulations.interpolate`."""
    return manipulations.interpolate(load_pipeline(pipeline, device=device), image_a, image_b, n, **kwargs)


def text_diff(image: ImageLike, from_text: str, to_text: str, n: int = 5, *, pipeline: PipelineSpec = None,
              device: str | torch.device | None = None, **kwargs: Any) -> list[Image.Image]:
    """n edits of an image along the text change from_text -> to_text; `seed=` (default 0) makes runs repeat. See
    `manipulations.text_diff`."""
    return manipulations.text_diff(load_pipeline(pipeline, device=device), image, from_text, to_text, n, **kwargs)
