"""Gaussian diffusion math: the forward process, its posterior, the parameterisations and the training losses.

Notation: alpha-bar_t = schedule.alphas_cumprod[t], x_t = sqrt(alpha-bar) x0 + sqrt(1 - alpha-bar) eps, and the
velocity v = sqrt(alpha-bar) eps - sqrt(1 - alpha-bar) x0 (Salimans & Ho 2022). Every function takes a batch of
per-row timesteps t (b,) and tensors x of shape (b, *) (images (b, c, h, w) or embeddings (b, d) alike).

Variance of the reverse step p(x_{t-1} | x_t), by name (`VarianceType`):
- "fixed_small": beta-tilde_t, the posterior variance (the right choice when x0 is deterministic).
- "fixed_large": beta_t (the right choice for x0 ~ N(0, I)). At t = 0, where beta-tilde is 0, improved-DDPM's
  substitution of beta-tilde_1 is used in `p_log_variance`; the samplers add no noise on their last step, so
  there it never matters.
- "learned_range": the network outputs an extra v in [-1, 1] per element and log sigma^2 = frac log beta +
  (1 - frac) log beta-tilde with frac = (v + 1) / 2 (Nichol & Dhariwal eq. 15), trained with `vlb_loss`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from einops import reduce
from torch import Tensor

from unclip.diffusion.schedule import NoiseSchedule, extract, on_device

__all__ = [
    "Objective",
    "VarianceType",
    "q_sample",
    "q_posterior_mean_variance",
    "predict_x0_from_eps",
    "predict_eps_from_x0",
    "predict_x0_from_v",
    "predict_eps_from_v",
    "v_from_x0_eps",
    "snr",
    "sample_timesteps",
    "diffusion_loss",
    "interpolate_log_variance",
    "p_log_variance",
    "normal_kl",
    "discretized_gaussian_log_likelihood",
    "vlb_loss",
]

Objective = Literal["eps", "x0", "v"]
VarianceType = Literal["fixed_small", "fixed_large", "learned_range"]


def _check(x: Tensor, t: Tensor) -> None:
    assert t.ndim == 1 and t.shape[0] == x.shape[0], f"t must be (b,) with b = {x.shape[0]}, got {tuple(t.shape)}"


def _scales(schedule: NoiseSchedule, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(sqrt(alpha-bar_t), sqrt(1 - alpha-bar_t)), each (b, 1, ..., 1) to broadcast against x (b, *)."""
    _check(x, t)
    return extract(schedule.sqrt_alphas_cumprod, t, x), extract(schedule.sqrt_one_minus_alphas_cumprod, t, x)


def _mean_flat(x: Tensor) -> Tensor:
    """(b, *) -> (b,): the mean over every non-batch dimension."""
    return reduce(x, "b ... -> b", "mean")


