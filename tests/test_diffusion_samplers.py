"""Samplers, the denoiser adapter, guidance and thresholding: pinned against diffusers' schedulers on a
formula-based dummy model, plus determinism, guidance, thresholding and inversion checks."""

from __future__ import annotations

import pytest
import torch

from unclip.diffusion import (
    Denoised,
    alphas_cumprod_at,
    classifier_free_guidance,
    cosine_schedule,
    ddim_invert,
    ddim_step,
    ddpm_step,
    dynamic_threshold,
    linear_schedule,
    make_denoiser,
    make_schedule,
    norm_clip,
    randn,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    static_clip,
    timestep_subset,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers + numpy 2

BETAS = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
SHAPE = (2, 3, 4, 4)


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


guide = classifier_free_guidance  # short name for the long lines below


def dummy_model(x_t, t, **cond):
    """A formula-based stand-in for a network: output = 0.1 x_t + 0.001 t (per row)."""
    return 0.1 * x_t + 1e-3 * t.view(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)


def start(seed=0, shape=SHAPE, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def use_float64_tables(sched, schedule):
    """Give a diffusers scheduler our float64 alpha-bar, so that one step compares the formulas in float64.

    (diffusers builds its tables in float32, where 1 - alpha-bar_t at small t loses ~1e-4 of relative precision;
    the tables themselves are compared at float32 precision in test_diffusion_schedule.py.)
    """
    sched.betas, sched.alphas = schedule.betas.clone(), schedule.alphas.clone()
    sched.alphas_cumprod = schedule.alphas_cumprod.clone()
    sched.one = sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return sched


# --- timesteps ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 50, 333, 1000])
def test_timestep_subset_matches_diffusers_ddim(diffusers, spacing, steps):
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
    sched.set_timesteps(steps)
    ours = timestep_subset(1000, steps, spacing)
    assert torch.equal(ours, sched.timesteps), spacing
    assert len(set(ours.tolist())) == steps


def test_timestep_subset_rejects_bad_requests():
    with pytest.raises(ValueError):
        timestep_subset(100, 0)
    with pytest.raises(ValueError):
        timestep_subset(100, 101)
    with pytest.raises(ValueError):
        timestep_subset(100, 10, "quadratic")
    with pytest.raises(ValueError):
        sample_ddpm(lambda x, t: None, start(), linear_schedule(100), 101, progress=False)
    with pytest.raises(ValueError, match="2 values for 3 steps"):
        sample_ddpm(lambda x, t: None, start(), linear_schedule(100), 3, variance=[0.1, 0.2], progress=False)


# --- DDPM -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
def test_ddpm_step_matches_diffusers(diffusers, kind, objective, variance):
    schedule = make_schedule(kind, 1000)
    sched = diffusers.DDPMScheduler(beta_schedule=BETAS[kind], prediction_type=PREDICTION[objective],
                                    variance_type=variance, clip_sample=False)
    use_float64_tables(sched, schedule)
    x_t, out = start(1, dtype=torch.float64), start(2, dtype=torch.float64)
    if variance == "learned_range":  # (b, 2c, h, w): the prediction, then v in [-1, 1]
        out = torch.cat([out, torch.tanh(start(3, dtype=torch.float64))], dim=1)
    denoiser = make_denoiser(lambda x, tt: out, schedule, objective, variance=variance)
    for t in (999, 500, 1):
        # diffusers draws its variance noise from the generator with the sample's shape and dtype.
        expected = sched.step(out, t, x_t, generator=torch.Generator().manual_seed(7)).prev_sample
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        d = denoiser(x_t, torch.full((2,), t))
        a, a_prev = alphas_cumprod_at(schedule, t), alphas_cumprod_at(schedule, t - 1)
        got = ddpm_step(x_t, d, a, a_prev, variance, noise)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("objective", ["eps", "v"])
def test_ddpm_trajectory_matches_diffusers_with_clipping(diffusers, objective):
    """A 10-step respaced run with x0 clipping; the generator is shared, so the noise draws line up."""
    schedule = linear_schedule(1000)
    sched = diffusers.DDPMScheduler(prediction_type=PREDICTION[objective], variance_type="fixed_large",
                                    clip_sample=True, timestep_spacing="leading")
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(3)
    x = start(4)
    for t in sched.timesteps:
        x = sched.step(dummy_model(x, t.repeat(2)), t, x, generator=g).prev_sample
    denoiser = make_denoiser(dummy_model, schedule, objective, x0_hook=static_clip)
    got = sample_ddpm(denoiser, start(4), schedule, 10, spacing="leading", variance="fixed_large",
                      generator=torch.Generator().manual_seed(3), progress=False)
    torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-4)


def test_learned_range_sampling_needs_a_variance_channel():
    schedule = cosine_schedule(20)
    with pytest.raises(ValueError, match="learned_range"):
        sample_ddpm(make_denoiser(dummy_model, schedule, "eps"), start(), schedule, 20, variance="learned_range",
                    progress=False)
    with pytest.raises(AssertionError, match="channels"):
        make_denoiser(dummy_model, schedule, "eps", variance="learned_range")(start(), torch.zeros(2, dtype=torch.long))


# --- DDIM -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step_matches_diffusers(diffusers, objective, eta):
    schedule = cosine_schedule(1000)
    sched = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=PREDICTION[objective],
                                    clip_sample=False)
    sched.set_timesteps(20)  # leading: 950, 900, ..., 0; the step from t goes to t - 50
    use_float64_tables(sched, schedule)
    x_t, out, noise = (start(i, dtype=torch.float64) for i in (1, 2, 3))
    denoiser = make_denoiser(lambda x, tt: out, schedule, objective)
    for t in (950, 500, 0):
        expected = sched.step(out, t, x_t, eta=eta, variance_noise=noise if eta > 0 else None).prev_sample
        d = denoiser(x_t, torch.full((2,), t))
        got = ddim_step(d, alphas_cumprod_at(schedule, t), alphas_cumprod_at(schedule, t - 50), eta, noise)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_trajectory_matches_diffusers(diffusers, spacing):
    schedule = linear_schedule(1000)
    sched = diffusers.DDIMScheduler(timestep_spacing=spacing, clip_sample=True)
    sched.set_timesteps(25)
    x = start(5)
    for t in sched.timesteps:
        x = sched.step(dummy_model(x, t.repeat(2)), t, x, use_clipped_model_output=True).prev_sample
    denoiser = make_denoiser(dummy_model, schedule, "eps", x0_hook=static_clip)
    got = sample_ddim(denoiser, start(5), schedule, 25, spacing=spacing, progress=False)
    torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-4)


