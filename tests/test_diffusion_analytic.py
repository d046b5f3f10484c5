"""Analytic-DPM against Gaussian data, where everything is known in closed form: for x0 ~ N(0, s^2 I) the exact
noise predictor is eps*(x_t) = sqrt(1 - abar_t) x_t / (abar_t s^2 + 1 - abar_t), Gamma_t = (1 - abar_t) /
(abar_t s^2 + 1 - abar_t), and the optimal variance of a reverse step t -> s is Var(x_s | x_t), from the joint
Gaussian of (x_s, x_t). None of these formulas is the one the module implements."""

from __future__ import annotations

import math

import pytest
import torch

from unclip.diffusion import make_denoiser, make_schedule, sample_ddpm, timestep_subset
from unclip.diffusion.analytic import analytic_variance, eps_moments, sample_analytic_ddpm
from unclip.diffusion.schedule import alphas_cumprod_at

DATA_STD = 0.5


def exact_eps_denoiser(schedule, std=DATA_STD):
    abar = schedule.alphas_cumprod

    def model(x_t, t):
        a = abar[t].to(x_t).view(-1, *([1] * (x_t.ndim - 1)))
        return (1 - a).sqrt() * x_t / (a * std**2 + 1 - a)

    return make_denoiser(model, schedule, "eps")


def exact_gamma(abar: float, std=DATA_STD) -> float:
    return (1 - abar) / (abar * std**2 + 1 - abar)


def conditional_variance(abar_t: float, abar_s: float, std=DATA_STD) -> float:
    """Var(x_s | x_t) for x0 ~ N(0, std^2): x_t = sqrt(abar_t / abar_s) x_s + independent noise."""
    var_s, var_t = abar_s * std**2 + 1 - abar_s, abar_t * std**2 + 1 - abar_t
    cov = math.sqrt(abar_t / abar_s) * var_s
    return var_s - cov**2 / var_t


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_the_variance_is_the_true_conditional_variance_for_gaussian_data(kind):
    schedule = make_schedule(kind, 1000)
    for t, s in [(999, 899), (999, 0), (500, 250), (300, 299), (100, 0), (50, 10)]:
        abar_t, abar_s = alphas_cumprod_at(schedule, t), alphas_cumprod_at(schedule, s)
        got = analytic_variance(schedule, t, s, exact_gamma(abar_t))
        assert got == pytest.approx(conditional_variance(abar_t, abar_s), rel=1e-6), (t, s)


def test_gamma_out_of_range_keeps_the_variance_within_the_theorem_s_bounds():
    schedule = make_schedule("cosine", 1000)
    beta_tilde = analytic_variance(schedule, 600, 400, 1.0)  # Gamma = 1: nothing left to learn about x0
    assert analytic_variance(schedule, 600, 400, 1.7) == beta_tilde  # a noisy estimate above 1 is clipped
    assert analytic_variance(schedule, 600, 400, -0.3) == analytic_variance(schedule, 600, 400, 0.0)
    assert analytic_variance(schedule, 600, 400, 0.5) > beta_tilde


def test_moments_estimate_gamma():
    schedule = make_schedule("cosine", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = DATA_STD * torch.randn(512, 64, generator=g)
    ts = [999, 700, 400, 100, 10, 0]
    moments = eps_moments(exact_eps_denoiser(schedule), schedule, x0, timesteps=ts, generator=g, progress=False)
    for t in ts:
        assert moments[t].item() == pytest.approx(exact_gamma(alphas_cumprod_at(schedule, t)), rel=0.02), t
    assert torch.isnan(moments[500]) and moments.shape == (1000,)


def test_few_step_samples_get_the_data_variance_that_ddpm_misses():
    """With the exact denoiser and 5 steps, each analytic step reproduces q(x_s | x_t), so the samples have the data's
    variance; DDPM's beta-tilde is far too small for such long steps. (The last step, to the clean data, adds no
    noise in either, so the walk ends at t = 0.)"""
    schedule = make_schedule("cosine", 1000)
    denoiser = exact_eps_denoiser(schedule)
    moments = torch.tensor([exact_gamma(alphas_cumprod_at(schedule, t)) for t in range(1000)], dtype=torch.float64)
    x_T = torch.randn(4096, 16, generator=torch.Generator().manual_seed(1))
    # spacing="linspace" walks 999 .. 0
    analytic = sample_analytic_ddpm(denoiser, x_T, schedule, 5, spacing="linspace", moments=moments,
                                    generator=torch.Generator().manual_seed(2), progress=False)
    ddpm = sample_ddpm(denoiser, x_T, schedule, 5, spacing="linspace", generator=torch.Generator().manual_seed(2),
                       progress=False)
    assert analytic.var().item() == pytest.approx(DATA_STD**2, rel=0.03)
    assert ddpm.var().item() < 0.8 * DATA_STD**2


def test_missing_moments_are_refused_before_sampling():
    schedule = make_schedule("cosine", 1000)
    moments = torch.full((1000,), math.nan, dtype=torch.float64)
    moments[timestep_subset(1000, 4)] = 0.5
    calls = []

    def denoiser(x, t):
        calls.append(t)
        raise AssertionError("must not be called")

    with pytest.raises(ValueError, match=r"no eps moment estimated at timestep\(s\) \["):
        sample_analytic_ddpm(denoiser, torch.zeros(2, 3), schedule, 8, moments=moments, progress=False)
    with pytest.raises(ValueError, match=r"moments must be \(1000,\)"):
        sample_analytic_ddpm(denoiser, torch.zeros(2, 3), schedule, 4, moments=moments[:10], progress=False)
    assert calls == []
