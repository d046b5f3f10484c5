"""Analytic-DPM (Bao et al. 2022): the optimal variance of each ancestral step, from the model's own noise
predictions. DALL-E 2 samples its prior this way (Table 3, "analytic").

    moments = eps_moments(denoiser, schedule, x0, cond=cond)                 # (T,): E ||eps(x_t, t)||^2 / d
    x0 = sample_analytic_ddpm(denoiser, x_T, schedule, 64, moments=moments)

For an ancestral step from level t to level s < t with the DDPM posterior mean at the predicted x0 (variance
lambda^2 = beta-tilde of the step), the variance that maximises the likelihood of the reverse process is

    sigma*^2 = lambda^2 + (sqrt((1 - abar_t) abar_s / abar_t) - sqrt(1 - abar_s - lambda^2))^2 (1 - Gamma_t)

with Gamma_t = E_{x_t ~ q} ||eps*(x_t, t)||^2 / d (Bao et al., Theorem 1: 1 - Gamma_t is the remaining
uncertainty about x0 given x_t, per coordinate, in units of (1 - abar_t) / abar_t). Gamma_t is estimated once by
Monte Carlo over training data with the trained network in place of eps* (`eps_moments`) and stored with the
model; 1 - Gamma_t is clipped to [0, 1], which keeps sigma^2 between DDPM's beta-tilde and the largest variance
the theorem allows. With few steps the gap term dominates and the variance grows well above beta-tilde.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from unclip.diffusion.denoiser import Denoiser
from unclip.diffusion.gaussian import q_sample
from unclip.diffusion.samplers import Callback, Generators, Spacing, randn, sample_ddpm, timestep_subset
from unclip.diffusion.schedule import NoiseSchedule, alphas_cumprod_at, posterior_coefficients

__all__ = ["analytic_variance", "eps_moments", "sample_analytic_ddpm"]



@torch.no_grad()
def eps_moments(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x0: Tensor,
    *,
    cond: Mapping[str, Any] | None = None,
    timesteps: Sequence[int] | Tensor | None = None,
    generator: Generators = None,
    progress: bool = True,
) -> Tensor:
    """Gamma_t = mean over the rows of x0 (n, *) of ||eps(x_t, t)||^2 / d, x_t ~ q(x_t | x0): (T,) float64.

    One denoiser call on the n rows per timestep in `timesteps` (default: all T); the others stay NaN. `cond`
    holds the rows' conditioning (each value with n rows), as the samplers pass it. Fresh noise at every t.
    """
    ts = range(schedule.num_timesteps) if timesteps is None else [int(t) for t in timesteps]
    moments = torch.full((schedule.num_timesteps,), math.nan, dtype=torch.float64)
    for t in tqdm(ts, desc="eps moments", disable=not progress, leave=False):
        t_batch = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
        noise = randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        eps = denoiser(q_sample(schedule, x0, t_batch, noise), t_batch, **dict(cond or {})).eps
        moments[t] = eps.double().square().mean().item()
    return moments


def analytic_variance(schedule: NoiseSchedule, t: int, s: int, gamma_t: float) -> float:
    """sigma*^2 of the ancestral step from level t to level s < t (s = -1: the clean data), given Gamma_t."""
    abar_t, abar_s = alphas_cumprod_at(schedule, t), alphas_cumprod_at(schedule, s)
    _, _, lam2 = posterior_coefficients(abar_t, abar_s)
    gap = math.sqrt((1 - abar_t) * abar_s / abar_t) - math.sqrt(max(1 - abar_s - lam2, 0.0))
    return lam2 + gap**2 * min(max(1.0 - gamma_t, 0.0), 1.0)


@torch.no_grad()
def sample_analytic_ddpm(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: NoiseSchedule,
    steps: int,
    *,
    spacing: Spacing = "trailing",
    generator: Generators = None,
    cond: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    progress: bool = True,
    label: str | None = None,
    moments: Tensor,
) -> Tensor:
    """Ancestral DDPM sampling in `steps` steps from x_T (b, *) to x0 (b, *) with Analytic-DPM's variances.

    x_s = mu(x0_pred, x_t) + sigma*_{t,s} z: DDPM's mean, the module doc's sigma*^2 from Gamma_t. moments: (T,)
    Gamma_t from `eps_moments`, known at every timestep walked (checked before the first denoiser call). No noise
    on the last step.
    """
    if moments.shape != (schedule.num_timesteps,):
        raise ValueError(f"moments must be ({schedule.num_timesteps},), one per timestep, got {tuple(moments.shape)}")
    walked = timestep_subset(schedule.num_timesteps, steps, spacing).tolist()
    missing = [t for t in walked if not math.isfinite(float(moments[t]))]
    if missing:
        raise ValueError(f"no eps moment estimated at timestep(s) {missing[:5]}{'...' if len(missing) > 5 else ''}; "
                         "estimate them at the timesteps you sample (eps_moments)")
    variances = [analytic_variance(schedule, t, s, float(moments[t])) for t, s in zip(walked, walked[1:] + [-1])]
    return sample_ddpm(denoiser, x_T, schedule, steps, spacing=spacing, generator=generator, cond=cond,
                       callback=callback, progress=progress, label=label, variance=variances)
