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

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from einops import repeat
from torch import Tensor

from unclip.clip import TextEncoding
from unclip.diffusion import Generators, classifier_free_guidance
from unclip.settings import StageSampling
from unclip.stage import CascadeState, SamplingRun

from .cache import PrefixCache

if TYPE_CHECKING:  # the network imports this module for its stage methods
    from .model import DiffusionPriorNetwork

__all__ = ["sample_image_embeds", "sample_candidates", "select_best", "prior_model_fn", "cached_prior_fn"]


def select_best(candidates: Tensor, text_embed: Tensor) -> Tensor:
    """Best-of-N: for each caption, the candidate (b, n, d) with the highest dot product with text_embed (b, d).

    Returns (b, d).
    """
    assert candidates.ndim == 3 and text_embed.shape == (candidates.shape[0], candidates.shape[2]), (
        f"candidates (b, n, d) and text_embed (b, d) do not fit: {tuple(candidates.shape)}, {tuple(text_embed.shape)}"
    )
    scores = torch.einsum("bnd,bd->bn", candidates, text_embed.to(candidates.dtype))  # (b, n)
    best = scores.argmax(dim=1)  # (b,)
    return candidates[torch.arange(len(best), device=best.device), best]


def prior_model_fn(prior: DiffusionPriorNetwork, text: TextEncoding, num_samples: int, guidance_scale: float = 1.0,
                   use_cache: bool = True) -> Callable[[Tensor, Tensor], Tensor]:
    """The prior as `model_fn(x_t, t)` for rows '(b n)' (num_samples per caption of `text`), guided by
    `guidance_scale`: with the caption prefixes cached (`cached_prior_fn`) or, use_cache False, the whole sequence
    at every step. `text` on the prior's device and dtype; the prior in eval mode."""
    if use_cache:
        return cached_prior_fn(prior, text, num_samples, guidance_scale)
    guided = classifier_free_guidance(prior, guidance_scale)
    cond = {
        "text_embed": repeat(text.text_embed, "b d -> (b n) d", n=num_samples),
        "text_states": repeat(text.text_states, "b l w -> (b n) l w", n=num_samples),
        "text_mask": repeat(text.text_mask, "b l -> (b n) l", n=num_samples),
    }
    return lambda x_t, t: guided(x_t, t, **cond)


def cached_prior_fn(
    prior: DiffusionPriorNetwork, text: TextEncoding, num_samples: int, guidance_scale: float = 1.0
) -> Callable[[Tensor, Tensor], Tensor]:
    """The prior as `model_fn(x_t, t)` for rows '(b n)' (num_samples per caption of `text`), its caption prefixes
    computed here once: the b captions' and, with guidance, the null prefix, in one `encode_prefix` pass.

    With guidance_scale != 1 each call runs the b * n rows twice in one batch, under their caption's prefix and
    under the null prefix (one cache entry that all b * n rows attend to), and returns
    uncond + guidance_scale * (cond - uncond), as `unclip.diffusion.classifier_free_guidance` does.
    `text` must be on the prior's device and dtype; the prior in eval mode.
    """
    b = text.text_embed.shape[0]
    guided = guidance_scale != 1.0
    embed, tokens, mask, drop = text.text_embed, text.text_states, text.text_mask, None
    if guided:  # one more row for the null prefix (its text is replaced by the learned null conditioning)
        embed, tokens, mask = (torch.cat([x, x[:1]]) for x in (embed, tokens, mask))
        drop = torch.arange(b + 1, device=embed.device) == b  # (b + 1,)
    prefix = prior.encode_prefix(embed, tokens, mask, cond_drop=drop)  # b (+ 1) prefixes
    if not guided:
        return _grouped(prior, num_samples, prefix)
    index = torch.arange(b + 1, device=embed.device)
    captions, null = prefix.select(index[:b]), prefix.select(index[b:])
    both = _grouped(prior, num_samples, captions, null)  # rows: b * n under their captions, b * n under the null

    def guided_fn(x_t: Tensor, t: Tensor) -> Tensor:
        out_cond, out_uncond = both(torch.cat([x_t, x_t]), torch.cat([t, t])).chunk(2)  # 2 x (b * n, d)
        return out_uncond + guidance_scale * (out_cond - out_uncond)

    return guided_fn


def _grouped(prior: DiffusionPriorNetwork, n: int, *prefixes: PrefixCache) -> Callable[[Tensor, Tensor], Tensor]:
    """model_fn for rows '(g n)' of the first cache's g prefixes (n rows each), then as many under each next."""
    rows = len(prefixes[0]) * n

    def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
        assert x_t.shape[0] == rows * len(prefixes), f"expected {len(prefixes)} x {rows} rows, got {x_t.shape[0]}"
        return prior.forward_cached(x_t, t, *prefixes)

    return model_fn


def sample_image_embeds(
    prior: DiffusionPriorNetwork,
    text: TextEncoding,
    *,
    best_of: int = 2,
    steps: int = 64,
    sampler: str = "ddpm",
    guidance_scale: float = 1.0,
    generator: Generators = None,
    progress: bool = True,
    use_cache: bool = True,
) -> Tensor:
    """Sample one unit-norm CLIP image embedding per caption: (b, d), the best of `best_of` by text similarity.

    text: TextEncoding of b captions from the CLIP the prior was trained against. steps: sampler steps (denoiser
    calls) out of the prior's T; sampler: any registered name ("analytic_ddpm" needs a calibrated prior,
    prior/analytic.py: DALL-E 2's choice); guidance_scale: classifier-free guidance on the text (1: none);
    generator: all randomness (same seed, same embeddings; a list: one per caption); use_cache: compute each
    caption's prefix once per call (the default; False runs the whole sequence at every step, for comparison).
    """
    spec = StageSampling(sampler=sampler, steps=steps, guidance=guidance_scale)
    run = SamplingRun(generator=generator, progress=progress, best_of=best_of)
    return prior.sample(CascadeState(text=text), spec, run, use_cache=use_cache).image_embed


def sample_candidates(prior: DiffusionPriorNetwork, text: TextEncoding, num_samples: int = 2, *, steps: int = 64,
                      sampler: str = "ddpm", guidance_scale: float = 1.0, generator: Generators = None,
                      progress: bool = True, use_cache: bool = True) -> Tensor:
    """`num_samples` unit-norm CLIP image embeddings per caption: (b, num_samples, d); the arguments as in
    `sample_image_embeds`."""
    spec = StageSampling(sampler=sampler, steps=steps, guidance=guidance_scale)
    run = SamplingRun(generator=generator, progress=progress, best_of=num_samples)
    return prior.sample_candidates(text, spec, run, use_cache=use_cache)
