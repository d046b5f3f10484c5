"""The prior as the function a denoiser wraps: rows '(b n)' of candidates under their captions, guided, with the
caption prefixes computed once per call (prior/cache.py) or the whole sequence at every step; and best-of-N.

    model_fn = prior_model_fn(prior, text, num_samples=2, guidance_scale=1.0)   # (x_t (b n, d), t) -> (b n, d)
    best = select_best(candidates, text.text_embed)                              # (b, n, d) -> (b, d)

Guidance (`guidance_scale` != 1) runs the text-conditioned and the null-conditioned rows in one batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from einops import repeat
from torch import Tensor, nn

from unclip.clip import TextEncoding
from unclip.diffusion import classifier_free_guidance

from .cache import PrefixCache

__all__ = ["cached_prior_fn", "prior_model_fn", "select_best"]


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


def prior_model_fn(prior: nn.Module, text: TextEncoding, num_samples: int, guidance_scale: float = 1.0,
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
    prior: nn.Module, text: TextEncoding, num_samples: int, guidance_scale: float = 1.0
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


def _grouped(prior: nn.Module, n: int, *prefixes: PrefixCache) -> Callable[[Tensor, Tensor], Tensor]:
    """model_fn for rows '(g n)' of the first cache's g prefixes (n rows each), then as many under each next."""
    rows = len(prefixes[0]) * n

    def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
        assert x_t.shape[0] == rows * len(prefixes), f"expected {len(prefixes)} x {rows} rows, got {x_t.shape[0]}"
        return prior.forward_cached(x_t, t, *prefixes)

    return model_fn