# --- DPM-Solver++(2M) -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "objective", "steps"), [("linear", "eps", 20), ("cosine", "v", 20),
                                                          ("linear", "x0", 7), ("cosine", "eps", 50)])
def test_dpmpp_2m_trajectory_matches_diffusers(diffusers, kind, objective, steps):
    schedule = make_schedule(kind, 1000)
    sched = diffusers.DPMSolverMultistepScheduler(beta_schedule=BETAS[kind], prediction_type=PREDICTION[objective],
                                                  algorithm_type="dpmsolver++", solver_order=2,
                                                  timestep_spacing="trailing")
    sched.set_timesteps(steps)
    assert torch.equal(sched.timesteps, timestep_subset(1000, steps, "trailing"))
    x = start(6)
    for t in sched.timesteps:
        x = sched.step(dummy_model(x, t.repeat(2)), t, x).prev_sample
    seen = []
    got = sample_dpmpp_2m(make_denoiser(dummy_model, schedule, objective), start(6), schedule, steps,
                          progress=False, callback=lambda i, t, x_t, d: seen.append((i, t)))
    torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-4)
    assert seen == list(enumerate(sched.timesteps.tolist()))


@pytest.mark.parametrize(("kind", "objective", "steps"), [("linear", "eps", 20), ("cosine", "v", 12),
                                                          ("cosine", "x0", 7)])