def q_sample(schedule: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """Sample q(x_t | x0): sqrt(alpha-bar_t) x0 + sqrt(1 - alpha-bar_t) noise. x0, noise: (b, *); t: (b,)."""
    assert noise.shape == x0.shape, f"noise {tuple(noise.shape)} must match x0 {tuple(x0.shape)}"
    a, s = _scales(schedule, t, x0)
    return a * x0 + s * noise


def q_posterior_mean_variance(
    schedule: NoiseSchedule, x0: Tensor, x_t: Tensor, t: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The posterior q(x_{t-1} | x_t, x0) = N(mean, variance).

    x0, x_t: (b, *); t: (b,). Returns mean (b, *), variance (b, 1, ..) = beta-tilde_t and its clipped log.
    """
    _check(x_t, t)
    mean = extract(schedule.posterior_mean_coef1, t, x_t) * x0 + extract(schedule.posterior_mean_coef2, t, x_t) * x_t
    variance = extract(schedule.posterior_variance, t, x_t)
    log_variance = extract(schedule.posterior_log_variance_clipped, t, x_t)
    return mean, variance, log_variance


def predict_x0_from_eps(schedule: NoiseSchedule, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """x0 = (x_t - sqrt(1 - alpha-bar) eps) / sqrt(alpha-bar). x_t, eps: (b, *); t: (b,)."""
    a, s = _scales(schedule, t, x_t)
    return (x_t - s * eps) / a


def predict_eps_from_x0(schedule: NoiseSchedule, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
    """eps = (x_t - sqrt(alpha-bar) x0) / sqrt(1 - alpha-bar). x_t, x0: (b, *); t: (b,)."""
    a, s = _scales(schedule, t, x_t)
    return (x_t - a * x0) / s


def predict_x0_from_v(schedule: NoiseSchedule, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
    """x0 = sqrt(alpha-bar) x_t - sqrt(1 - alpha-bar) v. x_t, v: (b, *); t: (b,)."""
    a, s = _scales(schedule, t, x_t)
    return a * x_t - s * v


def predict_eps_from_v(schedule: NoiseSchedule, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
    """eps = sqrt(alpha-bar) v + sqrt(1 - alpha-bar) x_t. x_t, v: (b, *); t: (b,)."""
    a, s = _scales(schedule, t, x_t)
    return a * v + s * x_t


def v_from_x0_eps(schedule: NoiseSchedule, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """The v-prediction target v = sqrt(alpha-bar) eps - sqrt(1 - alpha-bar) x0. x0, eps: (b, *); t: (b,)."""
    a, s = _scales(schedule, t, x0)
    return a * eps - s * x0


def snr(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """Signal-to-noise ratio alpha-bar_t / (1 - alpha-bar_t) per row: (b,) -> (b,) float32."""
    acp = on_device(schedule.alphas_cumprod, t.device)[t]
    return (acp / (1 - acp)).float()


def sample_timesteps(
    batch: int,
    schedule: NoiseSchedule,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Training timesteps, uniform over 0 .. T-1: (batch,) long on `device` (drawn on the generator's device)."""
    draw_device = generator.device if generator is not None else device
    t = torch.randint(0, schedule.num_timesteps, (batch,), generator=generator, device=draw_device)
    return t.to(device) if device is not None else t


def diffusion_loss(
    model_output: Tensor,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    noise: Tensor,
    schedule: NoiseSchedule,
    objective: Objective,
    min_snr_gamma: float | None = None,
) -> Tensor:
    """Per-sample MSE between the network output and its target: (b,).

    model_output, x0, x_t, noise: (b, *) (split a learned-variance channel off first); t: (b,). The target is
    noise, x0 or v by `objective`. With `min_snr_gamma` (Hang et al. 2023) every objective is weighted so that
    its loss equals min(snr, gamma) * ||x0_pred - x0||^2: eps-MSE by min(snr, g) / snr, x0-MSE by min(snr, g),
    v-MSE by min(snr, g) / (snr + 1).
    """
    _check(x_t, t)
    assert model_output.shape == x0.shape == x_t.shape == noise.shape, (
        f"shapes differ: model_output {tuple(model_output.shape)}, x0 {tuple(x0.shape)}, "
        f"x_t {tuple(x_t.shape)}, noise {tuple(noise.shape)}"
    )
    if objective == "eps":
        target = noise
    elif objective == "x0":
        target = x0
    elif objective == "v":
        target = v_from_x0_eps(schedule, x0, noise, t)
    else:
        raise ValueError(f"unknown objective {objective!r}; expected 'eps', 'x0' or 'v'")
    dtype = torch.promote_types(model_output.dtype, torch.float32)  # at least float32 for the reduction
    loss = _mean_flat((model_output.to(dtype) - target.to(dtype)) ** 2)  # (b,)
    if min_snr_gamma is None:
        return loss
    s = snr(schedule, t).to(dtype)
    clipped = s.clamp(max=min_snr_gamma)
    weight = {"eps": clipped / s, "x0": clipped, "v": clipped / (s + 1)}[objective]
    return loss * weight


def interpolate_log_variance(var_interp: Tensor, min_log: Tensor | float, max_log: Tensor | float) -> Tensor:
    """learned_range: frac * max_log + (1 - frac) * min_log with frac = (v + 1) / 2 and v = var_interp (b, *)."""
    frac = (var_interp + 1) / 2
    return frac * max_log + (1 - frac) * min_log


def p_log_variance(
    schedule: NoiseSchedule, x_t: Tensor, t: Tensor, variance: VarianceType, var_interp: Tensor | None = None
) -> Tensor:
    """log sigma_t^2 of the reverse step p(x_{t-1} | x_t) on the full schedule: (b, 1, ..) or (b, *) if learned."""
    _check(x_t, t)
    min_log = extract(schedule.posterior_log_variance_clipped, t, x_t)  # log beta-tilde_t (clipped at t = 0)
    max_log = extract(schedule.betas.log(), t, x_t)  # log beta_t
    if variance == "fixed_small":
        return min_log
    if variance == "fixed_large":
        at_zero = (t == 0).view(-1, *([1] * (x_t.ndim - 1)))  # (b,) -> (b, 1, ..., 1)
        return torch.where(at_zero, min_log, max_log)  # beta-tilde_1 stands in for beta_0 at t = 0
    if variance == "learned_range":
        assert var_interp is not None and var_interp.shape == x_t.shape, "learned_range needs var_interp (b, *)"
        return interpolate_log_variance(var_interp, min_log, max_log)
    raise ValueError(f"unknown variance {variance!r}; expected 'fixed_small', 'fixed_large' or 'learned_range'")


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats (arguments broadcast)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log p(x) elementwise for data in [-1, 1] quantised to 256 levels (8-bit images), in nats.

    Each level is a bin of width 2/255 around x; the two end bins extend to -inf and +inf. log_scale = log sigma.
    """
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + 1 / 255)
    lower = inv_std * (x - mean - 1 / 255)
    log_cdf_upper = torch.special.log_ndtr(upper)  # log P(X <= upper edge)
    log_sf_lower = torch.special.log_ndtr(-lower)  # log P(X > lower edge)
    log_bin = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_bin))


def vlb_loss(
    schedule: NoiseSchedule,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    x0_pred: Tensor,
    variance: VarianceType,
    var_interp: Tensor | None = None,
) -> Tensor:
    """The variational bound term L_t in bits per dimension, per sample: (b,).

    KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0 and the discretised decoder NLL -log p(x0 | x_1) at
    t = 0 (meaningful for 8-bit images in [-1, 1]). The mean of p comes from `x0_pred`; for the hybrid loss of
    Nichol & Dhariwal pass `x0_pred.detach()` so this term trains only the variance, and add
    `lambda_vlb * vlb_loss(...)` (they use 0.001) to `diffusion_loss`.
    """
    true_mean, _, true_log_var = q_posterior_mean_variance(schedule, x0, x_t, t)
    model_mean, _, _ = q_posterior_mean_variance(schedule, x0_pred, x_t, t)
    model_log_var = p_log_variance(schedule, x_t, t, variance, var_interp)
    kl = _mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2.0)
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)) / math.log(2.0)
    return torch.where(t == 0, nll, kl)
