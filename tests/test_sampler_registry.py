"""The sampler registry and per-row generators: a new sampler is one function and one registration; options are
offers each sampler takes what it needs from; a group of rows drawn from its own generator does not change when
other rows join the batch, in every registered sampler. Data are Gaussian, x0 ~ N(0, s^2 I), with the exact
denoiser, so results are known in closed form."""

from __future__ import annotations

import math

import pytest
import torch

from unclip.diffusion import (
    SAMPLERS,
    make_denoiser,
    make_schedule,
    randn,
    register_sampler,
    sample,
    sample_ddim,
    sampler_options,
)
from unclip.diffusion.samplers import walk

DATA_STD = 0.5


def exact_denoiser(schedule):
    """The exact eps-predictor for x0 ~ N(0, DATA_STD^2 I): eps*(x_t) = sqrt(1 - abar) x_t / (abar s^2 + 1 - abar)."""

    def model(x_t, t):
        a = schedule.alphas_cumprod[t].to(x_t).view(-1, *([1] * (x_t.ndim - 1)))
        return (1 - a).sqrt() * x_t / (a * DATA_STD**2 + 1 - a)

    return make_denoiser(model, schedule, "eps")


def exact_moments(schedule):
    """Gamma_t = E ||eps*(x_t, t)||^2 / d = (1 - abar_t) / (abar_t s^2 + 1 - abar_t), for Analytic-DPM."""
    a = schedule.alphas_cumprod
    return (1 - a) / (a * DATA_STD**2 + 1 - a)


def sample_euler(denoiser, x_T, schedule, steps, *, spacing="trailing", generator=None, cond=None, callback=None,
                 progress=True, label=None):
    """Euler on the probability-flow ODE in x0-prediction form, in the variables x / alpha and sigma / alpha:
    x_next / alpha_next = x0 + (sigma_next / alpha_next) / (sigma / alpha) (x / alpha - x0)."""
    ts, alpha_bars = walk(schedule, steps, spacing, "euler", label, progress)
    x = x_T
    for i, t in enumerate(ts):
        d = denoiser(x, torch.full((x.shape[0],), t), **(cond or {}))
        a, a_next = alpha_bars[i], alpha_bars[i + 1]
        ratio = math.sqrt((1 - a_next) / a_next) / math.sqrt((1 - a) / a)
        x = math.sqrt(a_next) * (d.x0 + ratio * (x / math.sqrt(a) - d.x0))
    return x


@pytest.fixture
def euler():
    register_sampler("euler", sample_euler)
    yield "euler"
    del SAMPLERS["euler"]


def test_a_sampler_registered_in_one_line_runs_by_name(euler):
    """For Gaussian data the probability-flow ODE is linear: it maps x_T to x_T s / std(x_T), exactly."""
    schedule = make_schedule("cosine", 1000)
    denoiser = exact_denoiser(schedule)
    x_T = randn((16, 8), generator=torch.Generator().manual_seed(0))
    abar = float(schedule.alphas_cumprod[999])  # where the default "trailing" walk starts
    exact = x_T * DATA_STD / math.sqrt(abar * DATA_STD**2 + 1 - abar)
    errors = {}
    for steps in (50, 100):
        x0 = sample(euler, denoiser, x_T, schedule, steps, progress=False)
        errors[steps] = float((x0 - exact).abs().max() / exact.abs().max())
        # DDIM with eta = 0 is this very Euler step (Song et al. 2021, section 4.3).
        torch.testing.assert_close(x0, sample_ddim(denoiser, x_T, schedule, steps, progress=False))
    assert errors[50] < 0.04
    assert 1.8 < errors[50] / errors[100] < 2.2  # first order: twice the steps, half the error
    assert sampler_options(euler) == {}


