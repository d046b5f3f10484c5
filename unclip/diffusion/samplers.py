"""Samplers: short stateless functions of a denoiser, a starting tensor and a noise schedule (k-diffusion style).

    denoiser = make_denoiser(guided_model, schedule, "eps")
    x_T = randn((8, 3, 64, 64), generator=g)
    x0 = sample_ddim(denoiser, x_T, schedule, 50, generator=g, cond={"image_embed": e})

Every sampler takes the same arguments, `fn(denoiser, x_T, schedule, steps, *, spacing, generator, cond, callback,
progress, label, **its own options)`, and walks `timestep_subset(T, steps, spacing)`, a descending list of the
schedule's own timesteps t_0 > t_1 > ... > t_{n-1}: it calls the denoiser at each (with the original t, never a
remapped index) and steps from alpha-bar_{t_i} to alpha-bar_{t_{i+1}}, the last step going to the clean data
(alpha-bar = 1, written t = -1). A subset of the T timesteps ("respacing") just means fewer, larger steps whose
betas are 1 - alpha-bar_t / alpha-bar_prev. `unclip.diffusion.registry` names them.

Spacing of `timestep_subset(T, steps, spacing)` (as diffusers' DDIM/DDPM schedulers name them):
- "trailing" (default): round(T - i * T / steps) - 1 for i < steps; starts at T - 1, the pure-noise end
  (steps = T walks every timestep, T - 1 .. 0).
- "leading": i * (T // steps) for i < steps, descending; ends at t = 0 but never starts at T - 1.
- "linspace": round(linspace(0, T - 1, steps)), descending; both ends included.
"trailing" is every sampler's default: it starts from the pure-noise end, and with DPM-Solver++(2M) the
spacings that end at t = 0 make the last multistep extrapolation span a long jump in log-SNR (visibly worse on
the quality test's mixture).

Conditioning reaches the denoiser as `cond` (a dict of keyword arguments). All randomness comes from `generator`
(see `randn`): the same seed gives the same samples, and with one generator per group of rows a group's samples
do not depend on the other rows of the batch. The `callback(step_index, t, x_t, denoised)` hook sees each step's
input x_t and its `Denoised`. `progress` shows a tqdm bar named for the sampler, or "label (sampler)" when the
caller passes `label` (its stage, e.g. "decoder"). Samplers run under `torch.no_grad()`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from unclip.diffusion.denoiser import Denoised, Denoiser
from unclip.diffusion.gaussian import VarianceType, interpolate_log_variance
from unclip.diffusion.schedule import NoiseSchedule, alphas_cumprod_at, posterior_coefficients

__all__ = [
    "seeded_generators",
    "Spacing",
    "Callback",
    "Generators",
    "timestep_subset",
    "randn",
    "ddpm_step",
    "ddim_step",
    "walk",
    "sample_ddpm",
    "sample_ddim",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "ddim_invert",
]

Spacing = Literal["leading", "trailing", "linspace"]
Callback = Callable[[int, int, Tensor, Denoised], None]  # (step_index, t, x_t (b, *), denoised)
Generators = torch.Generator | Sequence[torch.Generator] | None  # one for the batch, or one per group of rows


def timestep_subset(num_timesteps: int, steps: int, spacing: Spacing = "trailing") -> Tensor:
    """`steps` distinct timesteps out of 0 .. num_timesteps-1, descending: (steps,) long. See module doc."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in 1 .. {num_timesteps}, got {steps}")
    i = torch.arange(steps, dtype=torch.float64)
    if spacing == "trailing":
        ts = (num_timesteps - i * num_timesteps / steps).round() - 1
    elif spacing == "leading":
        ts = (i * (num_timesteps // steps)).flip(0)
    elif spacing == "linspace":
        ts = torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64).round().flip(0)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; expected 'leading', 'trailing' or 'linspace'")
    return ts.long()


def randn(
    shape: Sequence[int],
    *,
    generator: Generators = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise of `shape` (b, *) drawn on the generator's device (reproducible), moved to `device`.

    With a sequence of k generators, b must be a multiple of k: the rows form k equal consecutive groups and group
    i (b // k rows) is drawn from generator i alone, so its noise does not depend on the other groups (an image
    stays the same when another caption joins its batch).
    """
    shape = tuple(shape)
    if generator is None or isinstance(generator, torch.Generator):
        noise = torch.randn(shape, generator=generator, device=device if generator is None else generator.device,
                            dtype=dtype)
        return noise if device is None else _to_device(noise, device)
    if not generator or shape[0] % len(generator):
        raise ValueError(f"{shape[0]} rows do not split into equal groups for {len(generator)} generators")
    rows = shape[0] // len(generator)
    device = generator[0].device if device is None else device
    groups = [torch.randn((rows, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
    return torch.cat([_to_device(noise, device) for noise in groups])


def seeded_generators(n: int, seed: int, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """n generators on `device`, the i-th seeded from (seed, i) alone (numpy's SeedSequence spawning), so that row
    i's randomness does not depend on how many rows there are. seed: a whole number in [0, 2**63)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be a whole number in [0, 2**63), got {seed!r}")
    states = [np.random.SeedSequence(seed, spawn_key=(i,)).generate_state(1, dtype=np.uint64)[0] for i in range(n)]
    return [torch.Generator(device).manual_seed(int(state)) for state in states]


def _to_device(noise: Tensor, device: torch.device | str) -> Tensor:
    if noise.device == torch.device(device):
        return noise
    if noise.device.type == "cpu" and torch.device(device).type == "cuda":
        # From pinned memory the copy is queued on the stream and the host runs on: no sync at every step.
        return noise.pin_memory().to(device, non_blocking=True)
    return noise.to(device)


def ddpm_step(
    x_t: Tensor,
    denoised: Denoised,
    alpha_bar: float,
    alpha_bar_prev: float,
    variance: VarianceType | float = "fixed_small",
    noise: Tensor | None = None,
) -> Tensor:
    """One ancestral step x_t -> x_prev ~ p(x_prev | x_t) = N(posterior mean at x0_pred, sigma^2): (b, *).

    alpha_bar, alpha_bar_prev: alpha-bar at t and at the step's target (1.0 for the clean data). sigma^2 is the
    step's beta-tilde ("fixed_small", floored at 1e-20), its beta = 1 - alpha_bar / alpha_bar_prev
    ("fixed_large"), their log-interpolation by `denoised.var_interp` ("learned_range"), or a number given
    (e.g. Analytic-DPM's, `unclip.diffusion.analytic`). No noise -> the mean.
    """
    coef_x0, coef_xt, var_small = posterior_coefficients(alpha_bar, alpha_bar_prev)
    mean = coef_x0 * denoised.x0 + coef_xt * x_t
    if noise is None:
        return mean
    if isinstance(variance, (int, float)) and not isinstance(variance, bool):
        if not variance >= 0:
            raise ValueError(f"a step's variance must be >= 0, got {variance}")
        return mean + math.sqrt(variance) * noise
    min_log, max_log = math.log(max(var_small, 1e-20)), math.log(1 - alpha_bar / alpha_bar_prev)
    if variance == "fixed_small":
        return mean + math.exp(0.5 * min_log) * noise
    if variance == "fixed_large":
        return mean + math.exp(0.5 * max_log) * noise
    if variance == "learned_range":
        if denoised.var_interp is None:
            raise ValueError("variance='learned_range' needs a denoiser made with variance='learned_range'")
        return mean + torch.exp(0.5 * interpolate_log_variance(denoised.var_interp, min_log, max_log)) * noise
    raise ValueError(f"unknown variance {variance!r}; expected 'fixed_small', 'fixed_large' or 'learned_range'")


def _check_eta(eta: float) -> None:
    if not 0.0 <= eta <= 1.0:  # above 1 the eps coefficient would be the root of a negative number
        raise ValueError(f"DDIM's eta must lie in [0, 1] (0: deterministic, 1: DDPM's noise), got {eta!r}")


def ddim_step(
    denoised: Denoised, alpha_bar: float, alpha_bar_prev: float, eta: float = 0.0, noise: Tensor | None = None
) -> Tensor:
    """One DDIM step to the level alpha_bar_prev: (b, *).

    x_prev = sqrt(alpha_bar_prev) x0 + sqrt(1 - alpha_bar_prev - sigma^2) eps + sigma noise, with (Song et al.
    eq. 16) sigma = eta sqrt(beta-tilde of the step): 0 is deterministic, 1 the DDPM posterior variance. `noise`
    (b, *) is needed whenever sigma > 0.
    """
    _check_eta(eta)
    beta_tilde = (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)
    sigma = eta * math.sqrt(beta_tilde) if eta > 0 else 0.0
    x = math.sqrt(alpha_bar_prev) * denoised.x0 + math.sqrt(max(1 - alpha_bar_prev - sigma**2, 0.0)) * denoised.eps
    if sigma > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        x = x + sigma * noise
    return x


def walk(
    schedule: NoiseSchedule, steps: int, spacing: Spacing, name: str, label: str | None, progress: bool
) -> tuple[Iterable[int], list[float]]:
    """What a sampler loops over: the timesteps t_0 > ... > t_{n-1} of `timestep_subset` (behind a progress bar
    named "label (name)", or `name`), and alpha-bar at each followed by 1.0, the clean data (n + 1 floats)."""
    ts = timestep_subset(schedule.num_timesteps, steps, spacing).tolist()
    alpha_bars = [alphas_cumprod_at(schedule, t) for t in ts] + [1.0]
    return tqdm(ts, desc=_bar_name(name, label), disable=not progress, leave=False), alpha_bars


def _bar_name(name: str, label: str | None) -> str:
    return f"{label} ({name})" if label else name


@torch.no_grad()
def sample_ddpm(
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
    variance: VarianceType | Sequence[float] = "fixed_small",
) -> Tensor:
    """Ancestral DDPM sampling (Ho et al. 2020) in `steps` steps from x_T (b, *) to x0 (b, *).

    x_prev = mu(x0_pred, x_t) + sigma z, with the posterior mean of q(x_prev | x_t, x0) at the predicted x0 and
    sigma^2 by `variance` (see `ddpm_step`), or one variance per step walked (Analytic-DPM's, for instance).
    Fewer steps than T respace with the subset's own betas, as improved-DDPM does. No noise on the last step.
    """
    if not isinstance(variance, str) and len(variance) != steps:
        raise ValueError(f"variance gives {len(variance)} values for {steps} steps")
    ts, alpha_bars = walk(schedule, steps, spacing, "ddpm", label, progress)
    t_in = x_T.new_ones(x_T.shape[0], dtype=torch.long)
    x = x_T
    for i, t in enumerate(ts):
        d = denoiser(x, t * t_in, **(cond or {}))
        if callback is not None:
            callback(i, t, x, d)
        noise = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if i < steps - 1 else None
        step_variance = variance if isinstance(variance, str) else float(variance[i])
        x = ddpm_step(x, d, alpha_bars[i], alpha_bars[i + 1], step_variance, noise)
    return x


@torch.no_grad()
def sample_ddim(
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
    eta: float = 0.0,
) -> Tensor:
    """DDIM sampling (Song et al. 2021) in `steps` steps from x_T (b, *) to x0 (b, *).

    x_prev = sqrt(alpha_bar_prev) x0 + sqrt(1 - alpha_bar_prev - sigma^2) eps + sigma z, sigma = eta sqrt(beta-tilde)
    (`ddim_step`): eta = 0 is deterministic, eta = 1 has DDPM's variance. No noise on the last step.
    """
    _check_eta(eta)  # before the first denoiser call
    ts, alpha_bars = walk(schedule, steps, spacing, "ddim", label, progress)
    t_in = x_T.new_ones(x_T.shape[0], dtype=torch.long)
    x = x_T
    for i, t in enumerate(ts):
        d = denoiser(x, t * t_in, **(cond or {}))
        if callback is not None:
            callback(i, t, x, d)
        noisy = eta > 0 and i < steps - 1
        noise = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if noisy else None
        x = ddim_step(d, alpha_bars[i], alpha_bars[i + 1], eta, noise)
    return x


def _log_snr(alpha_bar: float) -> float:
    """lambda = log(alpha / sigma) = log(alpha-bar / (1 - alpha-bar)) / 2."""
    return 0.5 * (math.log(alpha_bar) - math.log1p(-alpha_bar))


@torch.no_grad()
def sample_dpmpp_2m(
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
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), deterministic, in `steps` denoiser calls: x_T (b, *) -> x0 (b, *).

    Data-prediction form over lambda = log(alpha / sigma), h = lambda_next - lambda_cur:
    x_next = (sigma_next / sigma_cur) x - alpha_next (e^-h - 1) D, with D = x0 on the first step (first order)
    and D = x0 + (x0 - x0_before) / (2 r), r = h_before / h, afterwards (second-order multistep). The last step,
    to sigma = 0, is first order and returns the final x0 itself (diffusers' lower_order_final). `generator` is
    unused: it is there for the common calling convention.
    """
    ts, alpha_bars = walk(schedule, steps, spacing, "dpm++2m", label, progress)
    t_in = x_T.new_ones(x_T.shape[0], dtype=torch.long)
    x, x0_before, h_before = x_T, None, None
    for i, t in enumerate(ts):
        d = denoiser(x, t * t_in, **(cond or {}))
        if callback is not None:
            callback(i, t, x, d)
        if i == steps - 1:  # to sigma = 0: the final x0
            x = d.x0
            continue
        a, a_next = alpha_bars[i], alpha_bars[i + 1]
        h = _log_snr(a_next) - _log_snr(a)
        D = d.x0 if x0_before is None else d.x0 + (d.x0 - x0_before) * (h / (2 * h_before))
        x = math.sqrt((1 - a_next) / (1 - a)) * x - math.sqrt(a_next) * math.expm1(-h) * D
        x0_before, h_before = d.x0, h
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
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
) -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022; diffusers' "sde-dpmsolver++", midpoint), stochastic: x_T -> x0 (b, *).

    The same multistep data prediction D as `sample_dpmpp_2m`, on the reverse SDE instead of the ODE: each step
    keeps e^-h of the ODE's x term, moves further toward D and adds fresh noise in proportion,
    x_next = (sigma_next / sigma_cur) e^-h x + alpha_next (1 - e^-2h) D + sigma_next sqrt(1 - e^-2h) z,
    so that, like ancestral DDPM, every step forgets part of the earlier steps' errors. The last step returns x0.
    """
    ts, alpha_bars = walk(schedule, steps, spacing, "dpm++2m-sde", label, progress)
    t_in = x_T.new_ones(x_T.shape[0], dtype=torch.long)
    x, x0_before, h_before = x_T, None, None
    for i, t in enumerate(ts):
        d = denoiser(x, t * t_in, **(cond or {}))
        if callback is not None:
            callback(i, t, x, d)
        if i == steps - 1:  # to sigma = 0: the final x0
            x = d.x0
            continue
        a, a_next = alpha_bars[i], alpha_bars[i + 1]
        h = _log_snr(a_next) - _log_snr(a)
        D = d.x0 if x0_before is None else d.x0 + (d.x0 - x0_before) * (h / (2 * h_before))
        kept = -math.expm1(-2 * h)  # 1 - e^-2h
        z = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        sigma_ratio = math.sqrt((1 - a_next) / (1 - a))
        x = sigma_ratio * math.exp(-h) * x + math.sqrt(a_next) * kept * D + math.sqrt((1 - a_next) * kept) * z
        x0_before, h_before = d.x0, h
    return x


@torch.no_grad()
def ddim_invert(
    denoiser: Denoiser,
    x0: Tensor,
    schedule: NoiseSchedule,
    steps: int,
    *,
    spacing: Spacing = "trailing",
    fixed_point_iters: int = 0,
    cond: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    progress: bool = True,
    label: str | None = None,
) -> Tensor:
    """Deterministic DDIM run forward, clean x0 (b, *) -> x_T (b, *), over the timesteps `sample_ddim` uses.

    The sampler's step t -> s uses eps(x_t, t); inverting it needs that eps before x_t is known. Each step from
    level s up to the next timestep t approximates it by the denoiser at (x_s, t) (first order in the step
    size), then `fixed_point_iters` times re-evaluates it at the current estimate of x_t, which converges to
    the exact inverse of the sampler's step for a smooth denoiser (one more denoiser call per iteration):
    x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, x0 = (x_s - sqrt(1 - alpha_bar_s) eps) / sqrt(alpha_bar_s).
    With eta=0 and the same steps and spacing, `sample_ddim` then maps x_T back close to x0.
    """
    ts = timestep_subset(schedule.num_timesteps, steps, spacing).flip(0).tolist()  # ascending
    alpha_bars = [1.0] + [alphas_cumprod_at(schedule, t) for t in ts]  # [i]: the level x is at before step i
    t_in = x0.new_ones(x0.shape[0], dtype=torch.long)
    x = x0
    for i, t in enumerate(tqdm(ts, desc=_bar_name("ddim-invert", label), disable=not progress, leave=False)):
        d = denoiser(x, t * t_in, **(cond or {}))
        if callback is not None:
            callback(i, t, x, d)
        a, a_next = alpha_bars[i], alpha_bars[i + 1]
        x_next = _ddim_move(x, d.eps, a, a_next)
        for _ in range(fixed_point_iters):  # eps re-evaluated at the current estimate of x_t
            x_next = _ddim_move(x, denoiser(x_next, t * t_in, **(cond or {})).eps, a, a_next)
        x = x_next
    return x


def _ddim_move(x: Tensor, eps: Tensor, alpha_bar: float, alpha_bar_to: float) -> Tensor:
    """x (b, *) at level alpha_bar moved along the deterministic DDIM path whose noise is eps to level alpha_bar_to:
    sqrt(alpha_bar_to) x0 + sqrt(1 - alpha_bar_to) eps, x0 = (x - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)."""
    x0 = (x - math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha_bar)
    return math.sqrt(alpha_bar_to) * x0 + math.sqrt(max(1 - alpha_bar_to, 0.0)) * eps
