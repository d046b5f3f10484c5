"""Noise schedules and the Gaussian diffusion math: oracle values from diffusers, closed forms computed here."""

from __future__ import annotations

import math

import pytest
import torch

from unclip.config import ConfigError, load_config
from unclip.diffusion import (
    ScheduleConfig,
    cosine_schedule,
    diffusion_loss,
    discretized_gaussian_log_likelihood,
    extract,
    linear_schedule,
    make_schedule,
    normal_kl,
    p_log_variance,
    predict_eps_from_v,
    predict_eps_from_x0,
    predict_x0_from_eps,
    predict_x0_from_v,
    q_posterior_mean_variance,
    q_sample,
    sample_timesteps,
    snr,
    v_from_x0_eps,
    vlb_loss,
)


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


@pytest.mark.parametrize(("kind", "beta_schedule"), [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_alphas_cumprod_match_diffusers(diffusers, kind, beta_schedule):
    ours = make_schedule(kind, 1000)
    theirs = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule)
    # diffusers computes in float32; ours is float64, so compare at float32 precision.
    torch.testing.assert_close(ours.betas.float(), theirs.betas, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.alphas_cumprod.float(), theirs.alphas_cumprod, rtol=1e-4, atol=1e-7)


def test_schedule_tables_are_float64_and_consistent():
    s = cosine_schedule(100)
    assert s.num_timesteps == 100 and s.betas.dtype == torch.float64
    torch.testing.assert_close(s.alphas_cumprod, torch.cumprod(1 - s.betas, 0))
    torch.testing.assert_close(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])
    assert s.alphas_cumprod_prev[0] == 1.0 and s.posterior_variance[0] == 0.0
    torch.testing.assert_close(s.posterior_log_variance_clipped[0], s.posterior_variance[1].log())
    assert float(s.betas.max()) <= 0.999


def test_linear_schedule_rescales_for_other_lengths():
    s = linear_schedule(1000)
    assert math.isclose(float(s.betas[0]), 1e-4) and math.isclose(float(s.betas[-1]), 0.02)
    s250 = linear_schedule(250)
    assert math.isclose(float(s250.betas[0]), 4e-4) and math.isclose(float(s250.betas[-1]), 0.08)
    # The rescaling keeps the terminal signal level about the same.
    assert abs(float(s250.alphas_cumprod[-1]) - float(s.alphas_cumprod[-1])) < 1e-4
    with pytest.raises(ValueError, match="cosine"):
        linear_schedule(20)


def test_schedule_config_is_strict():
    cfg = load_config(ScheduleConfig, {"kind": "linear", "num_timesteps": 50})
    assert make_schedule(cfg.kind, cfg.num_timesteps).num_timesteps == 50
    with pytest.raises(ConfigError, match="num_timestep"):
        load_config(ScheduleConfig, {"num_timestep": 50})
    with pytest.raises(ConfigError):
        load_config(ScheduleConfig, {"kind": "quadratic"})
    with pytest.raises(ConfigError):
        load_config(ScheduleConfig, {"num_timesteps": 0})


def test_extract_broadcasts_and_casts():
    s = cosine_schedule(10)
    x = torch.zeros(3, 2, 4, 4)
    out = extract(s.betas, torch.tensor([0, 5, 9]), x)
    assert out.shape == (3, 1, 1, 1) and out.dtype == torch.float32
    torch.testing.assert_close(out.flatten(), s.betas[[0, 5, 9]].float())


def test_tables_are_copied_to_a_device_once_and_forgotten_with_their_schedule():
    """A lookup on another device reuses one copy of the table (a host-to-GPU copy per call would stall the GPU);
    the meta device stands in for a GPU here."""
    import gc

    from unclip.diffusion.schedule import _DEVICE_COPIES, on_device

    schedule = cosine_schedule(50)
    t = torch.tensor([3, 7], device="meta")
    x = torch.empty(2, 3, device="meta")
    first = on_device(schedule.alphas_cumprod, t.device)
    assert first.device.type == "meta" and on_device(schedule.alphas_cumprod, t.device) is first
    assert extract(schedule.alphas_cumprod, t, x).shape == (2, 1)
    assert on_device(schedule.alphas_cumprod, torch.device("cpu")) is schedule.alphas_cumprod
    key = id(schedule.alphas_cumprod)
    assert key in _DEVICE_COPIES
    del schedule
    gc.collect()
    assert key not in _DEVICE_COPIES


