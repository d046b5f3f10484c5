"""Samplers: short stateless functions of a denoiser, a starting tensor and a noise schedule (k-diffusion style).

    denoiser = make_denoiser(cfg(model, 4.0), schedule, "eps")
    x_T = randn((8, 3, 64, 64), generator=g)
    x0 = sample_ddim(denoiser, x_T, schedule, steps=50, generator=g, cond={"image_embed": e})

Every sampler walks a descending list of the schedule's own timesteps t_0 > t_1 > ... > t_{n-1}, calling the
denoiser at each (with the original t, never a remapped index) and stepping from alpha-bar_{t_i} to
alpha-bar_{t_{i+1}}, the last step going to the clean data (alpha-bar = 1, written t = -1). A subset of the T
timesteps ("respacing") just means fewer, larger steps whose betas are 1 - alpha-bar_t / alpha-bar_prev.

Spacing of `timestep_subset(T, steps, spacing)` (as diffusers' DDIM/DDPM schedulers name them):
- "trailing" (default): round(T - i * T / steps) - 1 for i < steps; starts at T - 1, the pure-noise end.
- "leading": i * (T // steps) for i < steps, descending; ends at t = 0 but never starts at T - 1.
- "linspace": round(linspace(0, T - 1, steps)), descending; both ends included.
"trailing" is every sampler's default: it starts from the pure-noise end, and with DPM-Solver++(2M) the
spacings that end at t = 0 make the last multistep extrapolation span a long jump in log-SNR (visibly worse on
the quality test's mixture).

Conditioning reaches the denoiser as `cond` (a dict of keyword arguments). All randomness comes from
`generator` (drawn on the generator's device and moved to x's): the same seed gives the same samples. The
`callback(step_index, t, x_t, denoised)` hook sees each step's input x_t and its `Denoised`. `progress` shows a
tqdm bar named for the sampler, or "label (sampler)" when the caller passes `label` (its stage, e.g. "decoder").
Samplers run under `torch.no_grad()`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor
from tqdm.auto import tqdm

from unclip.diffusion.denoiser import Denoised, Denoiser
from unclip.diffusion.gaussian import VarianceType, interpolate_log_variance
from unclip.diffusion.schedule import NoiseSchedule, alphas_cumprod_at, posterior_coefficients

__all__ = [
    "Spacing",
    "Callback",
    "timestep_subset",
    "randn",
    "ddpm_step",
    "ddim_step",
    "sample_ddpm",
    "sample_ddim",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "ddim_invert",
    "SamplerName",
    "SAMPLER_NAMES",
    "sample",
]

Spacing = Literal["leading", "trailing", "linspace"]
Callback = Callable[[int, int, Tensor, Denoised], None]  # (step_index, t, x_t (b, *), denoised)
SamplerName = Literal["ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_sde"]
SAMPLER_NAMES: tuple[str, ...] = get_args(SamplerName)  # what `sample` accepts by name


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
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise of `shape` drawn on the generator's device (reproducible) and moved to `device`."""
    draw_device = generator.device if generator is not None else device
    noise = torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=dtype)
    if device is None or noise.device == torch.device(device):
        return noise
    if noise.device.type == "cpu" and torch.device(device).type == "cuda":
        # From pinned memory the copy is queued on the stream and the host runs on: no sync at every step.
        return noise.pin_memory().to(device, non_blocking=True)
    return noise.to(device)


def _noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


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


def _ddim_sigma(eta: float, alpha_bar: float, alpha_bar_prev: float) -> float:
    """DDIM's sigma (Song et al. eq. 16): eta * sqrt(beta-tilde of the step)."""
    return eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev))