def test_dpmpp_2m_sde_trajectory_matches_diffusers(diffusers, kind, objective, steps):
    schedule = make_schedule(kind, 1000)
    sched = diffusers.DPMSolverMultistepScheduler(beta_schedule=BETAS[kind], prediction_type=PREDICTION[objective],
                                                  algorithm_type="sde-dpmsolver++", solver_order=2,
                                                  solver_type="midpoint", timestep_spacing="trailing")
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(3)  # ours draws one noise per step but the last, in this order
    noises = [torch.randn(SHAPE, generator=g) for _ in range(steps - 1)] + [torch.zeros(SHAPE)]
    x = start(6)
    for t, noise in zip(sched.timesteps, noises, strict=True):
        x = sched.step(dummy_model(x, t.repeat(2)), t, x, variance_noise=noise).prev_sample
    got = sample_dpmpp_2m_sde(make_denoiser(dummy_model, schedule, objective), start(6), schedule, steps,
                              generator=torch.Generator().manual_seed(3), progress=False)
    torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-4)
    ode = sample_dpmpp_2m(make_denoiser(dummy_model, schedule, objective), start(6), schedule, steps, progress=False)
    assert (got - ode).abs().max() > 1e-2  # the noise matters: not the ODE solver under another name


# --- determinism, callbacks, conditioning ---------------------------------------------------------------------------


def test_same_seed_same_samples():
    schedule = cosine_schedule(50)
    calls = []

    def model(x_t, t, *, scale):
        calls.append(scale)
        return 0.5 * x_t * scale

    denoiser = make_denoiser(model, schedule, "eps")

    def run(seed, sampler):
        g = torch.Generator().manual_seed(seed)
        x_T = randn(SHAPE, generator=g)
        return sampler(denoiser, x_T, schedule, generator=g, cond={"scale": 0.9}, progress=False)

    for sampler in (lambda *a, **k: sample_ddpm(*a, 50, **k), lambda *a, **k: sample_ddim(*a, 10, eta=1.0, **k)):
        a, b, c = run(0, sampler), run(0, sampler), run(1, sampler)
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)
    assert set(calls) == {0.9}


# --- classifier-free guidance ---------------------------------------------------------------------------------------


class CountingModel:
    """A conditional model: eps = 0.3 x_t + embed, with a null embedding where cond_drop is set."""

    def __init__(self, learned_variance=False):
        self.batches = []
        self.learned_variance = learned_variance

    def __call__(self, x_t, t, *, cond_drop=None, embed):
        self.batches.append(x_t.shape[0])
        if cond_drop is not None:
            embed = torch.where(cond_drop.view(-1, 1, 1, 1), torch.full_like(embed, -0.25), embed)
        out = 0.3 * x_t + embed
        if self.learned_variance:
            out = torch.cat([out, torch.tanh(embed).expand_as(x_t)], dim=1)
        return out


def test_cfg_scale_one_is_the_original_callable():
    model = CountingModel()
    assert guide(model, 1.0) is model


def test_cfg_one_batched_forward_and_formula():
    model = CountingModel()
    x_t, embed, t = start(1), start(2)[:, :1], torch.tensor([5, 9])
    guided = guide(model, 3.0)(x_t, t, embed=embed)
    assert model.batches == [4]  # one forward of 2b rows
    cond = model(x_t, t, embed=embed)
    uncond = model(x_t, t, cond_drop=torch.ones(2, dtype=torch.bool), embed=embed)
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond))
    # A caller's own cond_drop applies to the conditional branch; the unconditional branch drops every row.
    drop = torch.tensor([True, False])
    guided = guide(model, 3.0)(x_t, t, cond_drop=drop, embed=embed)
    cond = model(x_t, t, cond_drop=drop, embed=embed)
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond))
    torch.testing.assert_close(guided[0], uncond[0])