def test_q_posterior_matches_bayes_rule_float64():
    """The posterior of q(x_{t-1} | x0) = N(sqrt(abar') x0, 1 - abar') times q(x_t | x_{t-1}) = N(sqrt(a) x, beta)."""
    s = cosine_schedule(200)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([1, 7, 50, 120, 199])
    x0 = torch.randn(5, 3, generator=g, dtype=torch.float64)
    x_t = torch.randn(5, 3, generator=g, dtype=torch.float64)
    betas = s.betas[t].unsqueeze(1)
    abar_prev = torch.cumprod(1 - s.betas, 0)[t - 1].unsqueeze(1)  # independent of the schedule's own tables
    precision = 1 / (1 - abar_prev) + (1 - betas) / betas
    var = 1 / precision
    mean = var * (abar_prev.sqrt() * x0 / (1 - abar_prev) + (1 - betas).sqrt() * x_t / betas)
    got_mean, got_var, got_log_var = q_posterior_mean_variance(s, x0, x_t, t)
    torch.testing.assert_close(got_mean, mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_var.expand_as(var), var, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(got_log_var.exp().expand_as(var), var, rtol=1e-10, atol=1e-14)
    # At t = 0 the posterior is x0 itself: mean x0, variance 0.
    t0 = torch.zeros(5, dtype=torch.long)
    m0, v0, _ = q_posterior_mean_variance(s, x0, x_t, t0)
    torch.testing.assert_close(m0, x0)
    assert float(v0.abs().max()) == 0.0


def test_parameterisations_round_trip_and_v_matches_diffusers(diffusers):
    s = linear_schedule(1000)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    x_t = q_sample(s, x0, t, eps)
    torch.testing.assert_close(predict_x0_from_eps(s, x_t, t, eps), x0, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(predict_eps_from_x0(s, x_t, t, x0), eps, rtol=1e-4, atol=1e-3)
    v = v_from_x0_eps(s, x0, eps, t)
    torch.testing.assert_close(predict_x0_from_v(s, x_t, t, v), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(predict_eps_from_v(s, x_t, t, v), eps, rtol=1e-4, atol=1e-4)
    theirs = diffusers.DDPMScheduler(num_train_timesteps=1000)
    torch.testing.assert_close(v, theirs.get_velocity(x0, eps, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_t, theirs.add_noise(x0, eps, t), rtol=1e-5, atol=1e-5)


def test_min_snr_weighting_is_the_same_x0_loss_for_every_objective():
    """With a prediction implying the same x0 error, every objective's weighted loss is min(snr, g) * |dx0|^2."""
    s = cosine_schedule(1000)
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 3, 100, 400, 800, 999])
    x_t = q_sample(s, x0, t, noise)
    x0_pred = x0 + 0.1 * torch.randn(6, 8, generator=g, dtype=torch.float64)
    eps_pred = predict_eps_from_x0(s, x_t, t, x0_pred)
    v_pred = v_from_x0_eps(s, x0_pred, eps_pred, t)
    gamma = 5.0
    expected = snr(s, t).double().clamp(max=gamma) * ((x0_pred - x0) ** 2).mean(1)
    for objective, out in [("eps", eps_pred), ("x0", x0_pred), ("v", v_pred)]:
        got = diffusion_loss(out, x0, x_t, t, noise, s, objective, min_snr_gamma=gamma)
        assert got.shape == (6,) and got.dtype == torch.float64
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-10, msg=objective)
    plain = diffusion_loss(eps_pred, x0, x_t, t, noise, s, "eps")
    torch.testing.assert_close(plain, ((eps_pred - noise) ** 2).mean(1))


def test_sample_timesteps_uniform_and_seeded():
    s = cosine_schedule(10)
    a = sample_timesteps(4000, s, torch.Generator().manual_seed(3))
    b = sample_timesteps(4000, s, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == torch.long and a.shape == (4000,)
    assert int(a.min()) == 0 and int(a.max()) == 9
    assert torch.bincount(a, minlength=10).min() > 300


def test_normal_kl_and_discretized_likelihood():
    m, lv = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    torch.testing.assert_close(normal_kl(m, lv, m, lv), torch.zeros(10, dtype=torch.float64))
    # KL(N(0,1) || N(1, e^1)) = 0.5 * (-1 + 1 + e^-1 + e^-1).
    kl = normal_kl(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(1.0))
    assert math.isclose(float(kl), 0.5 * 2 * math.exp(-1), rel_tol=1e-6)
    # The 256 bins of [-1, 1] hold all the probability.
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in [(0.3, math.log(0.2)), (-0.9, math.log(0.01)), (0.0, math.log(3.0))]:
        ll = discretized_gaussian_log_likelihood(levels, torch.tensor(mean), torch.tensor(log_scale))
        assert math.isclose(float(ll.exp().sum()), 1.0, rel_tol=1e-6)


def test_vlb_is_zero_for_a_perfect_learned_variance():
    s = cosine_schedule(100)
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 50, 99])
    x_t = q_sample(s, x0, t, noise)
    v_small = -torch.ones_like(x0)  # frac 0: log beta-tilde, the true posterior variance
    assert float(vlb_loss(s, x0, x_t, t, x0, "learned_range", v_small).abs().max()) < 1e-9
    assert float(vlb_loss(s, x0, x_t, t, x0, "learned_range", -v_small).min()) > 0  # beta > beta-tilde: KL > 0
    torch.testing.assert_close(p_log_variance(s, x0, t, "learned_range", -v_small), extract(s.betas.log(), t, x0)
                               .expand_as(x0))
    # fixed_large uses beta-tilde_1 at t = 0 (improved-DDPM), beta_t elsewhere.
    lv = p_log_variance(s, x0, torch.tensor([0, 5, 9]), "fixed_large").flatten()
    torch.testing.assert_close(lv, torch.stack([s.posterior_variance[1], s.betas[5], s.betas[9]]).log())
    # The decoder term at t = 0 is a finite, positive NLL in bits per dim.
    nll = vlb_loss(s, x0.clamp(-1, 1), x_t, torch.tensor([0, 0, 0]), x0.clamp(-1, 1), "fixed_small")
    assert bool(torch.isfinite(nll).all()) and float(nll.min()) > 0
