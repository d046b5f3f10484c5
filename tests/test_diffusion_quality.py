"""End-to-end quality: a small MLP denoiser trained for seconds on a 2-D Gaussian mixture, then sampled with
every sampler. The samples must reproduce the mixture's means, weights and within-component spread, and a
DDPM run with a wrong posterior variance must fail the same check (so the check can see variance bugs)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import unclip.diffusion.samplers as samplers_module
from unclip.diffusion import (
    diffusion_loss,
    make_denoiser,
    make_schedule,
    q_sample,
    randn,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_timesteps,
)

MEANS = torch.tensor([[-0.8, -0.5], [0.8, -0.5], [0.0, 0.8]])  # pairwise distances >= 1.5 = 10 stds
WEIGHTS = torch.tensor([0.5, 0.3, 0.2])
STD = 0.15
N_SAMPLES = 3000
# Tolerances (samples are assigned to the nearest true mean): each component's mean within 0.08 (about half a
# std), its weight within 0.05 (the binomial std with 3000 samples is <= 0.009), and its per-axis std within
# 10% of 0.15 for DDPM. The deterministic samplers get 30% on the std: with a network trained for seconds they
# miss the spread by 15-20% (an ODE sampler does not correct score errors the way ancestral noise does, and the
# last step of a 20-step run is from a noise level comparable to 0.15), which is no sampler bug.
MEAN_TOL, WEIGHT_TOL = 0.08, 0.05
STD_REL_TOL = {"ddpm": 0.1, "ode": 0.3, "sde": 0.2}  # sde: DPM-Solver++(2M) SDE at 50 steps


def sample_mixture(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 2) draws from the mixture."""
    comp = torch.multinomial(WEIGHTS, n, replacement=True, generator=generator)
    return MEANS[comp] + STD * torch.randn(n, 2, generator=generator)


class MLP(nn.Module):
    """eps(x_t, t): 3 hidden layers of 128, SiLU, with a sinusoidal embedding of t."""

    def __init__(self, hidden: int = 128, t_dim: int = 32):
        super().__init__()
        self.t_dim = t_dim
        self.net = nn.Sequential(
            nn.Linear(2 + t_dim, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, 2),
        )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        half = self.t_dim // 2
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, dtype=torch.float32) / half)  # (half,)
        angles = t.float()[:, None] * freqs[None]  # (b, half)
        return self.net(torch.cat([x_t, angles.sin(), angles.cos()], dim=1))


@pytest.fixture(scope="module")
def trained():
    """Train once per module (3000 steps of batch 512, about 10 s); nothing is cached on disk."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    schedule = make_schedule("linear", 1000)
    model = MLP()
    ema = copy.deepcopy(model).requires_grad_(False)  # sampled from: an exponential moving average of the weights
    steps = 3000
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    lr_decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1.5e-4)
    for _ in range(steps):
        x0 = sample_mixture(512, g)
        t = sample_timesteps(512, schedule, g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = q_sample(schedule, x0, t, noise)
        loss = diffusion_loss(model(x_t, t), x0, x_t, t, noise, schedule, "eps").mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_decay.step()
        for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
            p_ema.lerp_(p.detach(), 0.01)
    return make_denoiser(ema.eval(), schedule, "eps"), schedule


def mixture_errors(samples: torch.Tensor, std_rel_tol: float) -> list[str]:
    """What is wrong about samples (n, 2) as draws from the mixture; empty when everything is within tolerance."""
    assign = torch.cdist(samples, MEANS).argmin(dim=1)  # (n,)
    errors = []
    for k in range(len(MEANS)):
        members = samples[assign == k]
        weight = len(members) / len(samples)
        if abs(weight - WEIGHTS[k]) > WEIGHT_TOL:
            errors.append(f"component {k}: weight {weight:.3f} vs {WEIGHTS[k]:.2f}")
        if len(members) < 10:
            errors.append(f"component {k}: only {len(members)} samples")
            continue
        mean_err = float((members.mean(0) - MEANS[k]).norm())
        if mean_err > MEAN_TOL:
            errors.append(f"component {k}: mean off by {mean_err:.3f}")
        std = float(members.std(0).mean())
        if abs(std / STD - 1) > std_rel_tol:
            errors.append(f"component {k}: std {std:.3f} vs {STD}")
    return errors


def x_T(n: int = N_SAMPLES, seed: int = 1) -> torch.Tensor:
    return randn((n, 2), generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
def test_samplers_reproduce_the_mixture(trained):
    denoiser, schedule = trained
    runs = {
        "ddpm": sample_ddpm(denoiser, x_T(), schedule, 1000, generator=torch.Generator().manual_seed(2),
                            progress=False),
        "ode": sample_ddim(denoiser, x_T(), schedule, 50, progress=False),
    }
    dpm = sample_dpmpp_2m(denoiser, x_T(), schedule, 20, progress=False)
    dpm_sde = sample_dpmpp_2m_sde(denoiser, x_T(), schedule, 50, generator=torch.Generator().manual_seed(2),
                                  progress=False)
    for name, samples in [*runs.items(), ("ode", dpm), ("sde", dpm_sde)]:
        assert samples.shape == (N_SAMPLES, 2) and bool(torch.isfinite(samples).all()), name
        assert mixture_errors(samples, STD_REL_TOL[name]) == [], name


@pytest.mark.slow
@pytest.mark.parametrize("factor", [0.0, 0.5, 2.0])
def test_a_wrong_posterior_variance_fails_the_check(trained, monkeypatch, factor):
    """DDPM whose posterior variance is scaled by `factor` (0: no noise at all) must fail the std check."""
    denoiser, schedule = trained
    right = samplers_module.posterior_coefficients

    def wrong(alpha_bar, alpha_bar_prev):
        coef_x0, coef_xt, variance = right(alpha_bar, alpha_bar_prev)
        return coef_x0, coef_xt, factor * variance

    monkeypatch.setattr(samplers_module, "posterior_coefficients", wrong)
    samples = sample_ddpm(denoiser, x_T(1000), schedule, 1000, generator=torch.Generator().manual_seed(2),
                          progress=False)
    errors = mixture_errors(samples, STD_REL_TOL["ddpm"])
    assert any("std" in e for e in errors), errors
