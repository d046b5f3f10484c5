"""Noise schedules: the per-timestep constants of the forward process q(x_t | x0), computed in float64.

A schedule is T betas; everything else (alpha-bar, the posterior q(x_{t-1} | x_t, x0) coefficients) is derived
from them once, in float64, and kept on the CPU in float64. `extract(values, t, x)` gathers per-row values and
casts them to x's dtype and device on use; the samplers read scalars with `alphas_cumprod_at(schedule, t)`.

    schedule = make_schedule("cosine", 1000)
    a = extract(schedule.sqrt_alphas_cumprod, t, x0)      # (b,) timesteps -> (b, 1, ..., 1)
    x_t = a * x0 + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "ScheduleKind",
    "ScheduleConfig",
    "NoiseSchedule",
    "linear_schedule",
    "cosine_schedule",
    "make_schedule",
    "posterior_coefficients",
    "extract",
    "on_device",
    "alphas_cumprod_at",
]

ScheduleKind = Literal["linear", "cosine"]


@dataclass(frozen=True)
class ScheduleConfig:
    """Which noise schedule a stage trains and samples with."""

    kind: ScheduleKind = "cosine"  # beta schedule: "linear" (Ho et al.) or "cosine" (Nichol & Dhariwal)
    num_timesteps: int = 1000  # T, the number of training diffusion steps; timesteps are 0 .. T-1

    def __post_init__(self) -> None:
        if self.num_timesteps < 1:
            raise ValueError(f"num_timesteps must be at least 1, got {self.num_timesteps}")


def posterior_coefficients(alpha_bar: Tensor, alpha_bar_prev: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Coefficients of q(x_s | x_t, x0) for a step from level t to an earlier level s (Ho et al. eq. 6-7).

    With beta = 1 - alpha_bar / alpha_bar_prev (the step's beta, equal to beta_t for s = t - 1 and the respaced
    beta for a timestep subset): mean = coef_x0 * x0 + coef_xt * x_t and variance = beta-tilde. Works on float64
    tensors of any (matching) shape or on Python floats. alpha_bar_prev = 1 stands for "x0 itself" (s = -1).

    Returns: (coef_x0, coef_xt, variance).
    """
    beta = 1 - alpha_bar / alpha_bar_prev
    coef_x0 = alpha_bar_prev**0.5 * beta / (1 - alpha_bar)
    coef_xt = (1 - beta) ** 0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar)
    variance = beta * (1 - alpha_bar_prev) / (1 - alpha_bar)
    return coef_x0, coef_xt, variance


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """The constants of a T-step forward process, each a float64 CPU tensor of shape (T,), indexed by t.

    Build one with `linear_schedule`, `cosine_schedule`, `make_schedule` or `NoiseSchedule.from_betas`.
    """

    betas: Tensor  # beta_t, the variance of q(x_t | x_{t-1})
    alphas: Tensor  # 1 - beta_t
    alphas_cumprod: Tensor  # alpha-bar_t = prod_{s<=t} alpha_s, so x_t = sqrt(alpha-bar) x0 + sqrt(1-alpha-bar) eps
    alphas_cumprod_prev: Tensor  # alpha-bar_{t-1}, with alpha-bar_{-1} = 1
    sqrt_alphas_cumprod: Tensor  # sqrt(alpha-bar_t)
    sqrt_one_minus_alphas_cumprod: Tensor  # sqrt(1 - alpha-bar_t)
    posterior_variance: Tensor  # beta-tilde_t, the variance of q(x_{t-1} | x_t, x0); 0 at t = 0
    posterior_log_variance_clipped: Tensor  # log beta-tilde_t, with beta-tilde_1 standing in at t = 0 (it is 0 there)
    posterior_mean_coef1: Tensor  # coefficient of x0 in the mean of q(x_{t-1} | x_t, x0)
    posterior_mean_coef2: Tensor  # coefficient of x_t in the mean of q(x_{t-1} | x_t, x0)

    @classmethod
    def from_betas(cls, betas: Tensor) -> NoiseSchedule:
        """Derive every table from betas (T,); computed in float64 whatever the input dtype."""
        betas = torch.as_tensor(betas, dtype=torch.float64, device="cpu").clone()
        assert betas.ndim == 1 and len(betas) >= 1, f"betas must be (T,), got {tuple(betas.shape)}"
        assert bool(((betas > 0) & (betas <= 1)).all()), "betas must lie in (0, 1]"
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        coef1, coef2, variance = posterior_coefficients(alphas_cumprod, alphas_cumprod_prev)
        # beta-tilde_0 = 0; the log is clipped by reusing beta-tilde_1 (improved-DDPM), or beta_0 when T = 1.
        first = variance[1:2] if len(variance) > 1 else betas[:1]
        log_variance_clipped = torch.log(torch.cat([first, variance[1:]]))
        return cls(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1.0 - alphas_cumprod).sqrt(),
            posterior_variance=variance,
            posterior_log_variance_clipped=log_variance_clipped,
            posterior_mean_coef1=coef1,
            posterior_mean_coef2=coef2,
        )

    @property
    def num_timesteps(self) -> int:
        """T: valid timesteps are 0 .. T-1."""
        return len(self.betas)