def test_register_sampler_as_a_decorator_and_its_refusals(euler):
    assert register_sampler(euler, sample_euler) is sample_euler  # the same function again: nothing changes
    with pytest.raises(ValueError, match="already registered"):
        register_sampler(euler, sample_ddim)
    assert register_sampler(euler, sample_ddim, replace=True) is sample_ddim and SAMPLERS[euler] is sample_ddim

    @register_sampler(euler, replace=True)
    def again(denoiser, x_T, schedule, steps, *, spacing="trailing", generator=None, cond=None, callback=None,
              progress=True, label=None, gamma=1.0):
        return x_T

    assert SAMPLERS[euler] is again and sampler_options(euler) == {"gamma": False}
    with pytest.raises(ValueError, match="common keyword"):
        register_sampler("no_convention", lambda denoiser, x_T, schedule, steps: x_T)
    assert "no_convention" not in SAMPLERS


def test_the_shared_samplers_and_their_options():
    assert {"ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_sde", "analytic_ddpm"} <= set(SAMPLERS)
    assert sampler_options("ddim") == {"eta": False}
    assert sampler_options("ddpm") == {"variance": False}
    assert sampler_options("dpmpp_2m") == sampler_options("dpmpp_2m_sde") == {}
    assert sampler_options("analytic_ddpm") == {"moments": True}


def test_an_unknown_name_lists_the_registered_ones():
    schedule = make_schedule("cosine", 100)
    with pytest.raises(ValueError, match="unknown sampler 'heun'; registered: ddim, ddpm") as info:
        sample("heun", exact_denoiser(schedule), torch.zeros(2, 3), schedule, 5, progress=False)
    assert all(name in str(info.value) for name in SAMPLERS)
    with pytest.raises(ValueError, match="registered: "):
        sampler_options("heun")


def test_options_are_offers():
    schedule = make_schedule("cosine", 100)
    denoiser = exact_denoiser(schedule)
    x_T = randn((2, 3), generator=torch.Generator().manual_seed(0))
    offers = {"eta": 1.0, "variance": "learned_range", "moments": None}  # the variance needs a channel ddim lacks
    got = sample("ddim", denoiser, x_T, schedule, 5, options=offers, generator=torch.Generator().manual_seed(1),
                 progress=False)
    want = sample_ddim(denoiser, x_T, schedule, 5, eta=1.0, generator=torch.Generator().manual_seed(1), progress=False)
    assert torch.equal(got, want)
    # A required option missing (or offered as None) is refused before any denoiser call.
    calls = []

    def counting(x, t):
        calls.append(t)
        return denoiser(x, t)

    for offers in (None, {"variance": "fixed_small"}, {"moments": None}):
        with pytest.raises(ValueError, match="sampler 'analytic_ddpm' needs `moments`, which was not provided"):
            sample("analytic_ddpm", counting, x_T, schedule, 5, options=offers, progress=False)
    assert calls == []
    # A sampler's own option passed as a common keyword is a mistake, not silently dropped.
    with pytest.raises(TypeError, match="eta"):
        sample("ddim", denoiser, x_T, schedule, 5, eta=0.5, progress=False)


def test_randn_draws_each_group_of_rows_from_its_own_generator():
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    noise = randn((6, 4, 5), generator=gens)
    assert noise.shape == (6, 4, 5)
    for i, seed in enumerate((1, 2, 3)):
        alone = randn((2, 4, 5), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(noise[2 * i:2 * i + 2], alone)
    assert torch.equal(randn((2, 3), generator=[torch.Generator().manual_seed(1)]),
                       randn((2, 3), generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match=r"5 rows.*2 generators"):
        randn((5, 3), generator=[torch.Generator(), torch.Generator()])


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_a_group_s_samples_do_not_change_when_rows_join_the_batch(name):
    schedule = make_schedule("cosine", 1000)
    denoiser = exact_denoiser(schedule)
    offers = {"eta": 1.0, "variance": "fixed_large", "moments": exact_moments(schedule)}  # every sampler's noise

    def run(seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        x_T = randn((3 * len(seeds), 4, 4), generator=gens)  # 3 rows per generator
        return sample(name, denoiser, x_T, schedule, 10, options=offers, generator=gens, progress=False)

    alone, joined = run([7]), run([7, 8])
    assert joined.shape == (6, 4, 4)
    torch.testing.assert_close(joined[:3], alone, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(joined[3:], alone, atol=1e-2)  # the other group really is other noise