@pytest.mark.parametrize("learned_variance", [False, True])
def test_cfg_split_makes_two_calls_with_the_same_result(learned_variance):
    schedule = cosine_schedule(100)
    x_t, embed, t = start(1), start(2)[:, :1], torch.tensor([5, 9])
    drop = torch.tensor([True, False])
    joint, split = CountingModel(learned_variance), CountingModel(learned_variance)
    a = guide(joint, 2.5, learned_variance=learned_variance)(x_t, t, cond_drop=drop, embed=embed)
    b = guide(split, 2.5, learned_variance=learned_variance, split=True)(x_t, t, cond_drop=drop, embed=embed)
    assert joint.batches == [4] and split.batches == [2, 2]
    torch.testing.assert_close(a, b)
    if learned_variance:  # and around a denoiser
        den = make_denoiser(CountingModel(True), schedule, "eps", variance="learned_range")
        a, b = (guide(den, 2.5, split=s)(x_t, t, embed=embed) for s in (False, True))
        for field in ("x0", "eps", "var_interp"):
            torch.testing.assert_close(getattr(a, field), getattr(b, field))


def test_cfg_keeps_the_conditional_variance_and_wraps_denoisers():
    schedule = cosine_schedule(100)
    model = CountingModel(learned_variance=True)
    x_t, embed, t = start(1), start(2)[:, :1], torch.tensor([5, 9])
    out = guide(model, 2.0, learned_variance=True)(x_t, t, embed=embed)
    cond = model(x_t, t, embed=embed)
    torch.testing.assert_close(out[:, 3:], cond[:, 3:])  # the variance channels: conditional, unguided
    # Guiding a denoiser gives the same x0 and eps as guiding the network output (for any objective).
    for objective in ("eps", "x0", "v"):
        via_model = make_denoiser(guide(model, 2.0, learned_variance=True), schedule, objective,
                                  variance="learned_range")(x_t, t, embed=embed)
        via_denoiser = guide(make_denoiser(model, schedule, objective, variance="learned_range"), 2.0)(
            x_t, t, embed=embed)
        assert isinstance(via_denoiser, Denoised)
        torch.testing.assert_close(via_model.x0, via_denoiser.x0, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(via_model.eps, via_denoiser.eps, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(via_model.var_interp, via_denoiser.var_interp)


def test_cfg_inside_a_sampler():
    schedule = cosine_schedule(100)
    model = CountingModel()
    embed = start(2)[:, :1]
    sample_ddim(make_denoiser(guide(model, 4.0), schedule, "eps"), start(1), schedule, 5, cond={"embed": embed},
                progress=False)
    assert model.batches == [4] * 5


# --- thresholding ---------------------------------------------------------------------------------------------------


def test_dynamic_threshold():
    inside = torch.rand(3, 2, 5, 5) * 2 - 1
    assert torch.equal(dynamic_threshold(inside), inside)
    wild = start(8, (3, 2, 5, 5)) * 4
    out = dynamic_threshold(wild)
    assert float(out.abs().max()) <= 1.0
    assert torch.equal(torch.sign(out), torch.sign(wild))
    # The scale is per sample: a mixed batch leaves its in-range row untouched.
    mixed = torch.stack([inside[0], wild[0]])
    torch.testing.assert_close(dynamic_threshold(mixed)[0], inside[0])
    # s = the 99.5th percentile of |x0|: the largest values saturate at exactly +-1.
    assert float(out.abs().amax(dim=(1, 2, 3)).min()) == 1.0


def test_static_and_norm_clip():
    x = torch.tensor([[3.0, -0.5], [0.3, 0.4]])
    assert torch.equal(static_clip(x), torch.tensor([[1.0, -0.5], [0.3, 0.4]]))
    clipped = norm_clip(x, max_norm=1.0)
    torch.testing.assert_close(clipped[0].norm(), torch.tensor(1.0))
    torch.testing.assert_close(clipped[1], x[1])


def test_x0_hook_recomputes_eps():
    schedule = linear_schedule(1000)
    x_t, t = start(1) * 3, torch.tensor([100, 900])
    d = make_denoiser(lambda x, tt: torch.zeros_like(x), schedule, "eps", x0_hook=static_clip)(x_t, t)
    assert float(d.x0.abs().max()) <= 1.0
    a = schedule.sqrt_alphas_cumprod[t].float().view(-1, 1, 1, 1)
    s = schedule.sqrt_one_minus_alphas_cumprod[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(a * d.x0 + s * d.eps, x_t, rtol=1e-5, atol=1e-5)


# --- inversion ------------------------------------------------------------------------------------------------------


def gaussian_denoiser(schedule, mu=0.3, std=0.5):
    """The exact eps-predictor for data x0 ~ N(mu, std^2 I): smooth, so DDIM's ODE is well resolved."""

    def model(x_t, t):
        abar = schedule.alphas_cumprod[t].float().view(-1, *([1] * (x_t.ndim - 1)))
        a, s = abar.sqrt(), (1 - abar).sqrt()
        x0 = mu + a * std**2 / (abar * std**2 + 1 - abar) * (x_t - a * mu)
        return (x_t - a * x0) / s

    return make_denoiser(model, schedule, "eps")


@pytest.mark.parametrize(("kind", "iters", "max_err", "mean_err"), [
    ("linear", 0, 0.15, 0.04),  # plain inversion: first order in the step size
    ("cosine", 0, 0.15, 0.04),
    ("linear", 3, 1e-3, 1e-4),  # fixed-point refinement: the exact inverse of each sampler step
    ("cosine", 3, 0.02, 0.01),  # (cosine's last step, alpha-bar = 2e-9, leaves the iteration barely contracting)
])
def test_ddim_invert_then_sample_reconstructs(kind, iters, max_err, mean_err):
    schedule = make_schedule(kind, 1000)
    denoiser = gaussian_denoiser(schedule)
    x0 = 0.3 + 0.5 * start(9, (4, 2, 8, 8))
    x_T = ddim_invert(denoiser, x0, schedule, 50, fixed_point_iters=iters, progress=False)
    assert 0.8 < float(x_T.std()) < 1.2  # close to the N(0, I) prior
    err = (sample_ddim(denoiser, x_T, schedule, 50, progress=False) - x0).abs()
    assert float(err.max()) < max_err and float(err.mean()) < mean_err, (float(err.max()), float(err.mean()))


# --- devices --------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_samplers_on_cuda_match_cpu():
    """Schedule tables stay on the CPU; tensors on the GPU; a CPU generator gives the CPU run's noise."""
    schedule = cosine_schedule(100)
    denoiser = make_denoiser(dummy_model, schedule, "v", x0_hook=dynamic_threshold)
    for sampler in (lambda *a, **k: sample_ddpm(*a, 100, **k), lambda *a, **k: sample_ddim(*a, 10, eta=0.5, **k)):
        runs = [sampler(denoiser, start(1).to(device), schedule, generator=torch.Generator().manual_seed(0),
                        progress=False).cpu() for device in ("cpu", "cuda")]
        torch.testing.assert_close(runs[1], runs[0], rtol=1e-4, atol=1e-4)
    got = sample_dpmpp_2m(denoiser, start(1).cuda(), schedule, 10, progress=False)
    assert got.is_cuda


@pytest.mark.parametrize("eta", [-0.1, 1.5, float("nan")])
def test_ddim_refuses_eta_outside_0_1(eta):
    """Above 1 the marginal of x_prev would be silently wrong (its eps coefficient clamped at 0)."""
    schedule = cosine_schedule(100)
    calls = []

    def counting(x, t):
        calls.append(t)
        return dummy_model(x, t)

    denoiser = make_denoiser(counting, schedule, "eps")
    with pytest.raises(ValueError, match="eta must lie in"):
        sample_ddim(denoiser, start(1), schedule, steps=5, eta=eta, progress=False)
    assert not calls  # refused before any network call
    d = denoiser(start(1), torch.full((SHAPE[0],), 50))
    with pytest.raises(ValueError, match="eta must lie in"):
        ddim_step(d, 0.5, 0.6, eta=eta, noise=torch.zeros_like(d.x0))
