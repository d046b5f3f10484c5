"""SHAPES reconstruction accuracy: decode the CLIP image embeddings of held-out images and judge the result.

    acc = reconstruction_accuracy(decoder, clip, samples=200, guidance_scales=(1.0, 3.0))
    acc["guidance"]["3.0"]["all"]   # fraction of decoded images with the source's shape, fg and bg colour

Held-out SHAPES images (triples never seen in training) are rendered at `resolution`, embedded by the CLIP and
decoded from the embedding alone (no caption). The SHAPES CLIP's zero-shot judge (`ShapesJudge`) classifies
each decoded image (resized by the CLIP's preprocessing) and is scored against the source's true attributes.
Two references come with it: "source" judges the true images at full resolution, "ceiling" judges the true
images downsampled to the decoder's side, the best a decoder of that side can score. "agreement" scores the
decoded images against the judge's verdict on their sources instead of the truth (the judge's own errors
on the sources then count as right when the decoder reproduces them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from unclip.clip import Clip
from unclip.clip.shapes_judge import ShapesJudge, verdict_agreement
from unclip.data import ATTRIBUTES, make_shapes
from unclip.images import pil_to_tensor, resize_images

from .model import Decoder
from .sampling import decode

__all__ = ["reconstruction_accuracy"]


@torch.no_grad()
def reconstruction_accuracy(
    decoder: Decoder,
    clip: Clip,
    *,
    samples: int = 200,
    guidance_scales: Sequence[float] = (1.0, 3.0),
    steps: int = 50,
    sampler: str = "ddpm",
    eta: float = 0.0,
    seed: int = 1234,
    batch_size: int = 100,
    resolution: int = 64,
    split: str = "heldout",
    judge: ShapesJudge | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Judge decoded SHAPES images of `split` (default held-out); see the module doc.

    Returns {"samples", "image_size", "source": acc, "ceiling": acc, "ceiling_agreement": acc,
    "guidance": {str(scale): acc}, "agreement": {str(scale): acc}}, each acc a dict of per-attribute ("shape",
    "fg", "bg") and joint ("all") fractions: against the true attributes, except for the "*agreement" entries,
    which compare the judge's verdicts with its verdicts on the sources.
    """
    judge = judge or ShapesJudge(clip)
    data = make_shapes(samples, split=split, seed=seed, resolution=resolution)
    images = torch.stack([pil_to_tensor(im) for im in data["image"]])  # (n, 3, r, r) in [0, 1]
    labels = {k: torch.as_tensor(data[k]) for k in ATTRIBUTES}
    side = decoder.config.image_size
    device = next(decoder.parameters()).device
    embeds = torch.cat([clip.encode_image(images[i:i + batch_size]) for i in range(0, samples, batch_size)])
    source = judge.predict_batched(images, batch_size)
    result: dict[str, Any] = {
        "samples": samples,
        "image_size": side,
        "source": verdict_agreement(source, labels),
        "ceiling": verdict_agreement(ceiling := judge.predict_batched(resize_images(images, side), batch_size),
                                     labels),
        "ceiling_agreement": verdict_agreement(ceiling, source),
        "guidance": {},
        "agreement": {},
    }
    for scale in guidance_scales:
        generator = torch.Generator(device).manual_seed(seed)
        decoded = torch.cat([
            decode(decoder, embeds[i:i + batch_size].to(device), None, steps=steps, sampler=sampler, eta=eta,
                   guidance_scale=scale, generator=generator, progress=progress).cpu()
            for i in range(0, samples, batch_size)
        ])
        pred = judge.predict_batched(decoded, batch_size)
        result["guidance"][str(float(scale))] = verdict_agreement(pred, labels)
        result["agreement"][str(float(scale))] = verdict_agreement(pred, source)
    return result