def linear_schedule(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
    """DDPM's linear betas (Ho et al. 2020), given for T = 1000 and rescaled by 1000 / T for other T.

    The rescaling (as in improved-DDPM) keeps alpha-bar_T, and so the terminal signal level, about the same
    whatever T; with the defaults and T = 1000 the betas run from 1e-4 to 0.02 exactly. Short schedules whose
    rescaled betas would reach 1 (T <= 20 with the defaults) are refused: use the cosine schedule for those.
    """
    scale = 1000 / num_timesteps
    if beta_end * scale >= 1:
        raise ValueError(f"a linear schedule of {num_timesteps} steps has beta_end {beta_end * scale:g} >= 1; "
                         "use more steps or the cosine schedule")
    betas = torch.linspace(beta_start * scale, beta_end * scale, num_timesteps, dtype=torch.float64)
    return NoiseSchedule.from_betas(betas)


def cosine_schedule(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
    """Nichol & Dhariwal's cosine schedule: alpha-bar(u) = cos((u + s) / (1 + s) * pi / 2)^2 for u = t / T.

    beta_t = 1 - alpha-bar((t+1) / T) / alpha-bar(t / T), capped at max_beta to keep the last step finite.
    """

    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
             for i in range(num_timesteps)]
    return NoiseSchedule.from_betas(torch.tensor(betas, dtype=torch.float64))


def make_schedule(kind: ScheduleKind = "cosine", num_timesteps: int = 1000) -> NoiseSchedule:
    """The schedule named by `kind` with T = num_timesteps; `make_schedule(cfg.kind, cfg.num_timesteps)`."""
    if kind == "linear":
        return linear_schedule(num_timesteps)
    if kind == "cosine":
        return cosine_schedule(num_timesteps)
    raise ValueError(f"unknown schedule kind {kind!r}; expected 'linear' or 'cosine'")


_DEVICE_COPIES: dict[int, dict[torch.device, Tensor]] = {}  # id(table) -> its copies on other devices


def on_device(values: Tensor, device: torch.device) -> Tensor:
    """A schedule table on `device`, copied there once per table and device, then reused.

    A copy from ordinary host memory to a GPU waits for everything queued on the device; a lookup that copied its
    table every time would stall each training and sampling step. The tables are never modified in place.
    """
    if values.device == device:
        return values
    copies = _DEVICE_COPIES.get(id(values))
    if copies is None:
        copies = _DEVICE_COPIES[id(values)] = {}
        weakref.finalize(values, _DEVICE_COPIES.pop, id(values), None)  # forget the copies with the table
    if device not in copies:
        copies[device] = values.to(device)
    return copies[device]


def extract(values: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """Gather values[t] per row and shape it to broadcast against x.

    values: (T,) table; t: (b,) long timesteps; x: (b, *) -> (b, 1, ..., 1) in x's dtype and on x's device.
    """
    assert t.ndim == 1 and t.shape[0] == x.shape[0], f"t must be (b,) = ({x.shape[0]},), got {tuple(t.shape)}"
    gathered = on_device(values, t.device)[t].to(x.dtype)  # (b,)
    return gathered.to(x.device).view(-1, *([1] * (x.ndim - 1)))  # (b,) -> (b, 1, ..., 1)


def alphas_cumprod_at(schedule: NoiseSchedule, t: int) -> float:
    """alpha-bar_t as a Python float (float64 precision); t = -1 means the clean data, alpha-bar = 1."""
    if t < 0:
        return 1.0
    return float(schedule.alphas_cumprod[t])
