"""Analytic-DPM for the prior (DALL-E 2, Table 3: the prior samples with "analytic" variances).

    calibrate_prior(prior, clip.encode_text(captions), clip.encode_image(images))   # sets prior.eps_moments
    prior.save_pretrained("runs/prior/model")                                          # stored with the weights
    image_embed = sample_image_embeds(prior, text, sampler="analytic_ddpm", steps=64)

Calibration estimates Gamma_t = E ||eps(x_t, t)||^2 / d at every timestep from (caption, image embedding) pairs
of the training data, under the unguided conditional prior (`unclip.diffusion.analytic`); `train-prior` does it
after training (`calibration_samples`). Sampling with guidance uses the same moments.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unclip.clip import TextEncoding
from unclip.diffusion.analytic import eps_moments
from unclip.nn import eval_mode
from unclip.settings import StageSampling

from .model import DiffusionPriorNetwork

__all__ = ["calibrate_prior"]


@torch.no_grad()
def calibrate_prior(
    prior: DiffusionPriorNetwork,
    text: TextEncoding,
    image_embed: Tensor,
    *,
    batch_size: int = 512,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> Tensor:
    """Estimate the prior's Analytic-DPM moments from n pairs and store them as `prior.eps_moments`: (T,) float64.

    text: the n captions' TextEncoding; image_embed: (n, d) their images' unit-norm CLIP embeddings. One prior
    call per timestep and batch of `batch_size` rows, each on the cached caption prefix.
    """
    n = image_embed.shape[0]
    if n < 1 or text.text_embed.shape[0] != n:
        raise ValueError(f"calibration needs n >= 1 captions and as many image embeddings, got "
                         f"{text.text_embed.shape[0]} and {n}")
    dtype = next(prior.parameters()).dtype
    total = torch.zeros(prior.schedule.num_timesteps, dtype=torch.float64)
    with eval_mode(prior):
        for start in range(0, n, batch_size):
            rows = slice(start, start + batch_size)
            chunk = TextEncoding(text.text_embed[rows], text.text_states[rows], text.text_mask[rows])
            chunk = chunk.to(prior.device, dtype)
            x0 = image_embed[rows].to(prior.device, dtype) * prior.scale
            denoiser = prior.denoiser({"text": chunk, "num_samples": 1}, StageSampling(guidance=1.0))  # unguided
            total += eps_moments(denoiser, prior.schedule, x0, generator=generator, progress=progress) * x0.shape[0]
    prior.eps_moments = total / n
    return prior.eps_moments