def ddim_step(
    denoised: Denoised, alpha_bar: float, alpha_bar_prev: float, eta: float = 0.0, noise: Tensor | None = None
) -> Tensor:
    """One DDIM step to the level alpha_bar_prev: (b, *).

    x_prev = sqrt(alpha_bar_prev) x0 + sqrt(1 - alpha_bar_prev - sigma^2) eps + sigma noise, with sigma from eta
    (0: deterministic; 1: the DDPM posterior variance). `noise` (b, *) is needed whenever sigma > 0.
    """
    _check_eta(eta)
    sigma = _ddim_sigma(eta, alpha_bar, alpha_bar_prev) if eta > 0 else 0.0
    x = math.sqrt(alpha_bar_prev) * denoised.x0 + math.sqrt(max(1 - alpha_bar_prev - sigma**2, 0.0)) * denoised.eps
    if sigma > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        x = x + sigma * noise
    return x


def _t_batch(t: int, x: Tensor) -> Tensor:
    """The timestep t for every row of x (b, *): (b,) long."""
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


def _run(
    denoiser: Denoiser,
    x: Tensor,
    model_ts: list[int],
    step: Callable[[int, Tensor, Denoised], Tensor],
    *,
    cond: Mapping[str, Any] | None,
    progress: bool,
    callback: Callback | None,
    desc: str,
    label: str | None,
) -> Tensor:
    """The loop every sampler shares: call the denoiser at model_ts[i] (a (b,) batch of it), then `step(i, x, d)`.
    The progress bar reads `desc` (the sampler's name), or "label (desc)" when the caller names its stage."""
    cond = dict(cond or {})
    desc = f"{label} ({desc})" if label else desc
    for i, t in enumerate(tqdm(model_ts, desc=desc, disable=not progress, leave=False)):
        d = denoiser(x, _t_batch(t, x), **cond)
        if callback is not None:
            callback(i, t, x, d)
        x = step(i, x, d)
    return x


def _check_timesteps(timesteps: Sequence[int] | Tensor, num_timesteps: int) -> list[int]:
    ts = [int(t) for t in timesteps]
    if not ts or any(a <= b for a, b in zip(ts[:-1], ts[1:], strict=True)) or ts[0] >= num_timesteps or ts[-1] < 0:
        raise ValueError(f"timesteps must be strictly descending within 0 .. {num_timesteps - 1}, got {ts}")
    return ts


