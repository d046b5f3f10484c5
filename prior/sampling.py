"""Sampling the prior: caption encodings -> CLIP image embeddings, with the shared samplers and best-of-N.

    enc = clip.encode_text(["a red circle on a blue background"])
    image_embed = sample_image_embeds(prior, enc, best_of=2, steps=64, generator=torch.Generator().manual_seed(0))

Each caption gets `best_of` independent samples (any registered sampler over `steps` of the prior's timesteps);
each sample's x0 is divided by its norm, which undoes the sqrt(d) scaling and puts it on CLIP's unit sphere, and
the sample with the highest dot product with the caption's text embedding is kept (DALL-E 2 draws 2). Guidance
(`guidance_scale` != 1) runs the text-conditioned and the null-conditioned rows in one batch. The stage itself
(`DiffusionPriorNetwork.sample`, the `unclip.stage.Stage` protocol) does this; `sample_image_embeds` is the
one-call form.

By default the caption prefix is computed once per call (prior/cache.py): one pass over the b captions, plus the
null prefix when guiding, gives every layer's keys and values, and each of the `steps` denoiser calls runs only the
3 suffix positions of the b * n candidates (and of their unconditional rows) against them. `use_cache=False` runs
the full sequence at every step; both give the same embeddings up to float rounding.
"""

from __future__ import annotations

from torch import Tensor

from unclip.clip import TextEncoding
from unclip.diffusion import Generators
from unclip.settings import Sampling
from unclip.stage import CascadeState, SamplingRun

from .model import DiffusionPriorNetwork

__all__ = ["sample_image_embeds", "sample_candidates"]


def sample_image_embeds(
    prior: DiffusionPriorNetwork,
    text: TextEncoding,
    *,
    best_of: int | None = None,
    steps: int | None = None,
    sampler: str | None = None,
    guidance_scale: float | None = None,
    generator: Generators = None,
    progress: bool = True,
    use_cache: bool = True,
) -> Tensor:
    """Sample one unit-norm CLIP image embedding per caption: (b, d), the best of `best_of` by text similarity.

    text: TextEncoding of b captions from the CLIP the prior was trained against. best_of, steps, sampler,
    guidance_scale: None takes the pipeline-wide best_of (`Sampling`) and the prior's own settings
    (`DiffusionPriorNetwork.default_sampling`). steps: sampler steps (denoiser calls) out of the prior's T; sampler:
    any registered name ("analytic_ddpm" needs a calibrated prior,
    prior/analytic.py: DALL-E 2's choice); guidance_scale: classifier-free guidance on the text (1: none);
    generator: all randomness (same seed, same embeddings; a list: one per caption); use_cache: compute each
    caption's prefix once per call (the default; False runs the whole sequence at every step, for comparison).
    """
    spec = prior.default_sampling().given(sampler=sampler, steps=steps, guidance=guidance_scale)
    run = SamplingRun(generator=generator, progress=progress, best_of=best_of or Sampling().best_of)
    return prior.sample(CascadeState(text=text), spec, run, use_cache=use_cache).image_embed


def sample_candidates(prior: DiffusionPriorNetwork, text: TextEncoding, num_samples: int = 2, *,
                      steps: int | None = None, sampler: str | None = None, guidance_scale: float | None = None,
                      generator: Generators = None, progress: bool = True, use_cache: bool = True) -> Tensor:
    """`num_samples` unit-norm CLIP image embeddings per caption: (b, num_samples, d); the arguments as in
    `sample_image_embeds`."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    spec = prior.default_sampling().given(sampler=sampler, steps=steps, guidance=guidance_scale)
    run = SamplingRun(generator=generator, progress=progress, best_of=num_samples)
    return prior.sample_candidates(text, spec, run, use_cache=use_cache)
