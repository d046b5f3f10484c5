"""The upsampling cascade: base images -> upsampler 1 -> upsampler 2 -> ..., and whether it keeps what they show.

    outputs = run_cascade(base, [up1, up2], generator=torch.Generator().manual_seed(0))   # [(b,3,64,64), (b,3,128,128)]
    report = cascade_agreement([up1, up2], clip, samples=200)    # report["agreement"]["all"]: same verdict, fraction

    unclip eval-cascade --upsamplers runs/upsampler-32-64/model runs/upsampler-64-128/model \\
        --clip runs/clip-shapes-tiny/model --samples 200          # the same on the command line (unclip/cli/cascade.py)

`cascade_agreement` renders held-out SHAPES images, area-downsamples them to the first upsampler's input side (the
base decoder's output side; or takes given base images), runs the cascade and asks the SHAPES CLIP judge for
each image's shape, foreground and background colour: once for the base image (bicubic-upscaled to the CLIP's
input side) and once for the cascade's final output. It reports how often the verdicts agree, per attribute and
for all three, and the judge's accuracy against the true attributes for both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..clip import Clip
from ..clip.shapes_judge import ShapesJudge, verdict_agreement
from ..data import ATTRIBUTES, make_shapes
from ..diffusion import Generators
from ..images import pil_to_tensor, resize_images
from ..stage import CascadeState, SamplingRun, Stage

__all__ = ["check_chain", "run_cascade", "cascade_agreement"]


def _per_stage(value: Sequence[Any] | None, n: int, name: str) -> list[Any]:
    """A per-upsampler list of n values (None: n Nones)."""
    if value is None:
        return [None] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} upsamplers")
    return values


def check_chain(upsamplers: Sequence[Stage], side: int, source: str | None = None) -> None:
    """Refuse, before any sampling, upsamplers that do not chain from `side` px images: each must take the side the
    stage before it makes. source: what makes the first input (e.g. "the decoder"; None: the images given)."""
    before = source
    for i, up in enumerate(upsamplers, start=1):
        low = up.config.low_res_size
        if low != side:
            if before is None:
                raise ValueError(f"upsampler {i} takes {low}px images, got {side}px ones")
            hint = " (upsamplers go lowest resolution first)" if low < side and i > 1 else ""
            raise ValueError(f"upsampler {i} takes {low}px images but {before} makes {side}px ones{hint}")
        side, before = up.config.image_size, f"upsampler {i}"


@torch.no_grad()
def run_cascade(
    images: Tensor,
    upsamplers: Sequence[Stage],
    *,
    steps: Sequence[int | None] | None = None,
    aug_levels: Sequence[float | None] | None = None,
    sampler: str | None = None,
    generator: Generators = None,
    progress: bool = False,
) -> list[Tensor]:
    """Run base images (b, 3, s, s) in [0, 1] through the upsamplers in order: one tensor per upsampler,
    [(b, 3, s * scale_1, ...), (b, 3, s * scale_1 * scale_2, ...), ...], each in [0, 1].

    steps / aug_levels: one entry per upsampler (None, or a None entry: that stage's default); sampler: every
    upsampler's (None: each one's own).
    Each stage's input side must be its `low_res_size` (checked for the whole chain before any sampling); the stages
    share `generator`.
    """
    assert images.ndim == 4 and images.shape[1] == 3, f"images must be (b, 3, s, s), got {tuple(images.shape)}"
    check_chain(upsamplers, images.shape[-1])
    steps_, levels = _per_stage(steps, len(upsamplers), "steps"), _per_stage(aug_levels, len(upsamplers), "aug_levels")
    run = SamplingRun(generator=generator, progress=progress)
    outputs, state = [], CascadeState(images=images)
    for i, up in enumerate(upsamplers):
        spec = up.default_sampling().given(sampler=sampler, steps=steps_[i])
        state = up.sample(state, spec, run, name=f"upsampler-{i + 1}", aug_level=levels[i])
        outputs.append(state.images)
    return outputs


@torch.no_grad()
def cascade_agreement(
    upsamplers: Sequence[Stage],
    clip: Clip,
    *,
    samples: int = 200,
    seed: int = 1234,
    base_images: Tensor | None = None,
    steps: Sequence[int | None] | None = None,
    aug_levels: Sequence[float | None] | None = None,
    sampler: str | None = None,
    batch_size: int = 50,
    progress: bool = False,
) -> dict[str, Any]:
    """How often the cascade's output keeps its base image's shape and colours, judged by the SHAPES CLIP.

    base_images: (n, 3, s, s) in [0, 1] (e.g. decoder outputs) or None: `samples` held-out SHAPES images rendered
    at 64 px and area-downsampled to the first upsampler's low_res_size. Returns {"samples", "sizes",
    "agreement": {attr: fraction}, "base_accuracy": ..., "output_accuracy": ...} (accuracies only for rendered
    bases), each a dict over "shape", "fg", "bg" and "all".
    """
    if not upsamplers:
        raise ValueError("no upsamplers given")
    first = upsamplers[0].config.low_res_size
    check_chain(upsamplers, first if base_images is None else base_images.shape[-1])  # before rendering or sampling
    labels = None
    if base_images is None:
        data = make_shapes(samples, split="heldout", seed=seed, resolution=max(64, first))
        base_images = resize_images(torch.stack([pil_to_tensor(im) for im in data["image"]]), first)
        labels = {k: torch.as_tensor(data[k]) for k in ATTRIBUTES}
    device = next(upsamplers[0].parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    batches = range(0, len(base_images), batch_size)
    finals = torch.cat([
        run_cascade(base_images[i:i + batch_size].to(device), upsamplers, steps=steps, aug_levels=aug_levels,
                    sampler=sampler, generator=generator)[-1].cpu()
        for i in tqdm(batches, desc="cascade", disable=not progress)
    ])
    judge = ShapesJudge(clip)
    side = max(clip.image_size, first)
    base_up = F.interpolate(base_images, size=side, mode="bicubic", align_corners=False).clamp(0, 1)
    base_pred, final_pred = judge.predict_batched(base_up, batch_size), judge.predict_batched(finals, batch_size)
    report: dict[str, Any] = {"samples": len(base_images),
                              "sizes": [first, *(u.config.image_size for u in upsamplers)],
                              "agreement": verdict_agreement(final_pred, base_pred)}
    if labels is not None:
        report["base_accuracy"] = verdict_agreement(base_pred, labels)
        report["output_accuracy"] = verdict_agreement(final_pred, labels)
    return report
