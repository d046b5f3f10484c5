"""How well the prior maps held-out SHAPES captions to image embeddings: two measurements.

For every held-out (shape, fg, bg) triple (never seen by the SHAPES CLIP or prior in training) and every caption
template, the prior samples one image embedding (best-of-N). Against `images_per_triple` freshly rendered
images of each of the 224 triples (random size and position), encoded by the CLIP:

- cosine: the mean cosine similarity between the sampled embedding and the true image embeddings of its
  triple, next to the baseline of the caption's text embedding itself (and, as a ceiling, the mean cosine
  between two different true images of the triple), and the fraction of captions where the prior beats it;
- retrieval: the fraction of captions whose sampled embedding's nearest neighbour (cosine) among the 224
  triples' mean image embeddings is the caption's own triple (the same for the text embedding, as a baseline).

    clip, prior = load_clip("runs/clip-shapes-tiny/model"), DiffusionPriorNetwork.from_pretrained("runs/prior/model")
    result = evaluate_prior_shapes(prior, clip, guidance_scale=1.0)   # {"prior_cosine": ..., "prior_retrieval": ...}
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from unclip.clip import Clip
from unclip.data import CAPTION_TEMPLATES, all_triples, caption_for, is_heldout, render_scene, sample_scene

from .model import DiffusionPriorNetwork
from .sampling import sample_image_embeds

__all__ = ["triple_image_embeds", "heldout_captions", "evaluate_prior_shapes"]


@torch.no_grad()
def triple_image_embeds(clip: Clip, images_per_triple: int = 8, *, seed: int = 1234, resolution: int = 64,
                        batch_size: int = 256) -> Tensor:
    """CLIP embeddings of `images_per_triple` random renders of each triple of `all_triples()`: (224, k, d)."""
    images = []
    for i, triple in enumerate(all_triples()):
        rng = np.random.default_rng([seed, i])
        images += [render_scene(sample_scene(rng, [triple]), resolution) for _ in range(images_per_triple)]
    embeds = torch.cat([clip.encode_image(images[s:s + batch_size]).cpu() for s in range(0, len(images), batch_size)])
    return embeds.view(len(all_triples()), images_per_triple, -1)  # (224, k, d)


def heldout_captions() -> tuple[list[str], Tensor]:
    """Every template's caption of every held-out triple (25 x 6) and each one's index into `all_triples()`."""
    captions, index = [], []
    for i, triple in enumerate(all_triples()):
        if is_heldout(*triple):
            for template in range(len(CAPTION_TEMPLATES)):
                captions.append(caption_for(*triple, template=template))
                index.append(i)
    return captions, torch.tensor(index)


@torch.no_grad()
def evaluate_prior_shapes(
    prior: DiffusionPriorNetwork,
    clip: Clip,
    *,
    guidance_scale: float = 1.0,
    best_of: int = 2,
    steps: int = 64,
    sampler: str = "ddim",
    images_per_triple: int = 8,
    seed: int = 1234,
    image_embeds: Tensor | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> dict[str, float]:
    """The held-out SHAPES measurements (module docstring) of `prior` with the CLIP it was trained against.

    image_embeds: a precomputed `triple_image_embeds(clip, ...)` (224, k, d) to share between calls.
    Returns {"captions", "guidance_scale", "best_of", "steps", "sampler", "prior_cosine", "text_cosine",
    "prior_beats_text" (the fraction of captions whose sampled embedding is closer to their images than their
    text embedding is), "image_cosine_ceiling" (None with one image per triple), "prior_retrieval", "text_retrieval"}.
    """
    if image_embeds is None:
        image_embeds = triple_image_embeds(clip, images_per_triple, seed=seed)
    captions, index = heldout_captions()
    generator = torch.Generator().manual_seed(seed)
    text_embeds, sampled = [], []
    for s in range(0, len(captions), batch_size):
        enc = clip.encode_text(captions[s:s + batch_size])
        text_embeds.append(enc.text_embed.cpu())
        sampled.append(sample_image_embeds(prior, enc, best_of=best_of, steps=steps, sampler=sampler,
                                           guidance_scale=guidance_scale, generator=generator,
                                           progress=progress).cpu())
    text_embed, sampled_embed = torch.cat(text_embeds), torch.cat(sampled)  # (c, d) each
    true = image_embeds[index].float()  # (c, k, d)
    means = F.normalize(image_embeds.float().mean(dim=1), dim=-1)  # (224, d)

    def cosines(x: Tensor) -> Tensor:  # x (c, d) against the true images of each caption's triple: (c,)
        return torch.einsum("cd,ckd->ck", x, true).mean(dim=1)

    def retrieval(x: Tensor) -> float:  # nearest triple mean == own triple
        return ((x @ means.T).argmax(dim=1) == index).float().mean().item()

    k = image_embeds.shape[1]
    pairs = torch.einsum("ckd,cjd->ckj", true, true)  # (c, k, k)
    off_diagonal = pairs.sum(dim=(1, 2)) - pairs.diagonal(dim1=1, dim2=2).sum(dim=1)  # (c,) pairs of distinct images
    ceiling = (off_diagonal / (k * (k - 1))).mean().item() if k > 1 else None  # one image per triple: no pair
    return {
        "captions": len(captions),
        "guidance_scale": guidance_scale,
        "best_of": best_of,
        "steps": steps,
        "sampler": sampler,
        "prior_cosine": cosines(sampled_embed).mean().item(),
        "text_cosine": cosines(text_embed).mean().item(),
        "prior_beats_text": (cosines(sampled_embed) > cosines(text_embed)).float().mean().item(),
        "image_cosine_ceiling": ceiling,
        "prior_retrieval": retrieval(sampled_embed),
        "text_retrieval": retrieval(text_embed),
    }