@torch.no_grad()
def sample_ddpm(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: NoiseSchedule,
    *,
    timesteps: Sequence[int] | Tensor | None = None,
    variance: VarianceType | Sequence[float] = "fixed_small",
    generator: torch.Generator | None = None,
    cond: Mapping[str, Any] | None = None,
    progress: bool = True,
    callback: Callback | None = None,
    label: str | None = None,
    desc: str = "ddpm",
) -> Tensor:
    """Ancestral DDPM sampling (Ho et al. 2020) from x_T (b, *) to x0 (b, *).

    timesteps: descending subset to walk (default all T: T-1 .. 0; e.g. `timestep_subset(T, 250)` respaces with
    the subset's own betas, as improved-DDPM does). variance: see `ddpm_step`, or one variance per step walked
    (e.g. Analytic-DPM's, `unclip.diffusion.analytic`). No noise is added on the last step. desc: the progress
    bar's sampler name.
    """
    ts = _check_timesteps(range(schedule.num_timesteps - 1, -1, -1) if timesteps is None else timesteps,
                          schedule.num_timesteps)
    prev = ts[1:] + [-1]
    if not isinstance(variance, str) and len(variance) != len(ts):
        raise ValueError(f"variance gives {len(variance)} values for {len(ts)} steps")

    def step(i: int, x: Tensor, d: Denoised) -> Tensor:
        noise = _noise_like(x, generator) if prev[i] >= 0 else None
        a, a_prev = alphas_cumprod_at(schedule, ts[i]), alphas_cumprod_at(schedule, prev[i])
        return ddpm_step(x, d, a, a_prev, variance if isinstance(variance, str) else float(variance[i]), noise)

    return _run(denoiser, x_T, ts, step, cond=cond, progress=progress, callback=callback, label=label, desc=desc)


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: NoiseSchedule,
    steps: int,
    *,
    eta: float = 0.0,
    spacing: Spacing = "trailing",
    generator: torch.Generator | None = None,
    cond: Mapping[str, Any] | None = None,
    progress: bool = True,
    callback: Callback | None = None,
    label: str | None = None,
) -> Tensor:
    """DDIM sampling (Song et al. 2021) in `steps` steps from x_T (b, *) to x0 (b, *); eta=0 is deterministic."""
    _check_eta(eta)  # before the first denoiser call
    ts = timestep_subset(schedule.num_timesteps, steps, spacing).tolist()
    prev = ts[1:] + [-1]

    def step(i: int, x: Tensor, d: Denoised) -> Tensor:
        a, a_prev = alphas_cumprod_at(schedule, ts[i]), alphas_cumprod_at(schedule, prev[i])
        noise = _noise_like(x, generator) if eta > 0 and prev[i] >= 0 else None
        return ddim_step(d, a, a_prev, eta, noise)

    return _run(denoiser, x_T, ts, step, cond=cond, progress=progress, callback=callback, label=label, desc="ddim")


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
    cond: Mapping[str, Any] | None = None,
    progress: bool = True,
    callback: Callback | None = None,
    label: str | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), deterministic, in `steps` denoiser calls: x_T (b, *) -> x0 (b, *).

    Data-prediction form over lambda = log(alpha / sigma), h = lambda_next - lambda_cur:
    x_next = (sigma_next / sigma_cur) x - alpha_next (e^-h - 1) D, with D = x0 on the first step (first order)
    and D = x0 + (x0 - x0_before) / (2 r), r = h_before / h, afterwards (second-order multistep). The last step,
    to sigma = 0, is first order and returns the final x0 itself (diffusers' lower_order_final).
    """
    return _dpmpp_2m(denoiser, x_T, schedule, steps, spacing=spacing, sde=False, generator=None, cond=cond,
                     progress=progress, callback=callback, label=label)


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: NoiseSchedule,
    steps: int,
    *,
    spacing: Spacing = "trailing",
    generator: torch.Generator | None = None,
    cond: Mapping[str, Any] | None = None,
    progress: bool = True,
    callback: Callback | None = None,
    label: str | None = None,
) -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022; diffusers' "sde-dpmsolver++", midpoint), stochastic: x_T -> x0 (b, *).

    The same multistep data prediction D as `sample_dpmpp_2m`, on the reverse SDE instead of the ODE: each step
    keeps e^-h of the ODE's x term, moves further toward D and adds fresh noise in proportion,
    x_next = (sigma_next / sigma_cur) e^-h x + alpha_next (1 - e^-2h) D + sigma_next sqrt(1 - e^-2h) z,
    so that, like ancestral DDPM, every step forgets part of the earlier steps' errors. The last step returns x0.
    """
    return _dpmpp_2m(denoiser, x_T, schedule, steps, spacing=spacing, sde=True, generator=generator, cond=cond,
                     progress=progress, callback=callback, label=label)


def _dpmpp_2m(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: NoiseSchedule,
    steps: int,
    *,
    spacing: Spacing,
    sde: bool,
    generator: torch.Generator | None,
    cond: Mapping[str, Any] | None,
    progress: bool,
    callback: Callback | None,
    label: str | None,
) -> Tensor:
    """DPM-Solver++(2M), ODE (`sde` False) or SDE form; see `sample_dpmpp_2m` and `sample_dpmpp_2m_sde`."""
    ts = timestep_subset(schedule.num_timesteps, steps, spacing).tolist()
    prev = ts[1:] + [-1]
    history: dict[str, Any] = {"x0": None, "h": None}  # the previous step's x0 and h

    def step(i: int, x: Tensor, d: Denoised) -> Tensor:
        if prev[i] < 0:
            return d.x0
        a, a_next = alphas_cumprod_at(schedule, ts[i]), alphas_cumprod_at(schedule, prev[i])
        h = _log_snr(a_next) - _log_snr(a)
        D = d.x0 if history["x0"] is None else d.x0 + (d.x0 - history["x0"]) * (h / (2 * history["h"]))
        history["x0"], history["h"] = d.x0, h
        sigma_ratio = math.sqrt((1 - a_next) / (1 - a))
        if not sde:
            return sigma_ratio * x - math.sqrt(a_next) * math.expm1(-h) * D
        kept = -math.expm1(-2 * h)  # 1 - e^-2h
        noise = _noise_like(x, generator)
        noise_scale = math.sqrt((1 - a_next) * kept)  # sigma_next sqrt(1 - e^-2h)
        return (sigma_ratio * math.exp(-h)) * x + (math.sqrt(a_next) * kept) * D + noise_scale * noise

    desc = "dpm++2m-sde" if sde else "dpm++2m"
    return _run(denoiser, x_T, ts, step, cond=cond, progress=progress, callback=callback, label=label, desc=desc)


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
    progress: bool = True,
    callback: Callback | None = None,
    label: str | None = None,
) -> Tensor:
    """Deterministic DDIM run forward, clean x0 (b, *) -> x_T (b, *), over the timesteps `sample_ddim` uses.

    The sampler's step t -> s uses eps(x_t, t); inverting it needs that eps before x_t is known. Each step from
    level s up to the next timestep t approximates it by the denoiser at (x_s, t) (first order in the step
    size), then `fixed_point_iters` times re-evaluates it at the current estimate of x_t, which converges to
    the exact inverse of the sampler's step for a smooth denoiser (one more denoiser call per iteration). With
    eta=0 and the same steps and spacing, `sample_ddim` then maps x_T back close to x0.
    """
    ts = timestep_subset(schedule.num_timesteps, steps, spacing).flip(0).tolist()  # ascending
    cur = [-1] + ts[:-1]
    cond = dict(cond or {})

    def step(i: int, x: Tensor, d: Denoised) -> Tensor:
        a_cur, a_next = alphas_cumprod_at(schedule, cur[i]), alphas_cumprod_at(schedule, ts[i])

        def up(eps: Tensor) -> Tensor:  # x_s -> x_t along the DDIM path whose noise is eps
            x0_cur = (x - math.sqrt(1 - a_cur) * eps) / math.sqrt(a_cur)
            return ddim_step(Denoised(x0=x0_cur, eps=eps), a_cur, a_next)

        x_next = up(d.eps)
        for _ in range(fixed_point_iters):
            x_next = up(denoiser(x_next, _t_batch(ts[i], x), **cond).eps)
        return x_next

    return _run(denoiser, x0, ts, step, cond=cond, progress=progress, callback=callback, label=label,
                desc="ddim-invert")


def sample(
    sampler: SamplerName,
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: NoiseSchedule,
    steps: int,
    *,
    eta: float = 0.0,
    variance: VarianceType = "fixed_small",
    generator: torch.Generator | None = None,
    cond: Mapping[str, Any] | None = None,
    progress: bool = True,
    label: str | None = None,
) -> Tensor:
    """Run the sampler named `sampler` for `steps` denoiser calls from x_T (b, *) to x0 (b, *).

    "ddim" (eta: its noise, 0 deterministic), "ddpm" (ancestral, on `steps` trailing-respaced timesteps, with the
    reverse `variance`), "dpmpp_2m" (deterministic) or "dpmpp_2m_sde" (stochastic). For a stage that lets its
    caller pick the sampler by name. label: the stage, shown on the progress bar as "label (sampler)".
    """
    if sampler == "ddim":
        return sample_ddim(denoiser, x_T, schedule, steps, eta=eta, generator=generator, cond=cond, progress=progress,
                           label=label)
    if sampler == "ddpm":
        timesteps = timestep_subset(schedule.num_timesteps, steps)
        return sample_ddpm(denoiser, x_T, schedule, timesteps=timesteps, variance=variance, generator=generator,
                           cond=cond, progress=progress, label=label)
    if sampler == "dpmpp_2m":
        return sample_dpmpp_2m(denoiser, x_T, schedule, steps, cond=cond, progress=progress, label=label)
    if sampler == "dpmpp_2m_sde":
        return sample_dpmpp_2m_sde(denoiser, x_T, schedule, steps, generator=generator, cond=cond, progress=progress,
                                   label=label)
    raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLER_NAMES)}")
